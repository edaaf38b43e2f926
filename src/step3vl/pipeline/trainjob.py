"""Training stages as Kubeflow Trainer ``TrainJob``s (v1alpha1): multi-node DeepSpeed on the cluster.

With ``$STEP3VL_EXECUTOR=trainjob`` (set by the cluster build when ``ClusterSettings.executor`` is
``trainjob``) a training component does not train in its own pod: :func:`run_remote` turns the
stage call into a ``TrainJob`` on the ``step3vl-deepspeed`` ClusterTrainingRuntime
(:data:`step3vl.pipeline.images.TRAINER_RUNTIME`), checks first that Kubeflow Trainer and the
runtime are there (:func:`preflight`), follows the job's conditions to ``Complete`` or ``Failed``
(:func:`follow`) and reads back what rank 0 wrote. In the job every node runs
``torchrun --no-python step3vl stage exec <stage>`` (the runtime's command plus our args), which
calls the same ``step3vl.stages`` function with the same arguments (:func:`exec_call`):
artifact paths become their ``s3://`` URIs; pre-training and SFT stream the packed shards they read into the
node's cache, the RL stages read a copy of the data sets they name (``data_sets`` in their module) made once per
node.

Nothing here needs a cluster to test: the Kubernetes APIs are passed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from step3vl.errors import Step3VLError
from step3vl.pipeline.cluster import DEFAULT, ClusterSettings
from step3vl.pipeline.images import TRAINER_RUNTIME

log = logging.getLogger("step3vl.pipeline")

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
CRD_NAME = f"{PLURAL}.{GROUP}"
RUNTIME_PLURAL = "clustertrainingruntimes"
EXECUTOR_ENV = "STEP3VL_EXECUTOR"  # "trainjob": training components launch TrainJobs
CALL_ENV = "STEP3VL_CALL"  # the stage call a TrainJob runs (JSON)
RUN_ENV = "STEP3VL_MLFLOW_RUN_ID"  # the component's stage run: rank 0 logs the stage's metrics into it
NODES_ENV = "STEP3VL_TRAINJOB_NODES"
GPUS_ENV = "STEP3VL_TRAINJOB_GPUS_PER_NODE"
# the training loop's stages (pre-training, SFT): data-parallel under torchrun (one rank per GPU), and they stream
# the packed shards they read from an s3:// data_dir; the RL stages are one process on a copy of their data sets
TRAINING_LOOP = {"step3vl.stages.train:run_training"}
LOCAL_PROCS_ENV = "STEP3VL_LOCAL_PROCS"  # pod executor: ranks of a training stage in its pod (default: its GPUs)
LOCAL_ENV = "STEP3VL_LOCAL_LAUNCH"  # set for ranks launched in the component's own pod (run_local)
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
_NAME_OK = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class TrainJobError(Step3VLError):
    """Kubeflow Trainer is missing, or a TrainJob failed or timed out."""


# --------------------------------------------------------------------------- the spec


def job_name(stage: str, key: str) -> str:
    """A TrainJob name: RFC 1035 label, at most 63 characters, stable for (stage, key)."""
    name = f"step3vl-{stage.replace('_', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    assert _NAME_OK.match(name) and len(name) <= 63, name
    return name


def _env(settings: ClusterSettings, extra: dict[str, str]) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in extra.items()]
    env += [{"name": "AWS_ENDPOINT_URL", "value": settings.s3_endpoint},
            {"name": "MLFLOW_S3_ENDPOINT_URL", "value": settings.s3_endpoint},
            {"name": "AWS_REGION", "value": settings.s3_region}]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret, "key": key}}}
            for var, key in settings.s3_secret_keys.items()]
    env += [{"name": var, "valueFrom": {"secretKeyRef": {"name": settings.mlflow_secret, "key": key, "optional": True}}}
            for var, key in settings.mlflow_secret_keys.items()]
    return env


def build_trainjob(name: str, stage: str, call: dict[str, Any], *, namespace: str,
                   settings: ClusterSettings = DEFAULT, nodes: int | None = None,
                   gpus_per_node: int | None = None, run_id: str = "") -> dict[str, Any]:
    """The TrainJob running ``call`` (see :func:`exec_call`) for ``stage`` on ``nodes`` x ``gpus_per_node``,
    logging into the MLflow run ``run_id`` when given (kept out of the call: a retried component re-attaches).

    Resources, deadline and GPU count come from the stage's :class:`~step3vl.pipeline.cluster.Resources`
    unless given; credentials are secret references, never values.
    """
    r = settings.resources(stage)
    nodes = nodes or r.nodes
    gpus = r.gpus if gpus_per_node is None else gpus_per_node
    if nodes < 1 or gpus < 1:
        raise TrainJobError(f"{stage}: a TrainJob needs at least one node and one GPU per node "
                            f"(got {nodes} x {gpus})")
    procs = r.processes_per_node or gpus
    if r.processes_per_node == 1 and nodes > 1:
        raise TrainJobError(f"{stage} runs as a single process (its loop is not data-parallel): a TrainJob of "
                            f"{nodes} nodes would run {nodes} copies writing the same checkpoints; use one node")
    res = {"cpu": r.cpu, "memory": r.memory, settings.accelerator_type: str(gpus)}
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": settings.trainjob_runtime},
        "trainer": {
            "image": settings.image,
            # the runtime's command is `torchrun --no-python step3vl`: every rank runs the CLI
            "args": ["stage", "exec", stage],
            "env": _env(settings, {CALL_ENV: json.dumps(call, sort_keys=True)} | ({RUN_ENV: run_id} if run_id else {})),
            "numNodes": nodes,
            "numProcPerNode": procs,
            "resourcesPerNode": {"requests": res, "limits": dict(res)},
        },
    }
    if r.timeout_s:
        spec["activeDeadlineSeconds"] = r.timeout_s
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "step3vl-trainer", "step3vl.ai/stage": stage}},
            "spec": spec}


# --------------------------------------------------------------------------- preflight, create, follow


def _status(e: Exception) -> int | None:
    return getattr(e, "status", None)


def preflight(custom: Any, ext: Any, namespace: str, runtime: str = TRAINER_RUNTIME) -> list[str]:
    """Fail with a clear message unless the TrainJob CRD (serving v1alpha1) and ``runtime`` exist.

    Reading cluster-scoped objects may be forbidden to a pipeline's service account; then the CRD is
    checked by listing TrainJobs in ``namespace`` and the runtime is left to the Trainer's own
    admission check. Returns the notes on what could not be checked.
    """
    notes: list[str] = []
    try:
        crd = ext.read_custom_resource_definition(CRD_NAME)
        versions = {v.name for v in crd.spec.versions if v.served}
        if VERSION not in versions:
            raise TrainJobError(f"the TrainJob CRD {CRD_NAME} serves {sorted(versions)}, not {VERSION}: "
                                "install Kubeflow Trainer v2 (manifests/README.md)")
    except TrainJobError:
        raise
    except Exception as e:
        if _status(e) == 404:
            raise TrainJobError(f"Kubeflow Trainer is not installed: no CustomResourceDefinition {CRD_NAME} "
                                "(install it as manifests/README.md says, or run training in-pod)") from None
        if _status(e) != 403:
            raise
        try:
            custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=1)
        except Exception as e2:
            if _status(e2) == 404:
                raise TrainJobError(f"Kubeflow Trainer is not installed: the API has no {GROUP}/{VERSION} "
                                    f"{PLURAL}") from None
            raise
        notes.append(f"CRD {CRD_NAME} not readable (forbidden); {PLURAL} are listable in {namespace}")
    try:
        custom.get_cluster_custom_object(GROUP, VERSION, RUNTIME_PLURAL, runtime)
    except Exception as e:
        if _status(e) == 404:
            raise TrainJobError(f"ClusterTrainingRuntime {runtime} not found: apply manifests/base/trainer "
                                "(kubectl apply -k manifests/overlays/<env>)") from None
        if _status(e) != 403:
            raise
        notes.append(f"ClusterTrainingRuntime {runtime} not readable (forbidden); Trainer validates it on create")
    for n in notes:
        log.warning("trainjob preflight: %s", n)
    return notes


def conditions(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}


def _done(job: dict[str, Any]) -> str | None:
    c = conditions(job)
    for kind in ("Failed", "Complete"):
        if c.get(kind, {}).get("status") == "True":
            return kind
    return None


def create(custom: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Create the TrainJob; an existing one of the same name (a retried task) is followed if still running
    or complete, and replaced if it failed (the new one resumes from the stage's checkpoints)."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    except Exception as e:
        if _status(e) != 409:
            raise
    old = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    if _done(old) != "Failed":
        log.info("TrainJob %s/%s exists: following it", ns, name)
        return old
    log.info("TrainJob %s/%s failed before: replacing it", ns, name)
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, propagation_policy="Foreground")
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def follow(custom: Any, name: str, namespace: str, *, timeout_s: float, poll_s: float = 15.0,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll the TrainJob until ``Complete`` (returned) or ``Failed`` / ``timeout_s`` (:class:`TrainJobError`)."""
    deadline = clock() + timeout_s
    seen = ""
    while True:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        state = _done(job)
        conds = conditions(job)
        if state == "Complete":
            return job
        if state == "Failed":
            c = conds["Failed"]
            raise TrainJobError(f"TrainJob {namespace}/{name} failed: {c.get('reason', '?')}: {c.get('message', '')}")
        now = ", ".join(f"{t}={c.get('status')}" for t, c in sorted(conds.items())) or "no conditions yet"
        if now != seen:
            log.info("TrainJob %s/%s: %s", namespace, name, now)
            seen = now
        if timeout_s and clock() > deadline:
            raise TrainJobError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s ({now}); "
                                "it keeps running: delete it or retry the task to follow it again")
        sleep(poll_s)


