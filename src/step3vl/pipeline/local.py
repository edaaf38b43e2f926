"""``step3vl run``: the pipeline on the KFP local runner, tracked by an MLflow parent run.

One run:

1. resolves the config to YAML text (what every component gets, and what caching keys on);
2. opens the MLflow parent run and logs the config;
3. builds the DAG for :class:`~step3vl.pipeline.dag.LocalTarget` (cache keys; with ``from_stage`` +
   ``resume_from``, the stages before ``from_stage`` are imported from that earlier run's outputs);
4. runs it with ``kfp.local.SubprocessRunner(use_venv=False)`` under ``<home>/kfp`` with caching on,
   task output going to ``<home>/kfp/logs/<run>.log`` and a live per-stage status;
5. records every stage's artifacts (URI, metadata, metrics), status and cache key in the parent run
   as ``pipeline_outputs.json`` (plus tags and metrics), which is what ``--resume-from`` reads.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from step3vl.config import PipelineConfig, config_hash
from step3vl.errors import Step3VLError
from step3vl.pipeline import warm
from step3vl.pipeline.dag import LocalTarget, ReusedOutput, ReusedStage, field_name, output_classes, pipeline_module
from step3vl.pipeline.runtime import config_text
from step3vl.pipeline.status import StatusBoard

OUTPUTS_ARTIFACT = "pipeline_outputs.json"
OUTPUTS_FORMAT = "step3vl-pipeline-outputs/1"
_MLFLOW_KEY_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")


class PipelineFailed(Step3VLError):
    """A stage failed; ``result`` holds what ran, ``tail`` the failing task's last log lines."""

    def __init__(self, message: str, result: RunResult, tail: list[str]) -> None:
        super().__init__(message)
        self.result = result
        self.tail = tail


@dataclass
class StageResult:
    stage: str
    status: str  # done | cached | reused | failed | not run
    seconds: float | None = None  # wall time in this run, as the runner saw it
    cache_key: str = ""
    code_digest: str = ""  # of the step3vl code the stage can run (part of its cache key)
    mlflow_run_id: str = ""  # the run that produced the outputs (an earlier one when cached/reused)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → {uri, type, metadata}
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return self.status in ("done", "failed")

    @property
    def primary_uri(self) -> str:
        """The stage's main artifact: its first output that is not metrics."""
        for o in self.outputs.values():
            if o["type"] != "system.Metrics":
                return o["uri"]
        return ""


@dataclass
class RunResult:
    run_name: str
    status: str  # succeeded | failed
    seconds: float
    stages: list[StageResult]
    mlflow_run_id: str = ""
    config_hash: str = ""
    pipeline_root: str = ""
    log_path: str = ""
    resumed_from: str = ""
    from_stage: str = ""

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.stage == name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = OUTPUTS_FORMAT
        d["stages"] = {s.stage: {k: v for k, v in asdict(s).items() if k != "stage"} for s in self.stages}
        return d


# --------------------------------------------------------------------------- the log sink


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r" - INFO - Executing task '([^']+)'")
_CACHE_HIT = re.compile(r" - INFO - Task (\S+) cache hit")
_ITERATION = re.compile(r"-iteration-\d+$")
_FINISHED = re.compile(r" - (?:INFO|ERROR) - Task '([^']+)' finished with status (SUCCESS|FAILURE)")
_OWN_LOG = re.compile(r"^\d\d:\d\d:\d\d (?:INFO|WARNING|ERROR) step3vl[\w.]*: (.*)")


class LogSink(io.TextIOBase):
    """Stands in for stdout while ``kfp.local`` runs: every line goes to the log file, and the runner's
    own lines ("Executing task", "cache hit", "finished with status") move the status board.

    ``kfp.local`` reports progress only through these log lines (and task output through ``print``);
    they are matched here and nowhere else, against the pinned kfp version.
    """

    encoding = "utf-8"

    def __init__(self, path: Path, board: StatusBoard, task_to_stage: dict[str, str],
                 step_tasks: dict[str, str] | None = None) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed in close())
        self._board = board
        self._stages = task_to_stage
        self._steps = dict(step_tasks or {})  # the tasks before a planned stage's last: they never finish it
        self._buf = ""
        self.current: str | None = None
        self.failed: str | None = None
        self.tails: dict[str, deque[str]] = {s: deque(maxlen=40) for s in task_to_stage.values()}

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        self._file.write(s)
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(s)

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if self._buf:
            self._line(_ANSI.sub("", self._buf))
            self._buf = ""
        super().close()
        self._file.close()

    def _step(self, task: str) -> str | None:
        return self._steps.get(_ITERATION.sub("", task))

    def _line(self, line: str) -> None:
        if (m := _EXECUTING.search(line)) and (stage := self._step(m[1])):
            self.current = stage
            if self._board.status(stage) != "running":
                self._board.set(stage, "running", m[1])
            else:
                self._board.detail(stage, m[1])
        elif (m := _FINISHED.search(line)) and (stage := self._step(m[1])):
            if m[2] != "SUCCESS":
                self._board.set(stage, "failed")
                self.failed = stage
        elif m := _EXECUTING.search(line):
            stage = self._stages.get(m[1])
            if stage:
                self.current = stage
                if self._board.status(stage) != "running":  # running already: its earlier tasks ran
                    self._board.set(stage, "running")
        elif m := _CACHE_HIT.search(line):
            stage = self._stages.get(m[1])
            if stage:
                self._board.set(stage, "cached")
        elif m := _FINISHED.search(line):
            stage = self._stages.get(m[1])
            if stage:
                ok = m[2] == "SUCCESS"
                self._board.set(stage, "done" if ok else "failed")
                if not ok:
                    self.failed = stage
                self.current = None
        elif self.current and line.strip():
            text = line.strip()
            self.tails[self.current].append(line)
            if m := _OWN_LOG.match(text):
                self._board.detail(self.current, m[1])


