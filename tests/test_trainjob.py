"""Training as Kubeflow Trainer TrainJobs: the spec (validated against the vendored CRD schema), the
preflight, creation on retry, following the conditions, and the remote call round trip, on fake APIs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from step3vl.pipeline import trainjob
from step3vl.pipeline.cluster import DEFAULT, ClusterSettings
from step3vl.pipeline.images import TRAINER_IMAGE, TRAINER_RUNTIME

ROOT = Path(__file__).resolve().parent.parent


class ApiException(Exception):
    def __init__(self, status: int):
        super().__init__(f"({status})")
        self.status = status


@pytest.fixture(scope="module")
def crd_validators():
    spec = importlib.util.spec_from_file_location("manifests_check", ROOT / "scripts" / "manifests_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    crds, problems = mod.load_crds(ROOT / "manifests")
    assert not problems
    return mod, crds


def _call():
    return {"fn": "step3vl.stages.train:run_training", "arguments": {"stage": "pretrain"}, "config_yaml": "{}",
            "result_uri": "s3://b/ck/trainjob-result.json"}


def test_trainjob_spec_matches_the_crd_schema(crd_validators):
    mod, crds = crd_validators
    name = trainjob.job_name("pretrain", "key-1")
    assert name == trainjob.job_name("pretrain", "key-1") != trainjob.job_name("pretrain", "key-2")
    body = trainjob.build_trainjob(name, "pretrain", _call(), namespace="step3vl")
    assert mod.validate_object(body, crds) == []
    spec = body["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": TRAINER_RUNTIME}
    tr = spec["trainer"]
    r = DEFAULT.resources("pretrain")
    assert tr["numNodes"] == r.nodes >= 2 and tr["numProcPerNode"] == r.gpus == 8
    assert tr["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8" == tr["resourcesPerNode"]["requests"]["nvidia.com/gpu"]
    assert tr["image"] == TRAINER_IMAGE and tr["args"] == ["stage", "exec", "pretrain"]
    env = {e["name"]: e for e in tr["env"]}
    assert json.loads(env[trainjob.CALL_ENV]["value"]) == _call()
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "step3vl-minio",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert all("value" not in e for k, e in env.items() if "SECRET" in k or "PASSWORD" in k)
    assert spec["activeDeadlineSeconds"] == r.timeout_s
    # every training stage can go this way, with its own shape
    b = trainjob.build_trainjob(trainjob.job_name("sft", "k"), "sft", _call(), namespace="ns", nodes=3, gpus_per_node=4)
    assert mod.validate_object(b, crds) == []
    assert (b["spec"]["trainer"]["numNodes"], b["spec"]["trainer"]["numProcPerNode"]) == (3, 4)
    for stage in ("rlvr", "rlhf", "pacore"):  # the RL loop is one process: one node, one rank seeing its GPUs
        b = trainjob.build_trainjob(trainjob.job_name(stage, "k"), stage, _call(), namespace="ns")
        assert mod.validate_object(b, crds) == [], stage
        tr = b["spec"]["trainer"]
        assert (tr["numNodes"], tr["numProcPerNode"], tr["resourcesPerNode"]["limits"]["nvidia.com/gpu"]) == (1, 1, "8")
        with pytest.raises(trainjob.TrainJobError, match=f"{stage} runs as a single process.*3 copies"):
            trainjob.build_trainjob("x", stage, _call(), namespace="ns", nodes=3)
    with pytest.raises(trainjob.TrainJobError, match="one GPU"):
        trainjob.build_trainjob("x", "data_prep", _call(), namespace="ns")
    # an unknown field is caught by the strict schema (the check is not vacuous)
    body["spec"]["trainer"]["gpus"] = 8
    assert mod.validate_object(body, crds)


class FakeExt:
    def __init__(self, status=None, versions=("v1alpha1",)):
        self.status, self.versions = status, versions

    def read_custom_resource_definition(self, name):
        assert name == "trainjobs.trainer.kubeflow.org"
        if self.status:
            raise ApiException(self.status)
        return SimpleNamespace(spec=SimpleNamespace(versions=[SimpleNamespace(name=v, served=True)
                                                              for v in self.versions]))


class FakeCustom:
    """TrainJobs in memory; ``script`` gives the conditions each successive GET returns."""

    def __init__(self, runtime_status=None, list_status=None, script=()):
        self.runtime_status, self.list_status = runtime_status, list_status
        self.jobs: dict[str, dict] = {}
        self.script = list(script)
        self.created: list[dict] = []
        self.deleted: list[str] = []

    def get_cluster_custom_object(self, group, version, plural, name):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes")
        if self.runtime_status:
            raise ApiException(self.runtime_status)
        return {"metadata": {"name": name}}

    def list_namespaced_custom_object(self, group, version, ns, plural, limit=None):
        if self.list_status:
            raise ApiException(self.list_status)
        return {"items": []}

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise ApiException(409)
        self.jobs[name] = json.loads(json.dumps(body))
        self.created.append(body)
        return body

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        self.deleted.append(name)
        del self.jobs[name]

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        job = self.jobs[name]
        if self.script:
            job["status"] = {"conditions": self.script.pop(0)}
        return job


def _cond(kind, status="True", reason="", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message}


def test_preflight_names_what_is_missing():
    assert trainjob.preflight(FakeCustom(), FakeExt(), "ns") == []
    with pytest.raises(trainjob.TrainJobError, match="Kubeflow Trainer is not installed.*trainjobs.trainer.kubeflow.org"):
        trainjob.preflight(FakeCustom(), FakeExt(status=404), "ns")
    with pytest.raises(trainjob.TrainJobError, match="serves \\['v1'\\], not v1alpha1"):
        trainjob.preflight(FakeCustom(), FakeExt(versions=("v1",)), "ns")
    with pytest.raises(trainjob.TrainJobError, match=f"ClusterTrainingRuntime {TRAINER_RUNTIME} not found.*manifests/base/trainer"):
        trainjob.preflight(FakeCustom(runtime_status=404), FakeExt(), "ns")
    # a namespaced service account: CRD read forbidden, TrainJobs listable; runtime read forbidden
    notes = trainjob.preflight(FakeCustom(runtime_status=403), FakeExt(status=403), "ns")
    assert len(notes) == 2 and "forbidden" in notes[0]
    with pytest.raises(trainjob.TrainJobError, match="not installed"):
        trainjob.preflight(FakeCustom(list_status=404), FakeExt(status=403), "ns")
    with pytest.raises(ApiException):
        trainjob.preflight(FakeCustom(), FakeExt(status=500), "ns")


def test_follow_until_complete_failed_or_timeout():
    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    c = FakeCustom(script=[[], [_cond("Created")], [_cond("Created"), _cond("Complete")]])
    c.jobs["j"] = {"metadata": {"name": "j"}}
    job = trainjob.follow(c, "j", "ns", timeout_s=100, poll_s=1, clock=clock, sleep=sleep)
    assert trainjob.conditions(job)["Complete"]["status"] == "True" and now[0] == 2
    c = FakeCustom(script=[[_cond("Failed", reason="JobFailed", message="node-0 OOMKilled")]])
    c.jobs["j"] = {}
    with pytest.raises(trainjob.TrainJobError, match="TrainJob ns/j failed: JobFailed: node-0 OOMKilled"):
        trainjob.follow(c, "j", "ns", timeout_s=100, poll_s=1, clock=clock, sleep=sleep)
    c = FakeCustom()
    c.jobs["j"] = {"status": {"conditions": [_cond("Created")]}}
    with pytest.raises(trainjob.TrainJobError, match="did not finish within 10s \\(Created=True\\)"):
        trainjob.follow(c, "j", "ns", timeout_s=10, poll_s=3, clock=clock, sleep=sleep)


def test_create_reattaches_to_a_running_job_and_replaces_a_failed_one():
    body = trainjob.build_trainjob("step3vl-sft-abc", "sft", _call(), namespace="ns")
    c = FakeCustom()
    trainjob.create(c, body)
    trainjob.create(c, body)  # a retried task: the same job is followed, not duplicated
    assert len(c.created) == 1 and not c.deleted
    c.jobs["step3vl-sft-abc"]["status"] = {"conditions": [_cond("Failed", reason="x")]}
    trainjob.create(c, body)
    assert c.deleted == ["step3vl-sft-abc"] and len(c.created) == 2


def test_remote_call_round_trip(tmp_path, monkeypatch):
    """The component side builds the call, the job side runs it and writes the summary, the component reads it."""
    import yaml

    from step3vl.stages import rl

    captured = {}

    def fake_stage(stage, cfg, data_dir, init_uri, out_uri, *, ckpt_uri=None, progress=True):
        captured.update(stage=stage, seed=cfg.seed, data_dir=data_dir, init_uri=init_uri, out_uri=out_uri,
                        ckpt_uri=ckpt_uri, progress=progress)
        res = SimpleNamespace(iteration=7, resumed_from=5)
        return SimpleNamespace(model_uri=out_uri + "/model", metrics={"reward_last": 0.5}, result=res)

    fake_stage.__module__, fake_stage.__qualname__ = "step3vl.stages.rl", "run_rl"
    monkeypatch.setattr(rl, "run_rl", fake_stage)
    cfg_yaml = yaml.safe_dump({"seed": 3})
    work = str(tmp_path / "ckpt")

    class Custom(FakeCustom):
        def create_namespaced_custom_object(self, group, version, ns, plural, body):
            out = super().create_namespaced_custom_object(group, version, ns, plural, body)
            env = {e["name"]: e.get("value") for e in body["spec"]["trainer"]["env"]}
            trainjob.exec_call(json.loads(env[trainjob.CALL_ENV]))  # what `step3vl stage exec` does on rank 0
            self.script = [[_cond("Complete")]]
            return out

    monkeypatch.setenv("STEP3VL_NAMESPACE", "team-a")
    monkeypatch.setenv(trainjob.NODES_ENV, "1")
    monkeypatch.setenv(trainjob.GPUS_ENV, "4")
    from step3vl.pipeline.runtime import load_config

    custom = Custom()
    out = trainjob.run_remote("rlvr", rl.run_rl, ("rlvr",),
                              {"cfg": load_config(cfg_yaml), "data_dir": str(tmp_path), "init_uri": "/s3/b/sft/model",
                               "out_uri": "/s3/b/rlvr/model", "ckpt_uri": work},
                              config_yaml=cfg_yaml, work_uri=work, apis=(custom, FakeExt()), poll_s=0)
    assert captured == {"stage": "rlvr", "seed": 3, "data_dir": str(tmp_path), "init_uri": "s3://b/sft/model",
                        "out_uri": "s3://b/rlvr/model", "ckpt_uri": work, "progress": False}
    assert out.model_uri == "s3://b/rlvr/model/model" and out.metrics == {"reward_last": 0.5}
    assert (out.result.step, out.result.resumed_from) == (7, 5)
    body = custom.created[0]
    assert body["metadata"]["namespace"] == "team-a" and body["spec"]["trainer"]["numNodes"] == 1
    assert body["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"


def test_cluster_target_trainjob_executor_moves_gpus_to_the_trainjob(tmp_path):
    import yaml

    from step3vl import config
    from step3vl.pipeline.submit import compile_pipeline

    cfg = config.load(config.PipelineConfig, ROOT / "conf" / "pipeline" / "step3vl-10b.yaml")
    out = compile_pipeline(cfg, tmp_path / "p.yaml", ClusterSettings(executor="trainjob"))
    spec, platform = yaml.safe_load_all(out.read_text())
    ex = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in ("pretrain", "sft", "rlvr", "rlhf", "pacore"):
        c = ex[f"exec-{stage}"]["container"]
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env[trainjob.EXECUTOR_ENV] == "trainjob" and int(env[trainjob.GPUS_ENV]) == 8, stage
        assert "accelerator" not in c["resources"], stage
        assert "emptyDirMounts" not in k8s[f"exec-{stage}"], stage  # the TrainJob runtime mounts the job's /tmp
    assert ex["exec-evaluate"]["container"]["resources"]["accelerator"]["resourceCount"] == "1"


def test_stage_execute_dispatches_on_the_executor_env(monkeypatch, micro_cfg):
    from step3vl.pipeline import runtime

    st = runtime.Stage("rlvr", micro_cfg, "run-1", 0.0, config_yaml="{}")
    seen = []

    def fn(stage, cfg, data_dir):
        seen.append((stage, cfg is micro_cfg, data_dir))
        return "in-pod"

    monkeypatch.delenv(trainjob.EXECUTOR_ENV, raising=False)
    assert st.execute(fn, "rlvr", data_dir="/d", work_uri="/w") == "in-pod" and seen == [("rlvr", True, "/d")]
    monkeypatch.setenv(trainjob.EXECUTOR_ENV, "trainjob")
    monkeypatch.setattr(trainjob, "run_remote", lambda stage, f, args, kwargs, **kw: (
        "remote", stage, args, kwargs["data_dir"], kwargs["cfg"] is micro_cfg, kw["work_uri"], kw["config_yaml"]))
    assert st.execute(fn, "rlvr", data_dir="/d", work_uri="/w") == ("remote", "rlvr", ("rlvr",), "/d", True, "/w", "{}")
    assert len(seen) == 1
    # a model a TrainJob published in object storage: downstream stages load it from there
    assert runtime.model_dir(SimpleNamespace(path="/s3/b/x", metadata={"model_uri": "s3://b/ck/model"})) == "s3://b/ck/model"
    assert runtime.model_dir(SimpleNamespace(path="/p", metadata={"checkpoint": "model"})) == "/p/model"


@pytest.mark.parametrize("uri, sent", [("http://mlflow.example:5000", True), ("sqlite:///component/mlflow.db", False)])
def test_trainjob_rank0_logs_the_stage_curves_into_the_components_run(uri, sent, tmp_path, monkeypatch, caplog):
    """The per-step metrics of a stage run as a TrainJob reach the component's MLflow run (a tracking server);
    a store on the component's own disk cannot be reached from the job, and the job says so."""
    import yaml

    from step3vl import tracking
    from step3vl.stages import rl

    received: list[tuple[str, str, int, float]] = []
    monkeypatch.setattr(tracking, "_send", lambda client, run_id, batch: received.extend(
        (run_id, m["key"], m["step"], m["value"]) for m in batch if m["kind"] == "metric"))
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def fake_stage(stage, cfg, data_dir, init_uri, out_uri, *, ckpt_uri=None, progress=True):
        for it in range(1, 4):
            tracking.log_metrics({f"{stage}/reward_mean": it / 10}, step=it)
        return SimpleNamespace(model_uri=out_uri + "/model", metrics={}, result=SimpleNamespace(iteration=3))

    fake_stage.__module__, fake_stage.__qualname__ = "step3vl.stages.rl", "run_rl"
    monkeypatch.setattr(rl, "run_rl", fake_stage)
    body = trainjob.build_trainjob("j", "rlvr", _call(), namespace="ns", run_id="run-42")
    env = {e["name"]: e.get("value") for e in body["spec"]["trainer"]["env"]}
    assert env[trainjob.RUN_ENV] == "run-42" and trainjob.RUN_ENV not in env[trainjob.CALL_ENV]
    monkeypatch.setenv(trainjob.RUN_ENV, "run-42")
    call = {"fn": "step3vl.stages.rl:run_rl", "config_yaml": yaml.safe_dump({"tracking": {"uri": uri}}),
            "arguments": {"stage": "rlvr", "data_dir": str(tmp_path), "init_uri": "a", "out_uri": str(tmp_path / "o")},
            "result_uri": str(tmp_path / "result.json")}
    trainjob.exec_call(call)
    assert received == ([("run-42", "rlvr/reward_mean", it, it / 10) for it in range(1, 4)] if sent else [])
    assert tracking._SINK is None
    assert sent or "not a server" in caplog.text


