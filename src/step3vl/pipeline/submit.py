"""``step3vl compile`` and ``step3vl submit``: the DAG built for a KFP cluster.

The compiled package carries the resolved config as the default of its ``config_yaml`` parameter,
so ``pipelines/step3vl-10b.yaml`` is the 10B recipe, runnable as uploaded. ``submit`` compiles the
same way and starts a run through ``kfp.Client``.

Caching on the cluster is KFP's own (it covers every parameter), so a new submission with a new
``pipeline_run_name`` re-executes its stages; training stages still resume from their stable
checkpoint locations, and retrying a failed run in KFP keeps its parameters and hits the cache.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from step3vl.config import PipelineConfig
from step3vl.pipeline.cluster import DEFAULT, ClusterSettings
from step3vl.pipeline.dag import ClusterTarget, pipeline_module
from step3vl.pipeline.runtime import config_text


def build_cluster_pipeline(cfg: PipelineConfig, settings: ClusterSettings = DEFAULT) -> Any:
    return pipeline_module().build_pipeline(ClusterTarget(config_text(cfg), settings))


def compile_pipeline(cfg: PipelineConfig, out: str | Path, settings: ClusterSettings = DEFAULT) -> Path:
    """Compile the cluster pipeline for ``cfg`` to a KFP v2 YAML package at ``out``."""
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_cluster_pipeline(cfg, settings), package_path=str(out))
    return out


def submit(cfg: PipelineConfig, *, host: str, experiment: str | None = None, run_name: str | None = None,
           namespace: str | None = None, mlflow_parent_run_id: str = "",
           settings: ClusterSettings = DEFAULT) -> dict[str, str]:
    """Compile for ``cfg`` and start a run on the KFP API at ``host``; returns its ids and names."""
    import kfp

    run_name = run_name or f"{cfg.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    experiment = experiment or cfg.tracking.experiment
    client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
    with tempfile.TemporaryDirectory() as d:
        package = compile_pipeline(cfg, Path(d) / "step3vl.yaml", settings)
        res = client.create_run_from_pipeline_package(
            str(package),
            arguments={"config_yaml": config_text(cfg), "mlflow_parent_run_id": mlflow_parent_run_id,
                       "pipeline_run_name": run_name},
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
        )
    return {"run_id": str(res.run_id), "run_name": run_name, "experiment": experiment, "host": host}