# --------------------------------------------------------------------------- the call, both sides


def path_to_uri(value: Any) -> Any:
    """A KFP artifact's local path (``/s3/bucket/key``, ``/minio/bucket/key``) → ``s3://bucket/key``."""
    if isinstance(value, str):
        for prefix in ("/s3/", "/minio/"):
            if value.startswith(prefix):
                return "s3://" + value[len(prefix):]
    return value


@dataclass(frozen=True)
class Call:
    fn: str  # module:qualname of a step3vl.stages function
    arguments: dict[str, Any]  # by parameter name; "cfg" is rebuilt from config_yaml
    config_yaml: str
    result_uri: str

    def to_json(self) -> dict[str, Any]:
        return {"fn": self.fn, "arguments": self.arguments, "config_yaml": self.config_yaml,
                "result_uri": self.result_uri}


def make_call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], config_yaml: str, result_uri: str,
              *, uris: bool = True) -> Call:
    """The call a TrainJob runs. ``uris``: KFP's local artifact paths become the ``s3://`` URIs they mirror (another
    pod reads them); False keeps them (ranks in the component's own pod, where the launcher uploads them)."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    arguments = {k: path_to_uri(v) if uris else v for k, v in bound.arguments.items() if k != "cfg"}
    arguments["progress"] = False
    bad = {k: type(v).__name__ for k, v in arguments.items() if not isinstance(v, (str, int, float, bool, type(None)))}
    if bad:
        raise TrainJobError(f"{fn.__name__}: arguments {bad} cannot travel to a TrainJob")
    return Call(f"{fn.__module__}:{fn.__qualname__}", arguments, config_yaml, result_uri)


def _summary(out: Any) -> dict[str, Any]:
    """What the component needs back from a stage's outputs: the model, its metrics, steps and resume point."""
    inner = getattr(out, "rl", None) or out
    res = getattr(inner, "result", None)
    plot = getattr(out, "plot", None)
    return {"model_uri": out.model_uri, "metrics": dict(out.metrics),
            "step": getattr(res, "step", getattr(res, "iteration", 0)) if res is not None else 0,
            "resumed_from": getattr(res, "resumed_from", None) if res is not None else None,
            "plot": str(plot) if plot else None}