@pytest.mark.parametrize("stage", ["rlvr", "rlhf", "pacore"])
def test_rl_stages_refuse_to_run_as_several_ranks(stage, monkeypatch, micro_cfg, tmp_path):
    """Under torchrun every rank would run the whole RL stage and write the same checkpoints."""
    from step3vl.errors import Step3VLError
    from step3vl.stages import pacore, rlhf
    from step3vl.stages.rl import run_rl

    fn = {"rlvr": lambda: run_rl("rlvr", micro_cfg, tmp_path, "missing", str(tmp_path / "o")),
          "rlhf": lambda: rlhf.run(micro_cfg, tmp_path, "missing", str(tmp_path / "o")),
          "pacore": lambda: pacore.run(micro_cfg, tmp_path, "missing", str(tmp_path / "o"))}[stage]
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(Step3VLError, match=f"{stage}: started as 16 processes"):
        fn()
    assert not (tmp_path / "o").exists()


def test_a_trainjob_stages_curves_artifact_points_at_its_mlflow_run(monkeypatch, micro_cfg, tmp_path):
    """The TrainJob's rank 0 drew and logged the curves into the stage's MLflow run; the KFP HTML says where."""
    from step3vl.pipeline import lineage, runtime

    monkeypatch.setattr(lineage, "checkpoint_digest", lambda uri: "sha")
    st = runtime.Stage("rlvr", micro_cfg, "run-1", 0.0, config_yaml="{}")
    art = lambda name: SimpleNamespace(name=name, path=str(tmp_path / name), metadata={},  # noqa: E731
                                       log_metric=lambda k, v: None)
    model, metrics, curves = art("model"), art("metrics"), art("curves")
    out = SimpleNamespace(model_uri="s3://b/ck/model", metrics={"reward_last": 0.5}, plot=None,
                          result=SimpleNamespace(step=3, iteration=3, resumed_from=None), trainjob="step3vl-rlvr-abc")
    st.publish_rl(out, model, metrics, curves)
    page = Path(curves.path).read_text()
    assert "TrainJob <code>step3vl-rlvr-abc</code>" in page and "MLflow run <code>run-1</code>" in page
    assert model.metadata["model_uri"] == "s3://b/ck/model"
    assert json.loads(Path(model.path, "REMOTE.json").read_text()) == {"model_uri": "s3://b/ck/model"}



