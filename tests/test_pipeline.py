"""The KFP pipeline: golden compiled YAML, cluster settings, thin components, cache keys, the local runner.

The end-to-end test runs the real ``step3vl run`` on the micro config: a run killed during SFT resumes
from its checkpoint and ends with one registered version carrying eval metrics, a rerun is all cache
hits, and ``--from-stage rlvr`` imports the earlier run's SFT model.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

from step3vl import config
from step3vl.pipeline.runtime import config_text

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "pipelines" / "step3vl-10b.yaml"
CONF_10B = ROOT / "conf" / "pipeline" / "step3vl-10b.yaml"
MICRO = ROOT / "tests" / "conf" / "micro.yaml"
EXE = shutil.which("step3vl", path=str(Path(sys.executable).parent))
TRAINING = ("pretrain", "sft", "rlvr", "rlhf", "pacore")
ALL_STAGES = ["data_prep", "pretrain", "sft", "rlvr", "rlhf", "pacore", "evaluate", "register", "deploy_serving"]


@pytest.fixture(scope="module")
def module():
    from step3vl.pipeline.dag import pipeline_module

    return pipeline_module()


@pytest.fixture(scope="module")
def compiled_10b(tmp_path_factory):
    from step3vl.pipeline.submit import compile_pipeline

    out = compile_pipeline(config.load(config.PipelineConfig, CONF_10B), tmp_path_factory.mktemp("kfp") / "p.yaml")
    return out.read_text()


def _docs(text: str) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(text)
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


# --------------------------------------------------------------------------- compiled pipeline


def test_compiled_10b_pipeline_is_up_to_date(compiled_10b):
    assert GOLDEN.is_file(), "missing pipelines/step3vl-10b.yaml"
    assert compiled_10b == GOLDEN.read_text(), (
        "pipelines/step3vl-10b.yaml is stale: regenerate it with "
        "`step3vl compile --config conf/pipeline/step3vl-10b.yaml --out pipelines/step3vl-10b.yaml`")


def test_10b_pipeline_gpus_secrets_retries(compiled_10b, module):
    spec, k8s = _docs(compiled_10b)
    executors = spec["deploymentSpec"]["executors"]
    tasks = spec["root"]["dag"]["tasks"]
    assert list(module.STAGES) == ALL_STAGES
    for stage in module.STAGES:
        ex = f"exec-{stage.replace('_', '-')}"
        container = executors[ex]["container"]
        plat = k8s[ex]
        assert container["image"] == "ghcr.io/step3vl/trainer:" + __import__("step3vl").__version__
        assert "pip install" not in json.dumps(container["command"])  # the image has everything
        secrets = {s["secretName"]: {k["envVar"] for k in s["keyToEnv"]} for s in plat["secretAsEnv"]}
        assert secrets["step3vl-minio"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert secrets["step3vl-mlflow"] == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["AWS_ENDPOINT_URL"].startswith("http")
        assert "AWS_SECRET_ACCESS_KEY" not in env
        assert int(plat["activeDeadlineSeconds"]) > 0
        assert container["resources"]["resourceMemoryLimit"]
        gpu = container["resources"].get("accelerator")
        if stage in TRAINING:
            assert gpu["resourceType"] == "nvidia.com/gpu" and int(gpu["resourceCount"]) >= 1, stage
            assert plat["nodeSelector"]["labels"], stage
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in plat["tolerations"]
            assert tasks[stage.replace("_", "-")]["retryPolicy"]["maxRetryCount"] >= 1
        if stage in ("data_prep", "register", "deploy_serving"):
            assert gpu is None and "nodeSelector" not in plat
    assert {e["name"]: e["value"] for e in executors["exec-deploy-serving"]["container"]["env"]}[
        "STEP3VL_SERVING"] == "kubernetes"
    assert tasks["register"]["inputs"]["parameters"]["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    # the DAG: each training stage starts from the previous one's model; evaluate sees all five
    producer = {n: {a["taskOutputArtifact"]["producerTask"] for a in t["inputs"]["artifacts"].values()}
                for n, t in tasks.items() if "artifacts" in t.get("inputs", {})}
    assert producer["rlvr"] == {"data-prep", "sft"} and producer["pacore"] == {"data-prep", "rlhf"}
    assert producer["evaluate"] == {"data-prep", "pretrain", "sft", "rlvr", "rlhf", "pacore"}
    assert producer["register"] == {"data-prep", "pacore", "evaluate"} and producer["deploy-serving"] == {"register"}
    # the compiled package carries the resolved 10B config as its default
    default = spec["root"]["inputDefinitions"]["parameters"]["config_yaml"]["defaultValue"]
    cfg = config.from_dict(config.PipelineConfig, yaml.safe_load(default))
    assert cfg == config.load(config.PipelineConfig, CONF_10B)
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"config_yaml", "mlflow_parent_run_id",
                                                                   "pipeline_run_name"}


def test_10b_data_prep_is_a_plan_its_parts_in_parallel_and_a_merge(compiled_10b):
    """data_prep compiles to data-plan → a ParallelFor of data-part over the plan's part indices (a bounded number at
    once) → data-prep, which takes the plan and every part; each a data_prep-sized pod."""
    from step3vl.pipeline.cluster import DEFAULT

    spec, k8s = _docs(compiled_10b)
    root = spec["root"]["dag"]["tasks"]
    (loop,) = [t for t in root.values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"]["parallelismLimit"] == DEFAULT.parallel_parts > 1
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--data-plan-Output"
    assert list(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]) == ["data-part"]
    inputs = root["data-prep"]["inputs"]["artifacts"]
    assert inputs["plan"]["taskOutputArtifact"]["producerTask"] == "data-plan"
    assert inputs["parts"]["taskOutputArtifact"]["producerTask"] == loop["taskInfo"]["name"]
    executors = spec["deploymentSpec"]["executors"]
    want = DEFAULT.resources("data_prep")
    for ex in ("exec-data-plan", "exec-data-part", "exec-data-prep"):
        res = executors[ex]["container"]["resources"]
        assert (res["cpuRequest"], res["memoryLimit"]) == (float(want.cpu), float(want.memory.removesuffix("Gi")) *
                                                            2**30 / 1e9), ex
        assert int(k8s[ex]["activeDeadlineSeconds"]) == want.timeout_s, ex


def test_10b_pod_executor_gives_training_and_evaluate_pods_the_temp_space_model_info_plans(compiled_10b):
    """In-pod training keeps the node's cache and rank 0's checkpoint staging in /tmp, as a TrainJob node does: an
    emptyDir sized like the TrainJob runtime's; the evaluate pod holds one model at a time there."""
    from step3vl.config import ModelConfig
    from step3vl.model.info import model_info

    storage = model_info(config.load(ModelConfig, ROOT / "conf/model/step3vl-10b.yaml")).storage
    need = {**dict.fromkeys(TRAINING, storage["trainjob_node_tmp_gib"]), "evaluate": storage["model_file_gib"]}
    _, k8s = _docs(compiled_10b)
    for stage, gib in need.items():
        (tmp,) = [m for m in k8s[f"exec-{stage}"]["emptyDirMounts"] if m["mountPath"] == "/tmp"]
        have = float(tmp["sizeLimit"].removesuffix("Gi"))
        assert have >= 1.1 * gib, f"{stage}: /tmp holds {have:.0f} GiB, needs {gib:.0f} GiB"
    assert not [m for m in k8s["exec-register"].get("emptyDirMounts", []) if m["mountPath"] == "/tmp"]