def exec_call(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the TrainJob (every rank): run the call; rank 0 writes the summary to ``result_uri``."""
    from step3vl.pipeline.runtime import load_config

    module, _, qualname = spec["fn"].partition(":")
    if not module.startswith("step3vl.stages."):
        raise TrainJobError(f"refusing to run {spec['fn']}: not a step3vl stage function")
    stage_module = importlib.import_module(module)
    fn: Any = stage_module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    arguments = dict(spec["arguments"])
    cfg = load_config(spec["config_yaml"], source="the TrainJob's call")
    run_id, rank0 = os.environ.get(RUN_ENV, ""), int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as stack:
        if run_id and rank0:  # the per-step curves reach the component's run, as when the stage runs in its pod
            from step3vl import tracking

            uri = tracking.tracking_uri(cfg.tracking)
            if uri.startswith(("http://", "https://")) or os.environ.get(LOCAL_ENV):
                stage = str(arguments.get("stage") or module.rsplit(".", 1)[-1])
                tracking.require_run(run_id, uri, stage)  # the id came from the environment: check it first
                stack.enter_context(tracking.attached_run(run_id, uri, stage, cfg.tracking.flush_timeout_s))
            else:  # a store on the component's own disk: the run is not reachable from a TrainJob's pods
                log.warning("tracking URI %s is not a server: the stage's per-step metrics stay out of MLflow "
                            "run %s", tracking.display_uri(uri), run_id)
        out = fn(cfg=cfg, **arguments)
    summary = _summary(out)
    if rank0:
        _write(spec["result_uri"], json.dumps(summary, sort_keys=True))
    end_process_group()
    return summary


def end_process_group() -> None:
    """Tear down the process group DeepSpeed started, once a rank is done: a rank that exits with it alive can abort
    at interpreter shutdown ("terminate called without an active exception", its gloo threads still joinable), and
    torchrun then reports the finished job as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_rank(code: int = 0) -> None:
    """End a torchrun rank whose stage is done: its process group ended, its output flushed, then out without the
    interpreter's finalisation. DeepSpeed keeps its own handles on the gloo/NCCL groups past ``destroy_process_group``;
    freed during finalisation they can still abort the rank ("terminate called without an active exception", exit -6),
    and torchrun then fails a finished job (seen in CI once after the group was ended explicitly). A process that is
    not a torchrun rank (``WORLD_SIZE`` unset or 1) just returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import sys

    end_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _write(uri: str, text: str) -> None:
    from step3vl.storage import open_store

    parent, key = uri.rstrip("/").rsplit("/", 1)
    open_store(parent, create=True).write_bytes(key, text.encode())


def _read(uri: str) -> str:
    from step3vl.storage import open_store

    parent, key = uri.rstrip("/").rsplit("/", 1)
    return open_store(parent).read_bytes(key).decode()


def current_namespace(default: str = "step3vl") -> str:
    env = os.environ.get("STEP3VL_NAMESPACE")
    if env:
        return env
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def kube_apis() -> tuple[Any, Any]:
    """(CustomObjectsApi, ApiextensionsV1Api) from the in-cluster config (or ~/.kube/config)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.ApiextensionsV1Api()


def local_processes(fn: Callable[..., Any]) -> int:
    """Ranks the pod executor runs ``fn`` on in the component's own pod: ``$STEP3VL_LOCAL_PROCS``, else one per GPU
    the pod sees; 1 (in-process) for stages that are not data-parallel."""
    if f"{fn.__module__}:{fn.__qualname__}" not in TRAINING_LOOP:
        return 1
    env = os.environ.get(LOCAL_PROCS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise TrainJobError(f"${LOCAL_PROCS_ENV}={env!r}: expected a number of processes >= 1")
        return int(env)
    import torch

    return max(torch.cuda.device_count(), 1)


def run_local(stage: str, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], *, config_yaml: str,
              work_uri: str, nprocs: int, run_id: str = "") -> Any:
    """The pod executor on a pod with several GPUs: the stage on ``nprocs`` ranks of this pod (``torchrun
    --standalone``, one rank per GPU), as a TrainJob's node runs it; rank 0 logs into the component's MLflow run.
    Returns what :func:`run_remote` returns, with the loss-curve plot."""
    import shutil
    import subprocess
    import sys

    from step3vl.storage import join_uri, open_store

    result_uri = join_uri(work_uri, "local-result.json")
    parent, key = result_uri.rstrip("/").rsplit("/", 1)
    store = open_store(parent, create=True)
    if store.exists(key):  # an earlier attempt's: not this run's answer
        store.delete_prefix(key)
    call = make_call(fn, args, kwargs, config_yaml, result_uri, uris=False)
    exe = shutil.which("step3vl", path=str(Path(sys.executable).parent)) or shutil.which("step3vl")
    if not exe:
        raise TrainJobError("the step3vl console script is not installed beside this Python: cannot launch ranks")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({CALL_ENV: json.dumps(call.to_json()), RUN_ENV: run_id, LOCAL_ENV: "1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nprocs),
           "--no-python", exe, "stage", "exec", stage]
    log.info("%s: %d ranks in this pod (%s)", stage, nprocs, " ".join(cmd[2:]))
    p = subprocess.run(cmd, env=env)
    if p.returncode != 0:
        raise TrainJobError(f"{stage}: the {nprocs} ranks launched in this pod exited with {p.returncode} "
                            "(their output is above)")
    summary = json.loads(_read(result_uri))
    return _outputs(summary, plot=summary["plot"], trainjob="")


def _outputs(summary: dict[str, Any], *, plot: str | None, trainjob: str) -> SimpleNamespace:
    """A stage's outputs as the component publishes them, from the summary its rank 0 wrote (:func:`_summary`)."""
    result = SimpleNamespace(step=summary["step"], iteration=summary["step"], resumed_from=summary["resumed_from"])
    return SimpleNamespace(model_uri=summary["model_uri"], metrics=summary["metrics"], result=result, plot=plot,
                           trainjob=trainjob)


def run_remote(stage: str, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], *, config_yaml: str,
               work_uri: str, settings: ClusterSettings = DEFAULT, apis: tuple[Any, Any] | None = None,
               poll_s: float = 15.0, run_id: str = "") -> Any:
    """The component side: preflight, create (or re-attach to) the TrainJob, follow it, read its summary."""
    from step3vl.storage import join_uri

    custom, ext = apis or kube_apis()
    namespace = current_namespace()
    result_uri = join_uri(work_uri, "trainjob-result.json")
    call = make_call(fn, args, kwargs, config_yaml, result_uri)
    name = job_name(stage, json.dumps(call.to_json(), sort_keys=True))
    preflight(custom, ext, namespace, settings.trainjob_runtime)
    nodes = int(os.environ.get(NODES_ENV, "0")) or None
    gpus = int(os.environ[GPUS_ENV]) if os.environ.get(GPUS_ENV) else None
    body = build_trainjob(name, stage, call.to_json(), namespace=namespace, settings=settings, nodes=nodes,
                          gpus_per_node=gpus, run_id=run_id)
    create(custom, body)
    log.info("%s: TrainJob %s/%s (%d node(s))", stage, namespace, name, body["spec"]["trainer"]["numNodes"])
    follow(custom, name, namespace, timeout_s=settings.resources(stage).timeout_s, poll_s=poll_s)
    # the plot stayed in the job's pods: the curves are in the component's MLflow run
    return _outputs(json.loads(_read(result_uri)), plot=None, trainjob=name)