def test_a_data_prep_published_to_s3_leaves_only_a_pointer_in_its_artifact(micro_cfg, tmp_path):
    """Data prep's output published to object storage (``storage.root`` on S3): the ``Dataset`` artifact, which
    KFP's launcher downloads whole into every pod that consumes it, holds only where the data is."""
    from step3vl.pipeline import runtime
    from step3vl.stages.data import DataPrepOutputs

    st = runtime.Stage("data_prep", micro_cfg, "run-1", 0.0, config_yaml="{}")
    art = lambda name: SimpleNamespace(name=name, path=str(tmp_path / name), metadata={},  # noqa: E731
                                       log_metric=lambda k, v: None)
    data, metrics, report = art("data"), art("metrics"), art("report")
    out_dir = Path(data.path)
    (out_dir / "reports").mkdir(parents=True)
    (out_dir / "reports" / "eval.md").write_text("## gate PASSED\n")
    (out_dir / "tokenizer").mkdir()
    (out_dir / "tokenizer" / "tokenizer.json").write_text("{}")
    manifest = {"sets": {"eval": {"n_records": 3, "content_hash": "h"}}, "tokenizer": {"vocab_size": 9}}
    (out_dir / "data_manifest.json").write_text(json.dumps(manifest))
    st.publish_data(DataPrepOutputs(out_dir, manifest, "s3://b/root/data/0123"), data, metrics, report)
    assert sorted(p.name for p in out_dir.iterdir()) == ["REMOTE.json"]
    assert json.loads((out_dir / "REMOTE.json").read_text()) == {"data_uri": "s3://b/root/data/0123"}
    assert data.metadata["data_uri"] == "s3://b/root/data/0123" and data.metadata["digest"]
    assert Path(report.path).read_text() == "## gate PASSED\n"
    assert runtime.data_dir(data) == "s3://b/root/data/0123"
    del data.metadata["data_uri"]  # a pointer without its metadata is not read as a data directory
    with pytest.raises(RuntimeError, match="points to .*s3://b/root/data/0123.* has no data_uri"):
        runtime.data_dir(data)
    local = art("local")
    assert runtime.data_dir(local) == local.path


