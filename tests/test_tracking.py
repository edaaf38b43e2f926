"""MLflow helper: embedded SQLite default, parent/child runs, config logged, secrets redacted."""

import mlflow
import pytest

from step3vl import config, tracking
from step3vl.config import PipelineConfig, TrackingConfig


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / ".step3vl"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path / ".step3vl"
    mlflow.set_tracking_uri(None)


def test_embedded_default_is_sqlite_under_home(home):
    assert tracking.tracking_uri(TrackingConfig()) == f"sqlite:///{home / 'mlflow.db'}"


def test_env_overrides_config(home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "http://127.0.0.1:1"


def test_stage_runs_nest_under_pipeline_run_and_log_config(home, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value-123")
    cfg = config.load(PipelineConfig, "conf/pipeline/tiny.yaml",
                      ["storage.root=s3://bucket/planted-secret-value-123/x"])
    tcfg = TrackingConfig(experiment="t")
    with tracking.pipeline_run(tcfg, "pipe") as parent:
        with tracking.stage_run("sft", tcfg, parent_run_id=parent.info.run_id, config=cfg) as child:
            mlflow.log_metric("loss", 1.5)
    client = mlflow.MlflowClient()
    run = client.get_run(child.info.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.tags["step3vl.stage"] == "sft"
    assert run.data.params["model.text.hidden_size"] == str(cfg.model.text.hidden_size)
    assert run.data.metrics["loss"] == 1.5
    # the secret's value never reaches params or the YAML artifact
    assert all("planted-secret-value-123" not in v for v in run.data.params.values())
    path = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="config.yaml")
    text = open(path).read()
    assert "planted-secret-value-123" not in text and "***" in text
    assert str(home) in run.info.artifact_uri


def test_redact_secret_keys():
    d = tracking.redact_dict({"a": {"api_key": "x", "password": "y", "n": 1}, "secret_token": "z"})
    assert d == {"a": {"api_key": "***", "password": "***", "n": 1}, "secret_token": "***"}
