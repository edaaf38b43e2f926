"""``step3vl compile`` and ``step3vl submit``: the DAG built for a KFP cluster.

The compiled package carries the resolved config as the default of its ``config_yaml`` parameter,
so ``pipelines/step3vl-10b.yaml`` is the 10B recipe, runnable as uploaded. ``submit`` compiles the
same way and starts a run through ``kfp.Client``.

Caching on the cluster is KFP's own (it covers every parameter), so a new submission with a new
``pipeline_run_name`` re-executes its stages; training stages still resume from their stable
checkpoint locations, and retrying a failed run in KFP keeps its parameters and hits the cache.
``--from-stage X --resume-from RUN`` works as for ``step3vl run``: the stages before ``X`` become
importers of the artifacts RUN recorded (its MLflow parent run's ``pipeline_outputs.json``). Runs
use the least-privilege service account of ``manifests/base/pipeline``.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from collections.abc import Mapping

from step3vl.config import PipelineConfig
from step3vl.errors import Step3VLError
from step3vl.pipeline import images
from step3vl.pipeline.cluster import DEFAULT, ClusterSettings
from step3vl.pipeline.dag import ClusterTarget, ReusedStage, pipeline_module
from step3vl.pipeline.runtime import config_text

SERVICE_ACCOUNT = getattr(images, "PIPELINE_SERVICE_ACCOUNT", None)


def build_cluster_pipeline(cfg: PipelineConfig, settings: ClusterSettings = DEFAULT,
                           reuse: Mapping[str, ReusedStage] | None = None) -> Any:
    return pipeline_module().build_pipeline(ClusterTarget(config_text(cfg), settings, reuse=reuse))


def compile_pipeline(cfg: PipelineConfig, out: str | Path, settings: ClusterSettings = DEFAULT,
                     reuse: Mapping[str, ReusedStage] | None = None) -> Path:
    """Compile the cluster pipeline for ``cfg`` to a KFP v2 YAML package at ``out``."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_cluster_pipeline(cfg, settings, reuse), package_path=str(out))
    return out


def plan_cluster_reuse(cfg: PipelineConfig, from_stage: str, resume_from: str) -> dict[str, ReusedStage]:
    """The stages before ``from_stage`` as importers of what run ``resume_from`` recorded in MLflow."""
    from step3vl.pipeline.local import find_run, load_outputs, plan_reuse

    previous = load_outputs(find_run(resume_from, cfg))
    stages = list(pipeline_module().STAGES)
    before = stages[: stages.index(from_stage)] if from_stage in stages else []
    local = [f"{s}: {o['uri']}" for s in before for o in ((previous["stages"].get(s) or {}).get("outputs") or {}).values()
             if "://" not in o["uri"]]
    if local:
        raise Step3VLError(f"cannot resume a cluster run from {resume_from}: its outputs are local paths a cluster "
                           f"cannot read ({local[0]}, ...); resume from a cluster run or use step3vl run")
    return plan_reuse(stages, from_stage, previous)


def submit(cfg: PipelineConfig, *, host: str, experiment: str | None = None, run_name: str | None = None,
           namespace: str | None = None, mlflow_parent_run_id: str = "",
           settings: ClusterSettings = DEFAULT, from_stage: str | None = None,
           resume_from: str | None = None, service_account: str | None = SERVICE_ACCOUNT) -> dict[str, str]:
    """Compile for ``cfg`` and start a run on the KFP API at ``host``; returns its ids and names."""
    import kfp

    if bool(from_stage) != bool(resume_from):
        raise Step3VLError("--from-stage and --resume-from go together: start at a stage, reusing an earlier run")
    reuse = plan_cluster_reuse(cfg, from_stage, resume_from) if from_stage and resume_from else None
    run_name = run_name or f"{cfg.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    experiment = experiment or cfg.tracking.experiment
    client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(cfg, Path(d) / "step3vl.yaml", settings, reuse)
        res = client.create_run_from_pipeline_package(
            str(package),
            arguments={"config_yaml": config_text(cfg), "mlflow_parent_run_id": mlflow_parent_run_id,
                       "pipeline_run_name": run_name},
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            service_account=service_account,
        )
    out = {"run_id": str(res.run_id), "run_name": run_name, "experiment": experiment, "host": host}
    if reuse:
        out["reused"] = ", ".join(reuse)
    return out