def test_a_training_stage_writes_its_model_into_its_artifact_or_to_the_s3_storage_root(micro_cfg, tmp_path):
    from dataclasses import replace

    from step3vl.config import StorageConfig
    from step3vl.pipeline import runtime

    model = SimpleNamespace(path=str(tmp_path / "model"), uri="s3://mlpipeline/v2/artifacts/r1/sft/model")
    assert runtime.Stage("sft", micro_cfg, "run-1", 0.0).model_location(model) == model.path
    on_s3 = replace(micro_cfg, storage=StorageConfig(root="s3://b/root"))
    where = runtime.Stage("sft", on_s3, "run-1", 0.0).model_location(model)
    assert re.fullmatch(r"s3://b/root/models/sft-[0-9a-f]{16}", where)
    assert runtime.Stage("sft", on_s3, "run-2", 0.0).model_location(model) == where  # a retry: the same place
    other = SimpleNamespace(path=model.path, uri="s3://mlpipeline/v2/artifacts/r2/sft/model")
    assert runtime.Stage("sft", on_s3, "run-3", 0.0).model_location(other) != where  # another task: its own


def test_pod_executor_gives_data_parallel_stages_the_pods_ranks(monkeypatch, micro_cfg):
    """In-pod, pre-training and SFT run on ``$STEP3VL_LOCAL_PROCS`` ranks (default: one per GPU of the pod); the RL
    stages, one process, stay in-process; a bad value is named."""
    from step3vl.pipeline import runtime
    from step3vl.stages import rl, train

    monkeypatch.delenv(trainjob.EXECUTOR_ENV, raising=False)
    monkeypatch.setenv(trainjob.LOCAL_PROCS_ENV, "4")
    assert trainjob.local_processes(train.run_training) == 4 and trainjob.local_processes(rl.run_rl) == 1
    monkeypatch.setattr(trainjob, "run_local", lambda stage, f, args, kwargs, **kw: ("local", stage, kw["nprocs"]))
    st = runtime.Stage("pretrain", micro_cfg, "run-1", 0.0, config_yaml="{}")
    assert st.execute(train.run_training, "pretrain", data_dir="/d", out_uri="/o", work_uri="/w") == (
        "local", "pretrain", 4)
    for bad in ("0", "two"):
        monkeypatch.setenv(trainjob.LOCAL_PROCS_ENV, bad)
        with pytest.raises(trainjob.TrainJobError, match=f"STEP3VL_LOCAL_PROCS={bad!r}"):
            trainjob.local_processes(train.run_training)
    monkeypatch.delenv(trainjob.LOCAL_PROCS_ENV)
    assert trainjob.local_processes(train.run_training) == 1  # this machine has no GPU: in-process