def test_resolved_config_yaml_round_trips():
    from step3vl.pipeline.runtime import load_config

    for path in (CONF_10B, ROOT / "conf" / "pipeline" / "tiny.yaml", MICRO):
        cfg = config.load(config.PipelineConfig, path)
        back = load_config(config_text(cfg))
        assert back == cfg and config.config_hash(back) == config.config_hash(cfg)


# --------------------------------------------------------------------------- components


def test_components_are_thin_wrappers(module):
    """Bodies only open the stage, call one step3vl.stages function and publish: no ML logic."""
    for stage, comp in module.STAGES.items():
        fn = ast.parse(textwrap.dedent(inspect.getsource(comp.python_func))).body[0]
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # docstring
        assert len(body) <= 4, f"{stage}: component body has {len(body)} statements"
        for node in ast.walk(fn):
            assert not isinstance(node, (ast.For, ast.While, ast.ListComp, ast.DictComp, ast.Lambda)), stage
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert mod.startswith(("step3vl.pipeline", "step3vl.stages")), f"{stage} imports {mod}"
        names = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        assert not names & {"torch", "mlflow", "yaml", "open"}, stage
        params = inspect.signature(comp.python_func).parameters
        assert list(params)[:3] == ["config_yaml", "mlflow_parent_run_id", "pipeline_run_name"]
        assert comp.component_spec.implementation.container.image.startswith("ghcr.io/step3vl/trainer:")
    # data prep's earlier tasks too (they open no MLflow run: the merge does)
    from components.data_prep import data_part, data_plan

    for comp in (data_plan, data_part):
        fn = ast.parse(textwrap.dedent(inspect.getsource(comp.python_func))).body[0]
        assert len(fn.body) <= 5 and not [n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While, ast.ListComp))]
        assert list(inspect.signature(comp.python_func).parameters)[0] == "config_yaml"