# --------------------------------------------------------------------------- resume


def find_run(ref: str, cfg: PipelineConfig) -> str:
    """An MLflow run id from an id or a run name (the newest run of that name in the experiment)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from step3vl import tracking

    tracking.setup(cfg.tracking)
    client = mlflow.MlflowClient()
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref).info.run_id
        except MlflowException:
            pass
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list", max_results=1,
                              filter_string=f"attributes.run_name = '{ref}' and tags.`step3vl.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise Step3VLError(f"no pipeline run '{ref}' in MLflow experiment '{cfg.tracking.experiment}'")
    return runs[0].info.run_id


def load_outputs(run_id: str) -> dict[str, Any]:
    """The ``pipeline_outputs.json`` an earlier ``step3vl run`` recorded in its MLflow parent run."""
    import mlflow

    with tempfile.TemporaryDirectory() as d, _env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=OUTPUTS_ARTIFACT, dst_path=d)
        except Exception as e:  # MlflowException or OSError, depending on the artifact store
            raise Step3VLError(f"MLflow run {run_id} has no {OUTPUTS_ARTIFACT}: not a step3vl pipeline run ({e})"
                               ) from None
        data = json.loads(Path(path).read_text())
    if data.get("format") != OUTPUTS_FORMAT:
        raise Step3VLError(f"MLflow run {run_id}: {OUTPUTS_ARTIFACT} is not {OUTPUTS_FORMAT}")
    return data


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def plan_reuse(stages: list[str], from_stage: str, previous: dict[str, Any]) -> dict[str, ReusedStage]:
    """The stages before ``from_stage``, as the artifacts the earlier run recorded for them."""
    if from_stage not in stages:
        raise Step3VLError(f"--from-stage {from_stage}: not a stage of the pipeline ({', '.join(stages)})")
    reuse = {}
    for stage in stages[: stages.index(from_stage)]:
        rec = previous["stages"].get(stage) or {}
        if rec.get("status") not in ("done", "cached", "reused") or not rec.get("outputs"):
            raise Step3VLError(f"cannot start at {from_stage}: run {previous['run_name']} has no outputs of {stage} "
                               f"(status: {rec.get('status', 'absent')})")
        outs = {}
        for name, o in rec["outputs"].items():
            if "://" not in o["uri"] and not Path(o["uri"]).exists():
                raise Step3VLError(f"cannot reuse {stage}: its output {name} ({o['uri']}) no longer exists")
            outs[name] = ReusedOutput(o["uri"], o["type"], o["metadata"])
        reuse[stage] = ReusedStage(rec["cache_key"], outs)
    return reuse


# --------------------------------------------------------------------------- the run


def run_local(cfg: PipelineConfig, *, run_name: str | None = None, from_stage: str | None = None,
              resume_from: str | None = None, cache: bool = True, board: StatusBoard | None = None,
              warm_tasks: bool | None = None) -> RunResult:
    """Run the whole pipeline locally; raises :class:`PipelineFailed` (with the result) if a stage fails.

    ``warm_tasks``: fork each task from a process that imported the stack once (:mod:`.warm`); ``None``
    reads ``$STEP3VL_WARM_TASKS`` (default on)."""
    import kfp.local

    from step3vl import tracking

    t0 = time.perf_counter()
    module = pipeline_module()
    stages = list(module.STAGES)
    config_yaml = config_text(cfg)
    run_name = run_name or f"{cfg.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    if bool(from_stage) != bool(resume_from):
        raise Step3VLError("--from-stage and --resume-from go together: start at a stage, reusing an earlier run")
    warm_tasks = warm.enabled() if warm_tasks is None else warm_tasks  # a bad $STEP3VL_WARM_TASKS: before any run
    tracking.preflight(tracking.tracking_uri(cfg.tracking))  # seconds, not MLflow's minutes of retries
    reuse: dict[str, ReusedStage] = {}
    previous_id = ""
    if from_stage and resume_from:
        previous_id = find_run(resume_from, cfg)
        reuse = plan_reuse(stages, from_stage, load_outputs(previous_id))
    root = tracking.home() / "kfp"
    log_path = root / "logs" / f"{run_name}.log"
    board = board or StatusBoard(stages)
    board.log_path = str(log_path)
    for stage in reuse:
        board.set(stage, "reused", f"from {resume_from}")
    target = LocalTarget(config_yaml, reuse=reuse, caching=cache)
    pipeline = module.build_pipeline(target)

    tags = {"step3vl.kind": "pipeline", "step3vl.runner": "kfp-local", "step3vl.config_hash": config_hash(cfg),
            "step3vl.log": str(log_path)}
    if previous_id:
        tags.update({"step3vl.resumed_from": previous_id, "step3vl.from_stage": str(from_stage)})
    with tracking.pipeline_run(cfg.tracking, run_name, tags=tags) as parent:
        tracking.log_config(cfg)
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
                       enable_caching=cache, cache_root=str(root / "cache"), raise_on_error=True)
        sink = LogSink(log_path, board, {s.replace("_", "-"): s for s in stages}, target.step_tasks)
        error: Exception | None = None
        outputs: dict[str, Any] = {}
        try:
            with contextlib.redirect_stdout(sink), _root_log_to(sink), warnings.catch_warnings(), \
                    warm.warm_tasks(warm_tasks):
                # the trainer image is not a python:* image; the subprocess runner uses this venv anyway
                warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
                task = pipeline(config_yaml=config_yaml, mlflow_parent_run_id=parent.info.run_id,
                                pipeline_run_name=run_name)
            outputs = dict(task.outputs)
        except RuntimeError as e:  # kfp.local: "Pipeline ... finished with status FAILURE"
            error = e
        finally:
            sink.close()
        result = _collect(module.STAGES, outputs, board, target, run_name, error is None)
        result.seconds = time.perf_counter() - t0
        result.mlflow_run_id = parent.info.run_id
        result.config_hash = config_hash(cfg)
        result.pipeline_root = str(root)
        result.log_path = str(log_path)
        result.resumed_from, result.from_stage = (resume_from or ""), (from_stage or "")
        _record(result)
        if error is not None:
            failed = sink.failed or next((s.stage for s in result.stages if s.status == "failed"), "?")
            raise PipelineFailed(f"stage {failed} failed (task log: {log_path})", result,
                                 list(sink.tails.get(failed, [])))
    return result


@contextlib.contextmanager
def _root_log_to(stream: LogSink) -> Iterator[None]:
    """Root INFO records into the sink: ``kfp.local`` logs cache hits outside its own logger context,
    where they would otherwise be dropped."""
    root = logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _collect(stages: dict[str, Any], outputs: dict[str, Any], board: StatusBoard, target: LocalTarget,
             run_name: str, ok: bool) -> RunResult:
    results = []
    for stage, component in stages.items():
        status = board.status(stage)
        if ok and status == "pending":
            status = "cached"  # succeeded without ever executing
        elif ok and status == "running":
            status = "done"
        elif not ok and status in ("pending", "running"):
            status = "failed" if status == "running" else "not run"
        r = StageResult(stage, status, board.stages[stage].seconds if stage in board.stages else None,
                        cache_key=target.keys.get(stage, ""), code_digest=target.code_digests.get(stage, ""))
        for out in output_classes(component):  # declaration order: the first non-metrics one is the main one
            a = outputs.get(field_name(stage, out))
            if a is None:
                continue
            meta = {k: _plain(v) for k, v in a.metadata.items()}
            r.outputs[out] = {"uri": a.uri, "type": a.schema_title, "metadata": meta}
            if a.schema_title == "system.Metrics":
                r.metrics = {k: float(v) for k, v in meta.items() if isinstance(v, (int, float))}
            elif not r.mlflow_run_id:
                r.mlflow_run_id = str(meta.get("mlflow_run_id", ""))
        results.append(r)
    return RunResult(run_name, "succeeded" if ok else "failed", 0.0, results)


def _plain(v: Any) -> Any:
    """protobuf Struct values (floats, lists, dicts) back to JSON-able Python."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _record(result: RunResult) -> None:
    """The run's outputs into its MLflow parent run: the JSON artifact, a tag per stage, stage metrics."""
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / OUTPUTS_ARTIFACT
        p.write_text(json.dumps(result.to_dict(), indent=1, sort_keys=True))
        mlflow.log_artifact(str(p))
    tags = {"step3vl.pipeline_root": result.pipeline_root}
    metrics = {}
    for s in result.stages:
        tags[f"step3vl.stage.{s.stage}.status"] = s.status
        if s.mlflow_run_id:
            tags[f"step3vl.stage.{s.stage}.mlflow_run_id"] = s.mlflow_run_id
        if s.primary_uri:
            tags[f"step3vl.stage.{s.stage}.uri"] = s.primary_uri
        for k, v in s.metrics.items():
            metrics[_MLFLOW_KEY_BAD.sub("_", f"{s.stage}/{k}")] = v
    mlflow.set_tags(tags)
    if metrics:
        mlflow.log_metrics(metrics)