@pytest.mark.slow
def test_pod_executor_runs_pretraining_on_the_pods_ranks_logging_into_its_run(micro_data, tmp_path, monkeypatch,
                                                                               capfd):
    """A pod with several GPUs: the component runs pre-training on one rank each (``torchrun --standalone``, as a
    TrainJob's node does); here 2 CPU ranks (DeepSpeed ZeRO-2 on gloo). Rank 0 logs the per-step curves into the
    component's MLflow run, here a SQLite store on the pod's own disk, which its ranks can reach."""
    from mlflow import MlflowClient

    from step3vl import config
    from step3vl.model.loading import load_model
    from step3vl.pipeline import runtime
    from step3vl.stages.train import run_training

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.load(config.PipelineConfig, ROOT / "tests" / "conf" / "micro.yaml", [
        "pretrain.batch_size=8", "pretrain.micro_batch_size=2", "pretrain.zero_stage=2", "pretrain.eval_data=",
        "pretrain.checkpoint_every=2", "pretrain.log_every=1", f"tracking.uri={db}",
        "pretrain.phases=[{data: pretrain_broad, steps: 4, lr_start: 1.0e-3, lr_end: 1.0e-3}]",
    ])
    client = MlflowClient(db)
    run = client.create_run(client.create_experiment("pod", artifact_location=(tmp_path / "art").as_uri()))
    monkeypatch.delenv(trainjob.EXECUTOR_ENV, raising=False)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):  # MLflow exports what tests set
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(trainjob.LOCAL_PROCS_ENV, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    st = runtime.Stage("pretrain", cfg, run.info.run_id, 0.0, config_yaml=config.dump_yaml(cfg))
    ck = str(tmp_path / "checkpoints")
    out = st.execute(run_training, "pretrain", data_dir=str(micro_data.out_dir), out_uri=str(tmp_path / "out"),
                     ckpt_uri=ck, progress=False, work_uri=ck)
    printed = " ".join(capfd.readouterr().out.split())  # the console wraps long lines
    assert printed.count(f"pretrain: {tmp_path / 'out' / 'model'} after 4 steps") == 2  # one line per rank
    assert out.result.step == 4 and out.model_uri == str(tmp_path / "out" / "model") and out.trainjob == ""
    assert Path(out.plot).is_file() and out.metrics["steps"] == 4.0
    assert load_model(out.model_uri).tokenizer_dir is not None
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).data.metrics["pretrain/final_loss"] == out.metrics["final_loss"]