# --------------------------------------------------------------------------- cache keys and lineage


def _keys(module, cfg_yaml, **kw):
    from step3vl.pipeline.dag import LocalTarget

    target = LocalTarget(cfg_yaml, code=kw.pop("code", "code-1"), **kw)
    module.build_pipeline(target)
    return target.keys


def test_local_cache_keys_are_input_addressed(module, micro_cfg):
    y = config_text(micro_cfg)
    a = _keys(module, y)
    assert list(a) == list(module.STAGES) and len(set(a.values())) == len(a)
    assert _keys(module, y) == a  # stable
    other = _keys(module, config_text(config.load(config.PipelineConfig, MICRO, ["sft.warmup_steps=2"])))
    assert all(other[s] != a[s] for s in a)  # the whole resolved config is the key
    assert all(v != a[k] for k, v in _keys(module, y, code="code-2").items())
    # an upstream change reaches every downstream key, not the stages before it
    from step3vl.pipeline.dag import ReusedOutput, ReusedStage

    reuse = {"data_prep": ReusedStage("k0", {o: ReusedOutput(f"/x/{o}", "system.Dataset") for o in
                                             ("data", "metrics", "report")})}
    b = _keys(module, y, reuse=reuse)
    assert b["data_prep"] == "k0" and all(b[s] != a[s] for s in ALL_STAGES[1:])


def test_tracking_context_is_not_in_the_cache_key(module, micro_cfg):
    from step3vl.pipeline.dag import STEP_KEY_ENV, LocalTarget

    target = LocalTarget(config_text(micro_cfg), code="c")
    spec = module.build_pipeline(target).pipeline_spec
    tasks = dict(spec.root.dag.tasks)
    (loop,) = [name for name, t in tasks.items() if t.WhichOneof("iterator")]
    assert tasks.pop("data-plan").caching_options.cache_key == target.step_keys["data_prep.plan"]
    # data-part runs once per part: KFP's own key (its item, its inputs' URIs) with the step's key in its env
    part = spec.components[tasks.pop(loop).component_ref.name].dag.tasks["data-part"]
    assert part.caching_options.enable_cache and not part.caching_options.cache_key
    env = {e["name"]: e["value"] for e in spec.deployment_spec["executors"]["exec-data-part"]["container"]["env"]}
    assert env[STEP_KEY_ENV] == target.step_keys["data_prep.part"]
    for name, task in tasks.items():
        stage = name.replace("-", "_")
        assert task.caching_options.enable_cache and task.caching_options.cache_key == target.keys[stage]
    assert len(set(target.step_keys.values()) | set(target.keys.values())) == len(target.step_keys) + len(target.keys)


