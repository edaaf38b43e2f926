"""The pipeline's last two stages: register + promotion gate (on a local MLflow store), and serving
(locally: a real ``step3vl serve`` answering one chat completion; on Kubernetes: a fake API)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from step3vl.stages import deploy


@pytest.fixture()
def store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("STEP3VL_GIT_COMMIT", "abc123")
    yield
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def checkpoint(micro_cfg, tmp_path_factory):
    from step3vl.serve.tiny import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("ck") / "model", micro_cfg.model)


def _eval_dir(path: Path, accuracies: dict[str, float]) -> Path:
    (path / "pacore").mkdir(parents=True)
    metrics = {f"greedy/{f}/accuracy": a for f, a in accuracies.items()}
    metrics.update({f"sere/{f}/accuracy": a / 2 for f, a in accuracies.items()})
    (path / "pacore" / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_register_then_gate(micro_cfg, checkpoint, store, tmp_path):
    import mlflow

    from step3vl import registry
    from step3vl.stages import release

    data = tmp_path / "data"
    data.mkdir()
    (data / "data_manifest.json").write_text(json.dumps({"sets": {"eval": {"content_hash": "e" * 64},
                                                                  "rl": {"content_hash": "r" * 64}}}))
    good = {"text_math": 0.5, "mm_math": 0.4, "perception_count": 0.3}
    out = release.run(micro_cfg, data, checkpoint, _eval_dir(tmp_path / "ev1", good), stage="pacore",
                      kfp_run_id="kfp-run-1", parent_run_id="parent-1")
    assert out.version == "1" and out.promotion.promoted and out.metrics["promoted"] == 1.0
    c = mlflow.MlflowClient()
    mv = c.get_model_version(micro_cfg.tracking.registered_model, "1")
    tags = mv.tags
    assert tags["step3vl.kfp_run_id"] == "kfp-run-1" and tags["step3vl.mlflow_parent_run_id"] == "parent-1"
    assert tags["step3vl.git_commit"] == "abc123" and tags["step3vl.stage"] == "pacore"
    assert tags["step3vl.data.rl.sha256"] == "r" * 64 and tags["step3vl.config_hash"]
    assert tags["step3vl.data_uri"] == str(data.resolve())  # where `step3vl eval` finds the version's eval set
    assert float(tags["metric.greedy/text_math/accuracy"]) == 0.5 and float(tags["metric.sere/mm_math/accuracy"]) == 0.2
    rm = c.get_registered_model(micro_cfg.tracking.registered_model)
    assert {k: str(v) for k, v in rm.aliases.items()} == {"candidate": "1", "champion": "1"}
    assert "**passed**" in out.report and "promoted to `champion`" in out.report
    # a worse model: registered (candidate moves), refused by the gate (champion stays)
    worse = {**good, "text_math": 0.1}
    out2 = release.run(micro_cfg, data, checkpoint, _eval_dir(tmp_path / "ev2", worse), stage="pacore")
    assert out2.version == "2" and not out2.promotion.promoted and out2.metrics["failing_families"] >= 1
    aliases = c.get_registered_model(micro_cfg.tracking.registered_model).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"candidate": "2", "champion": "1"}
    assert "text_math" in out2.report and "stays at version 1" in out2.report


def test_serve_locally_answers_one_chat_completion(micro_cfg, checkpoint):
    out = deploy.run(micro_cfg, checkpoint, target="local")
    assert out.target == "local" and out.endpoint.startswith("http://127.0.0.1:")
    assert out.metrics["completion_tokens"] >= 1 and out.metrics["prompt_tokens"] > 0
    assert "answered one chat completion" in out.report
    import urllib.error
    import urllib.request

    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # stopped afterwards
        urllib.request.urlopen(out.endpoint + "/health", timeout=2)


class ApiException(Exception):
    def __init__(self, status):
        super().__init__(str(status))
        self.status = status


def _deployment(generation, observed, updated, ready, available, conditions=()):
    return SimpleNamespace(spec=SimpleNamespace(replicas=1), metadata=SimpleNamespace(generation=generation),
                           status=SimpleNamespace(observed_generation=observed, updated_replicas=updated,
                                                  ready_replicas=ready, available_replicas=available,
                                                  unavailable_replicas=0 if ready else 1,
                                                  conditions=[SimpleNamespace(**c) for c in conditions]))


class FakeApps:
    def __init__(self, states, missing=False):
        self.states, self.missing, self.patches = list(states), missing, []

    def patch_namespaced_deployment(self, name, ns, body):
        if self.missing:
            raise ApiException(404)
        self.patches.append((name, ns, body))

    def read_namespaced_deployment_status(self, name, ns):
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]


class FakeCore:
    def __init__(self):
        self.patches = []

    def patch_namespaced_config_map(self, name, ns, body):
        self.patches.append((name, ns, body))


def test_deploy_kubernetes_rolls_the_vllm_deployment(micro_cfg):
    exported = []
    apps = FakeApps([_deployment(2, 1, 0, 0, 0), _deployment(2, 2, 1, 0, 0), _deployment(2, 2, 1, 1, 1)])
    core = FakeCore()
    out = deploy.run(micro_cfg, "models:/step3vl-micro/3", target="kubernetes", api=(core, apps), poll_s=0,
                     export=lambda cfg, uri, dest: exported.append((uri, dest)))
    dest = exported[0][1]
    assert exported == [("models:/step3vl-micro/3", dest)] and dest.endswith("models/step3vl-micro/v3/export")
    assert core.patches == [("serving", "step3vl", {"data": {"MODEL_URI": dest, "MODEL_NAME": "step3vl-micro"}})]
    (name, ns, body), = apps.patches
    ann = body["spec"]["template"]["metadata"]["annotations"]
    assert (name, ns) == ("serving", "step3vl") and ann["step3vl.ai/model-uri"] == "models:/step3vl-micro/3"
    assert out.endpoint == "http://serving.step3vl.svc.cluster.local:8000/v1"
    with pytest.raises(deploy.DeployError, match="install manifests/overlays"):
        deploy.run(micro_cfg, "models:/m/1", target="kubernetes", api=(core, FakeApps([], missing=True)),
                   export=lambda *a: None)


def test_wait_rollout_fails_cleanly():
    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    objs = deploy.ServingObjects()
    stuck = FakeApps([_deployment(2, 2, 1, 0, 0)])
    with pytest.raises(deploy.DeployError, match="not ready after 30s: 1 updated / 0 ready of 1"):
        deploy.wait_rollout(stuck, objs, timeout_s=30, poll_s=10, clock=clock, sleep=sleep)
    failed = FakeApps([_deployment(2, 2, 1, 0, 0, [{"type": "Progressing", "status": "False",
                                                    "reason": "ProgressDeadlineExceeded", "message": "no GPU"}])])
    with pytest.raises(deploy.DeployError, match="ProgressDeadlineExceeded: no GPU"):
        deploy.wait_rollout(failed, objs, timeout_s=30, poll_s=10, clock=clock, sleep=sleep)
    with pytest.raises(deploy.DeployError, match="local or kubernetes"):
        deploy.run(None, "x", target="mars")