def test_ranks_told_a_run_the_store_does_not_have_fail_before_any_work(tmp_path, monkeypatch):
    """A wrong run id or store handed to the ranks (a TrainJob's, or a pod's own) is named before the stage runs,
    instead of being taken for a lost server and retried until the flush timeout (300 s by default)."""
    import time

    import mlflow
    import yaml

    from step3vl import tracking
    from step3vl.stages import rl

    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("x", artifact_location=(tmp_path / "art").as_uri()))
    ran: list[str] = []

    def fake_stage(stage, cfg, data_dir, init_uri, out_uri, *, ckpt_uri=None, progress=True):
        ran.append(stage)
        tracking.log_metrics({f"{stage}/loss": 1.0}, step=1)
        return SimpleNamespace(model_uri=out_uri + "/model", metrics={}, result=SimpleNamespace(iteration=1))

    fake_stage.__module__, fake_stage.__qualname__ = "step3vl.stages.rl", "run_rl"
    monkeypatch.setattr(rl, "run_rl", fake_stage)
    monkeypatch.setenv(trainjob.LOCAL_ENV, "1")  # ranks in the component's pod: a SQLite store is reachable
    call = {"fn": "step3vl.stages.rl:run_rl", "config_yaml": yaml.safe_dump({"tracking": {"uri": uri}}),
            "arguments": {"stage": "rlvr", "data_dir": str(tmp_path), "init_uri": "a", "out_uri": str(tmp_path / "o")},
            "result_uri": str(tmp_path / "result.json")}
    monkeypatch.setenv(trainjob.RUN_ENV, "0123abcd")
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingRunMissing, match="MLflow run 0123abcd does not exist in sqlite:///"):
        trainjob.exec_call(call)
    assert time.monotonic() - t0 < 30 and ran == [] and tracking._SINK is None
    journals = tmp_path / "home" / "tracking-journal"
    assert not journals.exists() or not any(journals.iterdir())  # nothing journaled for a run that is not there
    monkeypatch.setenv(trainjob.RUN_ENV, run.info.run_id)
    trainjob.exec_call(call)
    assert ran == ["rlvr"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "rlvr/loss")] == [1.0]