def test_reused_stages_become_importers(module, micro_cfg):
    from step3vl.pipeline.dag import LocalTarget, ReusedOutput, ReusedStage

    outs = {"data_prep": ("data", "metrics", "report"), "pretrain": ("model", "metrics", "loss_curve")}
    reuse = {s: ReusedStage(f"key-{s}", {o: ReusedOutput(f"/prev/{s}/{o}", "system.Artifact", {"digest": "d"})
                                         for o in names}) for s, names in outs.items()}
    spec = json_format.MessageToDict(
        module.build_pipeline(LocalTarget(config_text(micro_cfg), reuse=reuse, code="c")).pipeline_spec)
    tasks = spec["root"]["dag"]["tasks"]
    assert "data-prep" not in tasks and "pretrain" not in tasks and {"sft", "evaluate"} <= set(tasks)
    importers = [ex["importer"] for ex in spec["deploymentSpec"]["executors"].values() if "importer" in ex]
    assert sorted(i["artifactUri"]["constant"] for i in importers) == sorted(
        f"/prev/{s}/{o}" for s, names in outs.items() for o in names)
    assert all(i["metadata"] == {"digest": "d"} for i in importers)
    # sft reads the imported data and model
    sft_inputs = tasks["sft"]["inputs"]["artifacts"]
    assert {a["taskOutputArtifact"]["producerTask"] for a in sft_inputs.values()} <= {t for t in tasks if
                                                                                        t.startswith("importer")}


def test_checkpoint_location_is_stable_and_specific(micro_cfg, tmp_path, monkeypatch):
    from step3vl.pipeline.lineage import checkpoint_location

    monkeypatch.chdir(tmp_path)
    a = checkpoint_location("sft", micro_cfg, ["data", "model"])
    assert a == checkpoint_location("sft", micro_cfg, ["data", "model"])
    assert a.startswith(str(tmp_path / ".step3vl" / "artifacts" / "checkpoints" / "sft-"))
    assert a != checkpoint_location("sft", micro_cfg, ["data", "other-model"])
    assert a != checkpoint_location("pretrain", micro_cfg, ["data", "model"])
    changed = config.load(config.PipelineConfig, MICRO, ["sft.warmup_steps=2"])
    assert a != checkpoint_location("sft", changed, ["data", "model"])
    s3 = config.load(config.PipelineConfig, MICRO, ["storage.root=s3://b/p"])
    assert checkpoint_location("sft", s3, ["data", "model"]) == "s3://b/p/checkpoints/" + a.rsplit("/", 1)[1]
    moved = config.load(config.PipelineConfig, MICRO, ["tracking.experiment=elsewhere"])
    assert checkpoint_location("sft", moved, ["data", "model"]) == a


