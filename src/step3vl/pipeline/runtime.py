"""What runs inside a pipeline component, so that the bodies in ``components/`` stay a few lines.

A body opens :func:`stage` (config rebuilt from the YAML text, an MLflow child run under the
pipeline's parent run), calls its ``step3vl.stages`` function with artifact paths, and hands the
result to one ``publish_*`` method, which puts metrics on the ``Metrics`` artifact, lineage on the
output artifacts' metadata and the report into its ``Markdown``/``HTML`` artifact.

Every output artifact is written to disk, ``Metrics`` included (KFP keeps metrics in metadata
only, and the local runner treats an output whose file is missing as a cache miss).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import gc
import html
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step3vl.config import PipelineConfig

log = logging.getLogger("step3vl.pipeline")

CHECKPOINT_SUBDIR = "model"  # run_training publishes the model under <out_uri>/model
REMOTE_FILE = "REMOTE.json"  # an output artifact whose content lives in object storage holds only this pointer


def _configure_logging() -> None:
    # our records in our own format (the runner's status board shows the latest one); the KFP
    # executor's root handler stays as it is
    logger = logging.getLogger("step3vl")
    if not any(getattr(h, "_step3vl", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._step3vl = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def config_text(cfg: PipelineConfig) -> str:
    """The resolved config as the ``config_yaml`` parameter: one line of flow-style YAML.

    One line because the KFP compiler copies parameter defaults into a header comment of the
    compiled file without prefixing continuation lines, which breaks the YAML of a multi-line default.
    """
    import yaml

    from step3vl.config import to_dict

    return yaml.safe_dump(to_dict(cfg), default_flow_style=True, sort_keys=False, width=2**31).strip()


def load_config(config_yaml: str, source: str = "config_yaml") -> PipelineConfig:
    """The resolved pipeline config a component was given as YAML text."""
    import yaml

    from step3vl import config

    return config.from_dict(PipelineConfig, yaml.safe_load(config_yaml) or {}, source=source)


@dataclass
class Stage:
    """One stage execution inside a component: its config, its MLflow run, its clock."""

    name: str
    cfg: PipelineConfig
    mlflow_run_id: str
    started: float
    config_yaml: str = ""
    parent_run_id: str = ""

    # ------------------------------------------------------------------ inputs

    def checkpoint_uri(self, *inputs: Any) -> str:
        """The stable checkpoint location for this stage, config and input artifacts (see ``lineage``)."""
        from step3vl.pipeline.lineage import checkpoint_location

        uri = checkpoint_location(self.name, self.cfg, [artifact_digest(a) for a in inputs])
        log.info("%s: checkpoints under %s", self.name, uri)
        return uri

    def model_location(self, model: Any) -> str:
        """Where this training stage writes its model (``out_uri``): into its ``Model`` artifact, or with
        ``storage.root`` on S3 to ``<storage.root>/models/<stage>-<hash of the artifact's URI>`` and the artifact
        holds a pointer. KFP's launcher downloads every input artifact whole into each pod that consumes it: the
        register pod and the thin pods launching TrainJobs would each copy a model they never read (38 GiB at
        10B), and the evaluate pod all five before its first one loads. The location is the task's own, so a
        retried task (and the TrainJob it re-attaches to) writes to the same place."""
        return self._location(model, "models")

    def storage_uri(self, *parts: str) -> str:
        """A location under ``storage.root`` shared by runs (e.g. PaCoRe's message cache)."""
        from step3vl.storage import join_uri

        return join_uri(self.cfg.storage.root, *parts)

    def dataset_location(self, dataset: Any, kind: str) -> str:
        """Where this stage writes a ``Dataset`` output it makes itself (PaCoRe's message sets): into the artifact,
        or with ``storage.root`` on S3 to ``<storage.root>/<kind>/<stage>-<hash of the artifact's URI>``, the
        artifact then holding a pointer (as :meth:`model_location`, for the same reasons)."""
        return self._location(dataset, kind)

    def _location(self, artifact: Any, kind: str) -> str:
        import hashlib

        from step3vl.storage import is_s3_uri, join_uri

        if not is_s3_uri(self.cfg.storage.root):
            return str(artifact.path)
        key = hashlib.sha256(str(artifact.uri).encode()).hexdigest()[:16]
        uri = join_uri(self.cfg.storage.root, kind, f"{self.name}-{key}")
        log.info("%s: %s go to %s", self.name, kind, uri)
        return uri

    # ------------------------------------------------------------------ outputs

    def publish_data(self, out: Any, data: Any, metrics: Any, report: Any) -> None:
        """Data prep → ``data`` (the output dir), per-set metrics, the gate reports as Markdown."""
        from step3vl.pipeline.lineage import data_digest

        m = out.manifest
        values: dict[str, float] = {"records": sum(s["n_records"] for s in m["sets"].values()),
                                    "vocab_size": m["tokenizer"]["vocab_size"]}
        for name, s in m["sets"].items():
            values[f"records/{name}"] = s["n_records"]
            for packed, p in s.get("packed", {}).items():
                values[f"packed_tokens/{packed}"] = p["tokens"]
                values[f"padding_fraction/{packed}"] = p["padding_fraction"]
        _stamp(data, self, digest=data_digest(out.out_dir), sets=sorted(m["sets"]))
        reports = sorted(Path(out.out_dir, "reports").glob("*.md"))
        Path(report.path).write_text("\n\n".join(p.read_text() for p in reports) or "No datasets.\n")
        if out.data_uri.startswith("s3://"):  # published to object storage: the artifact holds only a pointer there
            _leave_pointer(data, "data_uri", out.data_uri)
        self._finish(metrics, values, data, report)

    def execute(self, fn: Any, *args: Any, work_uri: str, **kwargs: Any) -> Any:
        """Run a training stage function: here (on one rank per GPU of this pod for pre-training and SFT, or
        ``$STEP3VL_LOCAL_PROCS`` ranks), or as a Kubeflow Trainer TrainJob when ``$STEP3VL_EXECUTOR=trainjob``
        (the cluster build's choice; see :mod:`step3vl.pipeline.trainjob`).
        ``work_uri`` (the stage's checkpoint location) is where the job leaves its summary."""
        from step3vl.pipeline import trainjob

        if os.environ.get(trainjob.EXECUTOR_ENV, "pod") != "trainjob":
            nprocs = trainjob.local_processes(fn)
            with _exclusive(work_uri):
                if nprocs > 1:  # a pod with several GPUs: one rank each, as on a TrainJob's node
                    return trainjob.run_local(self.name, fn, args, {"cfg": self.cfg, **kwargs},
                                              config_yaml=self.config_yaml, work_uri=work_uri, nprocs=nprocs,
                                              run_id=self.mlflow_run_id)
                return fn(*args, cfg=self.cfg, **kwargs)
        return trainjob.run_remote(self.name, fn, args, {"cfg": self.cfg, **kwargs}, config_yaml=self.config_yaml,
                                   work_uri=work_uri, run_id=self.mlflow_run_id)

    def publish_training(self, out: Any, model: Any, metrics: Any, loss_curve: Any) -> None:
        """A training stage → ``model`` (checkpoint under ``model/``), its metrics, the loss curve as HTML."""
        values = dict(out.metrics)
        values["resumed_from_step"] = out.result.resumed_from or 0
        self._publish_model(out.model_uri, out.result.step, values, getattr(out, "plot", None), model, metrics,
                            loss_curve, "loss curves", getattr(out, "trainjob", ""))

    def publish_rl(self, out: Any, model: Any, metrics: Any, curves: Any) -> None:
        """An RL stage (RLVR, RLHF, PaCoRe) → ``model``, its metrics, its reward/length curves as HTML."""
        inner = getattr(out, "rl", None) or out  # RLHF wraps the RL stage's outputs
        res = getattr(inner, "result", None)
        values = dict(out.metrics)
        values["resumed_from_iteration"] = (getattr(res, "resumed_from", None) or 0) if res is not None else 0
        plot = getattr(out, "plot", None) or getattr(inner, "plot", None)
        steps = getattr(res, "iteration", getattr(res, "step", 0)) if res is not None else 0
        self._publish_model(out.model_uri, steps, values, plot, model, metrics, curves, "RL curves",
                            getattr(out, "trainjob", ""))

    def publish_messages(self, messages_uri: str, messages: Any) -> None:
        """PaCoRe's message sets → ``messages``, a ``Dataset`` of one published dataset per curriculum step
        (``step-<k>/``), stamped with their content digest; a pointer when they went to object storage."""
        from step3vl.pipeline.lineage import sha256_json
        from step3vl.storage import join_uri, read_manifest

        steps = [f"step-{k}" for k in range(1, len(self.cfg.pacore.curriculum) + 1)]
        files = {s: read_manifest(join_uri(messages_uri, s))["files"] for s in steps}  # refuses a missing step
        _stamp(messages, self, digest=sha256_json(files), steps=steps, files=sum(len(f) for f in files.values()))
        if messages_uri.startswith("s3://"):
            _leave_pointer(messages, "data_uri", messages_uri)

    def _publish_model(self, model_uri: str, steps: int, values: dict[str, Any], plot: Any, model: Any,
                       metrics: Any, curve: Any, what: str, trainjob: str = "") -> None:
        from step3vl.pipeline.lineage import checkpoint_digest

        sub = os.path.relpath(model_uri, model.path) if model_uri.startswith(model.path + os.sep) else ""
        if not sub or sub.startswith(".."):
            # trained elsewhere (a TrainJob writing to object storage): the artifact records where
            _point_to(Path(model.path), {"model_uri": model_uri})
            sub = CHECKPOINT_SUBDIR
        _stamp(model, self, digest=checkpoint_digest(model_uri), checkpoint=sub, model_uri=model_uri, steps=steps,
               framework="step3vl")
        body = f"<p>No {what} for {html.escape(self.name)}.</p>"
        if trainjob:  # its rank 0 logged the curves into this stage's MLflow run
            body = (f"<p>{html.escape(self.name)} trained as TrainJob <code>{html.escape(trainjob)}</code>: its {what} "
                    f"are in MLflow run <code>{html.escape(self.mlflow_run_id)}</code>.</p>")
        if plot and Path(plot).is_file():
            png = base64.b64encode(Path(plot).read_bytes()).decode()
            body = f'<img alt="{self.name} {what}" src="data:image/png;base64,{png}"/>'
        Path(curve.path).write_text(f"<html><body><h3>{html.escape(self.name)}</h3>{body}</body></html>\n")
        self._finish(metrics, values, model, curve)

    def publish_eval(self, out: Any, results: Any, metrics: Any, report: Any, report_html: Any = None) -> None:
        """Evaluation → ``results`` (metrics.json, per-model metrics, reports), the metrics, the report as
        Markdown and (with the stage-progression plot) as HTML."""
        _stamp(results, self)
        Path(report.path).write_text(Path(out.report).read_text())
        outputs = [results, report]
        if report_html is not None:
            Path(report_html.path).write_text(Path(out.html).read_text())
            outputs.append(report_html)
        self._finish(metrics, out.metrics, *outputs)

    def publish_release(self, out: Any, metrics: Any, decision: Any) -> None:
        """Register/promote → the version and the gate's decision as metrics and Markdown."""
        decision.metadata.update({"registered_model": out.name, "version": out.version, "model_uri": out.model_uri,
                                  "promoted": bool(out.promotion.promoted)})
        Path(decision.path).write_text(out.report)
        self._finish(metrics, out.metrics, decision)

    def publish_serving(self, out: Any, metrics: Any, report: Any) -> None:
        """Deploy-serving → where it is served, the check's timings, the exchange as Markdown."""
        report.metadata.update({"target": out.target, "endpoint": out.endpoint, "model_uri": out.model_uri})
        Path(report.path).write_text(out.report)
        self._finish(metrics, out.metrics, report)

    def _finish(self, metrics: Any, values: dict[str, float], *outputs: Any) -> None:
        values = {**values, "stage_seconds": round(time.perf_counter() - self.started, 3)}
        log_metrics(metrics, values)
        missing = [a.name for a in (metrics, *outputs) if not os.path.exists(a.path)]
        if missing:
            raise RuntimeError(f"stage {self.name} did not write its output artifact(s): {', '.join(missing)}")
        log.info("%s: done in %.1fs", self.name, values["stage_seconds"])


@contextlib.contextmanager
def stage(name: str, config_yaml: str, mlflow_parent_run_id: str = "", pipeline_run_name: str = "") -> Iterator[Stage]:
    """Rebuild the config, open the stage's MLflow child run and time it."""
    import mlflow

    from step3vl import tracking
    from step3vl.config import config_hash

    t0 = time.perf_counter()
    cfg = _task_config(config_yaml, f"config_yaml of stage {name}")
    with tracking.stage_run(name, cfg.tracking, parent_run_id=mlflow_parent_run_id or None, config=cfg) as run:
        mlflow.set_tags({"step3vl.pipeline_run_name": pipeline_run_name, "step3vl.config_hash": config_hash(cfg)})
        log.info("%s: config %s, MLflow run %s", name, config_hash(cfg), run.info.run_id)
        yield Stage(name, cfg, run.info.run_id, t0, config_yaml, mlflow_parent_run_id)


def step_config(stage: str, step: str, config_yaml: str) -> PipelineConfig:
    """The config of one step of a stage that runs as several tasks (data prep's plan and parts), logging set up;
    the stage's last task opens its MLflow run (:func:`stage`)."""
    from step3vl.config import config_hash

    cfg = _task_config(config_yaml, f"config_yaml of stage {stage} ({step})")
    log.info("%s (%s): config %s", stage, step, config_hash(cfg))
    return cfg


def _task_config(config_yaml: str, source: str) -> PipelineConfig:
    """What every component task does first: logging, then its config."""
    _configure_logging()
    # the task process exits right after the stage: skip the garbage collector's final passes over
    # torch/mlflow objects (~1 s per task); refcounted objects and every atexit handler still run
    atexit.register(gc.freeze)
    return load_config(config_yaml, source=source)


def publish_part(cfg: PipelineConfig, artifact: Any, local_dir: str | Path) -> None:
    """One part of a planned stage (data prep's), written in ``artifact``: with ``storage.root`` on S3 it is
    published to ``<storage.root>/data-parts/<hash of the artifact's URI>`` and the artifact keeps a pointer (its
    ``data_uri``), so that the merge task downloads no part whole (KFP's launcher would) and copies the parts' packed
    shards on the server. The location is the task's own: a retried task publishes over it."""
    import hashlib

    from step3vl.storage import is_s3_uri, join_uri, publish_dir

    if not is_s3_uri(cfg.storage.root):
        return
    uri = join_uri(cfg.storage.root, "data-parts", hashlib.sha256(str(artifact.uri).encode()).hexdigest()[:16])
    publish_dir(local_dir, uri, overwrite=True)
    _leave_pointer(artifact, "data_uri", uri)
    log.info("part published to %s", uri)


@contextlib.contextmanager
def _exclusive(work_uri: str) -> Iterator[None]:
    """One writer per checkpoint root. Two runs of the same stage on the same inputs share a root (that is
    how a retried task resumes); run concurrently, they would publish into the same directories at once.
    The second waits here, then resumes from what the first finished. A local root only: object storage
    roots belong to TrainJobs, which Kubernetes names uniquely."""
    from step3vl.storage import file_lock, is_s3_uri

    if is_s3_uri(work_uri):
        yield
        return
    root = Path(work_uri.removeprefix("file://"))
    with file_lock(root.parent / f".{root.name}.lock", on_wait=lambda: log.warning(
            "another run is using %s; waiting for it, then resuming from what it published", root)):
        yield


# --------------------------------------------------------------------------- artifact helpers


def model_dir(model: Any) -> str:
    """The loadable checkpoint of a ``Model`` artifact written by a training stage: inside the artifact,
    or in object storage where a TrainJob published it."""
    remote = str(model.metadata.get("model_uri", ""))
    if remote.startswith("s3://"):
        return remote
    return os.path.join(model.path, model.metadata.get("checkpoint", CHECKPOINT_SUBDIR))


def data_dir(data: Any) -> str:
    """The data directory of data prep's ``Dataset`` artifact: the artifact itself, or in object storage where data
    prep published it (``storage.root`` on S3; the artifact then holds only a pointer, which is all that KFP's
    launcher downloads into a consuming pod)."""
    remote = str(data.metadata.get("data_uri", ""))
    if remote.startswith("s3://"):
        return remote
    if Path(data.path, REMOTE_FILE).is_file():
        pointer = Path(data.path, REMOTE_FILE).read_text().strip()
        raise RuntimeError(f"{data.path} points to {pointer}, but the artifact's metadata has no data_uri: "
                           "it lost its metadata on the way")
    return str(data.path)


def data_dirs(artifacts: list[Any]) -> list[str]:
    """:func:`data_dir` of each artifact (the parts a ``dsl.Collected`` hands the merge), in order."""
    return [data_dir(a) for a in artifacts]


def model_dirs(**models: Any) -> dict[str, str]:
    """Label → loadable checkpoint of each ``Model`` artifact, in the order given."""
    return {label: model_dir(m) for label, m in models.items()}


def registered_model_uri(release: Any) -> str:
    """``models:/NAME/VERSION`` of the version the register stage created (from its decision's metadata)."""
    return f"models:/{release.metadata['registered_model']}/{int(float(release.metadata['version']))}"


def artifact_digest(artifact: Any) -> str:
    """An input artifact's digest: from its metadata, else computed from its content."""
    from step3vl.pipeline.lineage import checkpoint_digest, data_digest

    if artifact.metadata.get("digest"):
        return str(artifact.metadata["digest"])
    if type(artifact).schema_title == "system.Model":
        return checkpoint_digest(model_dir(artifact))
    return data_digest(data_dir(artifact))


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    """Every finite value onto the ``Metrics`` artifact, and the same as JSON in its file."""
    clean: dict[str, float] = {}
    for k, v in values.items():
        v = float(v)
        if math.isfinite(v):
            clean[k] = v
            metrics.log_metric(k, v)
        else:
            log.warning("metric %s is %s: not logged", k, v)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(clean, indent=1, sort_keys=True) + "\n")


def _leave_pointer(artifact: Any, key: str, uri: str) -> None:
    """An output artifact whose content was published to ``uri``: emptied, it holds only ``REMOTE.json`` and the
    ``key`` metadata (what KFP's launcher downloads into each consuming pod)."""
    import shutil

    shutil.rmtree(artifact.path, ignore_errors=True)
    artifact.metadata[key] = uri
    _point_to(Path(artifact.path), {key: uri})


def _point_to(path: Path, pointer: dict[str, str]) -> None:
    """Write ``REMOTE.json`` (where the output artifact's content lives) into the artifact's folder at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{REMOTE_FILE}.tmp"
    tmp.write_text(json.dumps(pointer) + "\n")
    tmp.replace(path / REMOTE_FILE)


def _stamp(artifact: Any, st: Stage, **extra: Any) -> None:
    from step3vl.config import config_hash

    artifact.metadata.update({"stage": st.name, "mlflow_run_id": st.mlflow_run_id,
                              "config_hash": config_hash(st.cfg), **extra})