@pytest.mark.parametrize("pipeline", ["tiny.yaml", "step3vl-10b.yaml"])
def test_the_rl_stages_name_data_sets_their_config_prepares(pipeline):
    """An RL stage's node copies only the sets it names (data_sets): each must be one data prep makes."""
    from step3vl import config
    from step3vl.stages import pacore, rl, rlhf

    cfg = config.load(config.PipelineConfig, ROOT / "conf" / "pipeline" / pipeline)
    named = {"rlvr": rl.data_sets(cfg, "rlvr"), "rlhf": rlhf.data_sets(cfg), "pacore": pacore.data_sets(cfg)}
    for stage, sets in named.items():
        assert sets and set(sets) <= set(cfg.data.sets), (stage, sets)
    assert set(named["rlhf"]) == {"preference", cfg.rlhf.data, "eval"}


@pytest.mark.parametrize("world, code", [("2", 0), ("2", 3), ("1", 0), (None, 0)])
def test_a_finished_rank_leaves_with_its_output_flushed(world, code):
    """A torchrun rank leaves without interpreter finalisation (leave_rank), its buffered stdout and logging still
    delivered and its exit code kept; a process that is not a rank goes on (its finalisation runs as usual)."""
    import subprocess
    import sys

    prog = ("import logging, sys\n"
            "from step3vl.pipeline import trainjob\n"
            "logging.basicConfig(stream=sys.stderr, level=logging.INFO)\n"
            "print('stage: done')\n"  # stdout is a pipe here: block-buffered until flushed
            "logging.getLogger('step3vl').info('logged before leaving')\n"
            "import atexit; atexit.register(lambda: print('finalised', flush=True))\n"
            f"trainjob.leave_rank({code})\n"
            "print('went on')\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    if world is not None:
        env["WORLD_SIZE"] = world
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == code, p.stderr
    assert "logged before leaving" in p.stderr
    if world == "2":
        assert p.stdout == "stage: done\n"  # flushed, and nothing after: no atexit, no finalisation
    else:
        assert p.stdout == "stage: done\nwent on\nfinalised\n"