def test_code_digest_follows_what_a_stage_can_import(tmp_path):
    from step3vl.pipeline.lineage import code_digest

    pkg = tmp_path / "step3vl"
    files = {
        "__init__.py": "",
        "a.py": "def run():\n    from step3vl import b\n    from step3vl.fam import thing\n",
        "b.py": "from .c_rel import x\n",
        "c_rel.py": "x = 1\n",
        "cli.py": "from step3vl import a\n",  # imports the stage, is not imported by it
        "other.py": "y = 1\n",
        "fam/__init__.py": "import importlib\nthing = [importlib.import_module(f'{__name__}.{m}') for m in ('x',)]\n",
        "fam/x.py": "z = 1\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    d = code_digest({"step3vl.a"}, pkg)
    for rel in ("cli.py", "other.py"):
        (pkg / rel).write_text("changed = True\n")
        assert code_digest({"step3vl.a"}, pkg) == d, rel
    for rel in ("a.py", "c_rel.py", "fam/x.py", "__init__.py"):
        (pkg / rel).write_text((pkg / rel).read_text() + "# edit\n")
        assert code_digest({"step3vl.a"}, pkg) != d, rel
        d = code_digest({"step3vl.a"}, pkg)


# --------------------------------------------------------------------------- runner pieces


def test_log_sink_follows_kfp_local_log_lines(tmp_path):
    from step3vl.pipeline.local import LogSink
    from step3vl.pipeline.status import StatusBoard

    board = StatusBoard(["data_prep", "pretrain", "sft"])
    sink = LogSink(tmp_path / "run.log", board, {"data-prep": "data_prep", "pretrain": "pretrain", "sft": "sft"})
    cyan, green, red, reset = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"
    sink.write("03:13:35.004 - INFO - Task data-prep cache hit (key=abc); skipping execution.\n")
    sink.write(f"03:13:35.004 - INFO - Executing task {cyan}'pretrain'{reset}\n")
    assert board.status("data_prep") == "cached" and board.status("pretrain") == "running"
    sink.write("    03:13:36 INFO step3vl.pipeline: pretrain: checkpoints under /x\n    noise")
    sink.write(f"\n03:13:44.1 - INFO - Task {cyan}'pretrain'{reset} finished with status {green}SUCCESS{reset}\n")
    sink.write(f"03:13:45.0 - INFO - Executing task {cyan}'sft'{reset}\n    ValueError: boom\n")
    sink.write(f"03:13:46.1 - ERROR - Task {cyan}'sft'{reset} finished with status {red}FAILURE{reset}\n")
    sink.close()
    assert board.status("pretrain") == "done" and board.stages["pretrain"].detail == "pretrain: checkpoints under /x"
    assert board.status("sft") == "failed" and sink.failed == "sft"
    assert "ValueError: boom" in "\n".join(sink.tails["sft"])
    assert "cache hit" in (tmp_path / "run.log").read_text()


def test_log_sink_keeps_a_planned_stage_running_until_its_last_task(tmp_path):
    """data_prep runs as data-plan, data-part once per part and data-prep: only the last finishes the stage, a failed
    part fails it, and its clock starts with the plan."""
    from step3vl.pipeline.local import LogSink
    from step3vl.pipeline.status import StatusBoard

    board = StatusBoard(["data_prep", "pretrain"])
    sink = LogSink(tmp_path / "run.log", board, {"data-prep": "data_prep", "pretrain": "pretrain"},
                   {"data-plan": "data_prep", "data-part": "data_prep"})
    sink.write("1.0 - INFO - Executing task 'data-plan'\n1.1 - INFO - Task 'data-plan' finished with status SUCCESS\n")
    started = board.stages["data_prep"].started
    sink.write("1.2 - INFO - Executing task 'data-part'\n")
    assert board.status("data_prep") == "running" and board.stages["data_prep"].detail == "data-part"
    sink.write("1.3 - INFO - Task 'data-part' finished with status SUCCESS\n1.4 - INFO - Executing task 'data-prep'\n")
    assert board.status("data_prep") == "running" and board.stages["data_prep"].started == started
    sink.write("1.5 - INFO - Task 'data-prep' finished with status SUCCESS\n")
    assert board.status("data_prep") == "done"
    failing = StatusBoard(["data_prep"])
    sink = LogSink(tmp_path / "run2.log", failing, {"data-prep": "data_prep"}, {"data-part": "data_prep"})
    sink.write("2.0 - INFO - Executing task 'data-part'\n    DataError: boom\n"
               "2.1 - ERROR - Task 'data-part' finished with status FAILURE\n")
    sink.close()
    assert failing.status("data_prep") == "failed" and sink.failed == "data_prep"
    assert "DataError: boom" in "\n".join(sink.tails["data_prep"])


def test_plan_reuse_refuses_what_it_cannot_reuse(tmp_path):
    from step3vl.errors import Step3VLError
    from step3vl.pipeline.local import plan_reuse

    (tmp_path / "data").mkdir()
    prev = {"run_name": "r1", "stages": {
        "data_prep": {"status": "cached", "cache_key": "k", "outputs": {
            "data": {"uri": str(tmp_path / "data"), "type": "system.Dataset", "metadata": {"digest": "d"}}}},
        "pretrain": {"status": "failed", "cache_key": "", "outputs": {}}}}
    stages = ["data_prep", "pretrain", "sft"]
    reuse = plan_reuse(stages, "pretrain", prev)
    assert list(reuse) == ["data_prep"] and reuse["data_prep"].outputs["data"].metadata == {"digest": "d"}
    with pytest.raises(Step3VLError, match="no outputs of pretrain"):
        plan_reuse(stages, "sft", prev)
    with pytest.raises(Step3VLError, match="not a stage"):
        plan_reuse(stages, "rlhf", prev)
    (tmp_path / "data").rmdir()
    with pytest.raises(Step3VLError, match="no longer exists"):
        plan_reuse(stages, "pretrain", prev)


def test_submit_builds_the_run_request(monkeypatch, tmp_path):
    import kfp
    from typer.testing import CliRunner

    from step3vl.cli import app

    calls: dict = {}

    class FakeClient:
        def __init__(self, **kw):
            calls["init"] = kw

        def create_run_from_pipeline_package(self, pipeline_file, **kw):
            calls["package"] = Path(pipeline_file).read_text()
            calls["run"] = kw
            return type("R", (), {"run_id": "run-123"})()

    monkeypatch.setattr(kfp, "Client", FakeClient)
    res = CliRunner().invoke(app, ["submit", "--config", str(CONF_10B), "--host", "http://kfp.example:8888",
                                   "--experiment", "exp1", "--run-name", "r1", "--set", "sft.warmup_steps=300"])
    assert res.exit_code == 0, res.output
    assert "run-123" in res.output
    assert calls["init"] == {"host": "http://kfp.example:8888"}
    run = calls["run"]
    assert run["run_name"] == "r1" and run["experiment_name"] == "exp1"
    args = run["arguments"]
    assert args["pipeline_run_name"] == "r1" and args["mlflow_parent_run_id"] == ""
    cfg = config.from_dict(config.PipelineConfig, yaml.safe_load(args["config_yaml"]))
    assert cfg.sft.warmup_steps == 300 and cfg.name == "step3vl-10b"
    spec, k8s = _docs(calls["package"])
    assert spec["pipelineInfo"]["name"] == "step3vl" and "exec-pretrain" in k8s
    assert run["service_account"] == "step3vl-pipeline"

    # --from-stage rlvr --resume-from: the earlier stages become importers of what that run recorded
    from step3vl.pipeline import local

    outs = {"data_prep": ("data", "metrics", "report"), "pretrain": ("model", "metrics", "loss_curve"),
            "sft": ("model", "metrics", "loss_curve")}
    previous = {"run_name": "r0", "stages": {s: {"status": "done", "cache_key": f"k-{s}", "outputs": {
        o: {"uri": f"s3://b/r0/{s}/{o}", "type": "system.Artifact", "metadata": {}} for o in names}}
        for s, names in outs.items()}}
    monkeypatch.setattr(local, "find_run", lambda ref, cfg: "id-" + ref)
    monkeypatch.setattr(local, "load_outputs", lambda run_id: previous)
    res = CliRunner().invoke(app, ["submit", "--config", str(CONF_10B), "--host", "http://kfp:8888", "--run-name",
                                   "r2", "--from-stage", "rlvr", "--resume-from", "r0"])
    assert res.exit_code == 0, res.output
    assert "reusing data_prep, pretrain, sft from r0" in " ".join(res.output.split())
    spec, _ = _docs(calls["package"])
    tasks = spec["root"]["dag"]["tasks"]
    assert not {"data-prep", "pretrain", "sft"} & set(tasks) and {"rlvr", "deploy-serving"} <= set(tasks)
    uris = {ex["importer"]["artifactUri"]["constant"] for ex in spec["deploymentSpec"]["executors"].values()
            if "importer" in ex}
    assert "s3://b/r0/sft/model" in uris and len(uris) == 9
    previous["stages"]["sft"]["outputs"]["model"]["uri"] = "/home/me/.step3vl/kfp/sft/model"
    res = CliRunner().invoke(app, ["submit", "--config", str(CONF_10B), "--host", "http://kfp:8888",
                                   "--from-stage", "rlvr", "--resume-from", "r0"])
    assert res.exit_code != 0 and "local paths a cluster cannot read" in str(res.exception)


# --------------------------------------------------------------------------- end to end


def _run(cwd: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "STEP3VL_HOME": str(cwd / ".step3vl")}
    return subprocess.run([EXE, "run", "--config", str(MICRO), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, **kw)


def _outputs(cwd: Path, run_id: str) -> dict:
    import mlflow

    from step3vl.pipeline.local import load_outputs

    mlflow.set_tracking_uri(f"sqlite:///{cwd / '.step3vl' / 'mlflow.db'}")
    return load_outputs(run_id)


@pytest.mark.slow
def test_run_killed_resumes_then_reruns_all_cached_then_from_stage(tmp_path, monkeypatch):
    import mlflow

    assert EXE
    # 1. killed during SFT, right after its first checkpoint
    env = {**os.environ, "STEP3VL_HOME": str(tmp_path / ".step3vl")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([EXE, "run", "--config", str(MICRO), "--run-name", "killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp_path / ".step3vl" / "artifacts" / "checkpoints"
    deadline = time.time() + 600
    while not list(ckpts.glob("sft-*/step-000002/MANIFEST.json")):
        assert proc.poll() is None, "the run ended before SFT wrote a checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"killed during sft after {time.perf_counter() - t0:.1f}s")

    # 2. the rerun: data prep and pretrain are cache hits, SFT resumes from its checkpoint, the rest runs
    t0 = time.perf_counter()
    p = _run(tmp_path, "--run-name", "first", "--json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    first = json.loads(p.stdout)
    print(f"micro run after kill: {time.perf_counter() - t0:.1f}s; stages: "
          + ", ".join(f"{s} {v['seconds'] or 0:.1f}s" for s, v in first["stages"].items()))
    st = first["stages"]
    assert [st[s]["status"] for s in ALL_STAGES] == ["cached", "cached"] + ["done"] * 7
    assert 2 <= st["sft"]["metrics"]["resumed_from_step"] < 8
    log = Path(first["log_path"]).read_text()
    assert re.search(r"resuming from \S+sft-\w+/step-0000\d\d at step [2-7]\b", log)  # where SFT continued
    assert st["rlvr"]["metrics"]["resumed_from_iteration"] == 0
    ev = st["evaluate"]["metrics"]
    for stage in ("base", "sft", "rlvr", "rlhf", "pacore"):
        assert f"{stage}/greedy/mean_accuracy" in ev and f"{stage}/sere/text_math/accuracy" in ev, stage
    assert ev["contamination/duplicates"] == 0
    model = st["sft"]["outputs"]["model"]
    assert model["type"] == "system.Model" and Path(model["uri"], "model", "MANIFEST.json").is_file()
    assert model["metadata"]["digest"] and model["metadata"]["mlflow_run_id"] == st["sft"]["mlflow_run_id"]
    msgs = st["pacore"]["outputs"]["messages"]  # the message sets PaCoRe trained on: a Dataset of their own
    assert msgs["type"] == "system.Dataset" and msgs["metadata"]["digest"]
    assert msgs["metadata"]["steps"] == ["step-1", "step-2"]  # micro's curriculum
    assert Path(msgs["uri"], "step-1", "MANIFEST.json").is_file() and list(Path(msgs["uri"], "step-1").glob("*.jsonl"))
    assert not Path(st["pacore"]["outputs"]["model"]["uri"], "messages").exists()  # not inside the model any more
    assert st["pacore"]["metrics"]["step1/messages_reused"] == 0  # made here, and kept for later runs to reuse
    assert len(list((tmp_path / ".step3vl" / "artifacts" / "pacore-message-cache").iterdir())) == 2  # one per step
    assert _outputs(tmp_path, first["mlflow_run_id"]) == first  # recorded in the MLflow parent run
    # exactly one registered version, the PaCoRe model, carrying its eval metrics and lineage
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'step3vl-micro'")
    assert [str(v.version) for v in versions] == ["1"] and st["register"]["metrics"]["version"] == 1
    tags = versions[0].tags
    assert versions[0].source == str(Path(st["pacore"]["outputs"]["model"]["uri"], "model"))
    assert tags["step3vl.stage"] == "pacore" and tags["step3vl.mlflow_parent_run_id"] == first["mlflow_run_id"]
    assert tags["step3vl.kfp_run_id"] not in ("", "none") and tags["step3vl.config_hash"]
    assert float(tags["metric.greedy/text_math/accuracy"]) == ev["pacore/greedy/text_math/accuracy"]
    assert any(k.startswith("step3vl.data.") for k in tags)
    data_out = st["data_prep"]["outputs"]["data"]["uri"]
    assert tags["step3vl.data_uri"] == str(Path(data_out).resolve())  # the data `step3vl eval` then reads
    assert (Path(tags["step3vl.data_uri"]) / "data_manifest.json").is_file()
    assert str(client.get_registered_model("step3vl-micro").aliases["candidate"]) == "1"
    assert st["deploy_serving"]["metrics"]["completion_tokens"] >= 1

    # 3. nothing changed: every stage is a cache hit, with the first run's artifacts
    t0 = time.perf_counter()
    p = _run(tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"all-cached micro run: {time.perf_counter() - t0:.1f}s")
    for stage in ALL_STAGES:
        assert f"│ {stage}" in p.stdout
    assert "│ no " not in p.stdout
    second = _outputs(tmp_path, p.stdout.split("MLflow run ")[1].split(")")[0])
    assert {s: v["status"] for s, v in second["stages"].items()} == dict.fromkeys(st, "cached")
    assert all(second["stages"][s]["outputs"] == st[s]["outputs"] for s in st)
    assert len(client.search_model_versions("name = 'step3vl-micro'")) == 1

    # 4. start at pacore from the first run: data prep through RLHF imported, pacore onward re-executed
    t0 = time.perf_counter()
    p = _run(tmp_path, "--from-stage", "pacore", "--resume-from", "first", "--no-cache", "--json")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"--from-stage pacore micro run: {time.perf_counter() - t0:.1f}s")
    third = json.loads(p.stdout)["stages"]
    assert [third[s]["status"] for s in ALL_STAGES] == ["reused"] * 5 + ["done"] * 4
    assert third["sft"]["outputs"]["model"]["uri"] == model["uri"]
    assert third["rlhf"]["outputs"]["model"]["uri"] == st["rlhf"]["outputs"]["model"]["uri"]
    # pacore ran again on the same inputs and settings: its checkpoint root is the first run's, whose finished
    # model it publishes again (the same digest) instead of training anew
    again, before = third["pacore"]["outputs"]["model"], st["pacore"]["outputs"]["model"]
    assert again["metadata"]["digest"] == before["metadata"]["digest"]
    assert len(client.search_model_versions("name = 'step3vl-micro'")) == 2


def test_one_writer_per_checkpoint_root(tmp_path):
    """Two executions of the same stage on the same inputs share a checkpoint root; run at once, the second
    waits for the first (then resumes from what it published) instead of writing into the same directories."""
    import threading
    import time

    from step3vl.pipeline.runtime import _exclusive

    root = str(tmp_path / "checkpoints" / "pacore-abc")
    events: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with _exclusive(root):
            events.append("a in")
            inside.set()
            time.sleep(0.5)
            events.append("a out")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with _exclusive(root):
        events.append("b in")
    t.join()
    assert events == ["a in", "a out", "b in"]
    with _exclusive(str(tmp_path / "checkpoints" / "other")):  # another root does not wait
        events.append("c in")
    with _exclusive("s3://bucket/checkpoints/pacore-abc"):  # object storage: TrainJobs, no local lock
        events.append("d in")
    assert events[-2:] == ["c in", "d in"]
