"""A thin MLflow helper: where runs go, one parent run per pipeline with a child run per stage,
the resolved config logged as params + a YAML artifact, and secrets never logged.

Tracking URI: ``$MLFLOW_TRACKING_URI`` > ``tracking.uri`` in config > the embedded default
``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts`` (``<home>`` is
``$STEP3VL_HOME`` or ``./.step3vl``).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from step3vl.config import TrackingConfig, flatten, to_dict
from step3vl.errors import Step3VLError

SECRET_KEY_RE = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|credential)", re.I)
# env vars whose values must never appear in anything we log
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "STEP3VL_API_KEY",
)
REDACTED = "***"


def home() -> Path:
    """The project's local state directory (SQLite store, local artifacts, caches)."""
    return Path(os.environ.get("STEP3VL_HOME", ".step3vl")).resolve()


def tracking_uri(cfg: TrackingConfig | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if cfg is not None and cfg.uri:
        return cfg.uri
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{h / 'mlflow.db'}"


def default_artifact_location() -> str | None:
    """Local artifact root for the embedded store; None lets a tracking server decide."""
    uri = tracking_uri()
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        return (home() / "mlartifacts").as_uri()
    return None


def _secret_values() -> list[str]:
    return [v for k in SECRET_ENV_VARS if (v := os.environ.get(k)) and len(v) >= 4]


def redact(value: Any, key: str = "") -> Any:
    """Mask values under secret-looking keys and any occurrence of a secret env value."""
    if key and SECRET_KEY_RE.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(value, str):
        for s in _secret_values():
            value = value.replace(s, REDACTED)
    return value


def redact_dict(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out[k] = redact_dict(v) if isinstance(v, dict) else redact(v, k)
    return out


class TrackingUnavailable(Step3VLError):
    """The MLflow tracking store cannot be reached; the message names its URI (credentials masked)."""


def display_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` part masked, for error messages."""
    return re.sub(r"//[^/@\s]*@", "//***@", uri)


def preflight(uri: str | None = None, timeout: float = 5.0, *, replay: bool = True) -> str:
    """Fail fast, naming the URI, when the tracking store is unreachable; returns the URI checked.

    MLflow's own client retries an unreachable server for minutes (7 retries, exponential backoff)
    before a run can even start; this one request answers in ``timeout`` seconds at most. An HTTP
    server counts as reachable if it answers at all, except 502/503/504 (a gateway speaking for a
    server that is down): auth and routing are MLflow's business. A ``sqlite:``/``file:`` store needs
    its directory to exist or be creatable; a SQLite store is created here, under a lock. With
    ``replay``, journals left by stages that lost the server are then sent (:func:`replay_journals`).
    """
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    shown = display_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            bare = re.sub(r"//[^/@]*@", "//", uri)  # reachability only: credentials are MLflow's to send
            with urllib.request.urlopen(bare.rstrip("/") + "/health", timeout=timeout):
                pass
        except urllib.error.HTTPError as e:
            if e.code in (502, 503, 504):  # a gateway or proxy answering for a server that is down
                raise TrackingUnavailable(f"MLflow tracking server {shown} is unreachable (HTTP {e.code} from "
                                          f"a gateway); start it or point MLFLOW_TRACKING_URI / tracking.uri "
                                          f"elsewhere") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingUnavailable(f"MLflow tracking server {shown} is unreachable ({reason}); start it or "
                                      f"point MLFLOW_TRACKING_URI / tracking.uri elsewhere") from None
    elif uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        if uri.startswith("sqlite:"):  # sqlite:///relative.db, sqlite:////absolute.db
            where = Path(uri.removeprefix("sqlite:").removeprefix("///")).parent
        else:
            where = Path(urlsplit(uri).path if uri.startswith("file:") else uri)
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingUnavailable(f"MLflow tracking store {shown}: cannot create {where} ({e.strerror or e})"
                                      ) from None
        if not os.access(where, os.W_OK):
            raise TrackingUnavailable(f"MLflow tracking store {shown}: {where} is not writable")
        if uri.startswith("sqlite:"):
            _create_sqlite_store(uri, where)
    if replay:
        replay_journals(uri, strict=False)
    return uri


def _create_sqlite_store(uri: str, where: Path) -> None:
    """Create (or migrate) an embedded SQLite store under a file lock.

    Two runs starting at once on a fresh store otherwise both run MLflow's schema migrations and one
    fails ("duplicate column name", "Online migration expected to match one row"); once the schema
    exists, opening it is a no-op.
    """
    import mlflow

    from step3vl.storage import file_lock

    with file_lock(where / ".step3vl-mlflow-init.lock"):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)


def setup(cfg: TrackingConfig) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        mlflow.set_experiment(cfg.experiment)
        return exp.experiment_id
    try:
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=default_artifact_location())
    except Exception:  # lost a creation race with another run: the experiment exists now
        exp = mlflow.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_config(cfg: Any, name: str = "config.yaml") -> None:
    """Log a resolved config as flat params (redacted) and as a YAML artifact."""
    import mlflow
    import yaml

    data = redact_dict(to_dict(cfg))
    params = {k: str(v)[:6000] for k, v in flatten(data).items()}
    for chunk_start in range(0, len(params), 100):
        mlflow.log_params(dict(list(params.items())[chunk_start : chunk_start + 100]))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(yaml.safe_dump(data, sort_keys=False))
        mlflow.log_artifact(str(p))


@contextlib.contextmanager
def pipeline_run(cfg: TrackingConfig, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    """The parent run of one pipeline execution."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_name=run_name, tags={k: str(redact(v, k)) for k, v in (tags or {}).items()}) as run:
        yield run


class TrackingLost(TrackingUnavailable):
    """The tracking server went away during a stage and did not come back in time; nothing is lost: the
    unsent points are in the run's journal, sent (and the run marked failed) by the next command that
    reaches the server (``step3vl tracking replay``, or any ``step3vl run``/``stage`` preflight)."""


class TrackingRunMissing(Step3VLError):
    """The tracking store answers but has no run with the id a stage was told to log into."""


class TrackingRefused(Step3VLError):
    """The tracking store answered a stage's records with an error that no retry can fix (its run deleted
    mid-stage, a value it rejects): they are kept in a journal of their own, which is never replayed."""


# MLflow error codes of a store that answered, and will answer the same to the same request: not a lost server
REFUSED_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_STATE", "BAD_REQUEST",
                           "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND"})
REFUSED_SUFFIX = ".refused"  # a journal of refused records: kept for people, never replayed


def _refusal(e: BaseException) -> str | None:
    """The MLflow error code if ``e`` is a store's answer that retrying cannot change, else None."""
    code = getattr(e, "error_code", None)
    return code if code in REFUSED_CODES else None


def journal_dir() -> Path:
    return home() / "tracking-journal"


class MetricSink:
    """A stage's metrics and artifacts, sent to its MLflow run from a background thread.

    Training never waits on the tracking server: :meth:`log_metrics` appends to a write-ahead journal
    (``<home>/tracking-journal/<run_id>.jsonl``) and returns. The worker sends in batches and appends an
    ``ack`` line after each. If the server goes away, training goes on; the worker warns once, probes
    the server's ``/health`` with backoff (at most :attr:`PROBE_MAX_S` apart), and sends the backlog when
    it answers. :meth:`close` waits (``flush_timeout_s``) for the backlog; if the server is still gone it
    raises :class:`TrackingLost` naming the server and the journal. The journal outlives the process (a
    SIGKILL included): it is flock-ed while its writer lives, and :func:`replay_journals` sends what was
    never acknowledged and marks a run still RUNNING as FAILED.

    A store that answers with an error no retry can fix (:data:`REFUSED_CODES`: the run deleted mid-stage, a
    rejected value) is not a lost server: those records are set aside at once, the rest still go, and
    :meth:`close` raises :class:`TrackingRefused` without waiting, keeping the journal under
    ``<run_id>.jsonl.refused``.
    """

    BATCH = 1000  # MLflow's per-request limit on metrics
    # a lost server's /health is probed 1, 2, 4 then every 5 s: one cheap GET, and the backlog goes out within
    # ~5 s of the server answering again (at a 15 s cap a restarted server waited up to 15 s for its points)
    PROBE_MAX_S = 5.0

    def __init__(self, run_id: str, uri: str, stage: str, journal: Path | None = None) -> None:
        import fcntl
        import json
        import threading

        self.run_id, self.uri, self.stage = run_id, uri, stage
        self.path = journal or journal_dir() / f"{run_id}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the sink's life)
        fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._json = json
        self._write({"kind": "header", "run_id": run_id, "tracking_uri": display_uri(uri), "stage": stage,
                     "pid": os.getpid()})
        self._pending: list[dict[str, Any]] = []
        self._acked = 0
        self._cv = threading.Condition()
        self._closing = False
        self._abandoned = False  # close() gave up: the journal is the record now, the worker stops
        self.lost_since: float | None = None
        self.last_error = ""
        self.refused = 0  # records the store refused for good
        self.refusal = ""  # its first refusal, for the error
        self.sent_after_loss = 0
        self._client = _client(uri)
        self._thread = threading.Thread(target=self._work, name=f"mlflow-sink-{stage}", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- producer side (training thread)
    def _write(self, obj: dict[str, Any]) -> None:
        self._f.write(self._json.dumps(obj) + "\n")
        self._f.flush()

    def _put(self, item: dict[str, Any]) -> None:
        with self._cv:
            self._write(item)
            self._pending.append(item)
            self._cv.notify()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            self._put({"kind": "metric", "key": k, "value": float(v), "step": int(step or 0), "ts": ts})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._put({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    @property
    def abandoned(self) -> bool:
        """:meth:`close` gave up on a server that is gone: the journal holds what was not sent."""
        return self._abandoned

    @property
    def backlog(self) -> int:
        with self._cv:
            return len(self._pending)

    # ----------------------------------------------------------------- worker
    def _work(self) -> None:
        import time

        delay = 1.0
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending or self._abandoned:
                    return
                first = self._pending[0]
                if first["kind"] == "artifact":
                    batch = [first]
                else:
                    batch = []
                    for it in self._pending[: self.BATCH]:
                        if it["kind"] != "metric":
                            break
                        batch.append(it)
            if self.lost_since is not None and not _reachable(self.uri):
                time.sleep(delay)
                delay = min(delay * 2, self.PROBE_MAX_S)
                continue
            try:
                _send(self._client, self.run_id, batch)
            except Exception as e:  # noqa: BLE001 (any failure to reach the store: keep the points, retry)
                code = _refusal(e)
                if code is not None:  # the store answered, and will answer the same: set the batch aside
                    delay = 1.0
                    if not self._done(batch, redact(display_uri(f"{code}: {str(e)[:300]}"))):
                        return
                    continue
                if self.lost_since is None:
                    self.lost_since = time.monotonic()
                    self.last_error = redact(display_uri(f"{type(e).__name__}: {str(e)[:200]}"))
                    _log().warning("MLflow tracking server %s unreachable during %s (%s); training continues, "
                                   "metrics are journaled in %s and sent when it answers again",
                                   display_uri(self.uri), self.stage, self.last_error, self.path)
                time.sleep(delay)
                delay = min(delay * 2, self.PROBE_MAX_S)
                continue
            delay = 1.0
            if not self._done(batch):
                return

    def _done(self, batch: list[dict[str, Any]], refused: str | None = None) -> bool:
        """Acknowledge the batch at the head of the backlog: sent, or (``refused``: the store's answer) set
        aside. False when :meth:`close` gave up meanwhile (the worker stops)."""
        with self._cv:
            if self._abandoned:  # sent after close() gave up: a replay may send it again (rare duplicates)
                return False
            del self._pending[: len(batch)]
            self._acked += len(batch)
            if refused is not None:
                self._write({"kind": "refused", "n": len(batch), "error": refused})
                if not self.refused:
                    self.refusal = refused
                    _log().warning("MLflow at %s refused records of %s for run %s (%s); the stage goes on, and "
                                   "they are kept in %s", display_uri(self.uri), self.stage, self.run_id, refused,
                                   self.path)
                self.refused += len(batch)
            self._write({"kind": "ack", "n": self._acked})
            if self.lost_since is not None:
                if refused is None:
                    self.sent_after_loss += len(batch)
                if not self._pending:
                    _log().warning("MLflow tracking server %s answers again: sent %d journaled points of %s",
                                   display_uri(self.uri), self.sent_after_loss, self.stage)
                    self.lost_since = None
            self._cv.notify_all()
            return True

    def close(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for every point to be sent; delete the journal when all were.

        Raises :class:`TrackingLost` (the journal kept) when the server did not take them in time."""
        import time

        deadline = time.monotonic() + timeout
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self._pending)
            if left:
                self._abandoned = True
        if left == 0:
            self._thread.join(timeout=5)
            self._f.close()
            if not self.refused:
                self.path.unlink(missing_ok=True)
                return
            kept = self.path.with_name(self.path.name + REFUSED_SUFFIX)
            self.path.replace(kept)  # out of replay's way: the store would refuse them again
            raise TrackingRefused(
                f"MLflow at {display_uri(self.uri)} refused {self.refused} metric/artifact records of {self.stage} "
                f"for run {self.run_id} ({self.refusal}); the stage's work is done and its checkpoints are kept; "
                f"the refused records are in {kept}")
        self._f.close()  # releases the lock: a later replay may now send the backlog
        raise TrackingLost(
            f"MLflow tracking server {display_uri(self.uri)} went away during {self.stage} and did not come back "
            f"within {timeout:.0f} s ({self.last_error or 'no answer'}); the stage's work is done and its "
            f"checkpoints are kept, but {left} metric/artifact records of run {self.run_id} are not in MLflow yet: "
            f"they are journaled in {self.path} and will be sent, and the run marked FAILED, by "
            f"`step3vl tracking replay` (or the next `step3vl run`/`stage` preflight) once the server answers")


def _log() -> Any:
    import logging

    return logging.getLogger("step3vl.tracking")


def _reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True  # a local store: just try again
    try:
        preflight(uri, timeout=2.0, replay=False)
    except TrackingUnavailable:
        return False
    return True


def _client(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _send(client: Any, run_id: str, batch: list[dict[str, Any]]) -> None:
    """One journal batch to the run: a single artifact, or up to :attr:`MetricSink.BATCH` metric points."""
    from mlflow.entities import Metric

    if batch[0]["kind"] == "artifact":
        client.log_artifact(run_id, batch[0]["path"], batch[0]["artifact_path"])
        return
    client.log_batch(run_id, metrics=[Metric(m["key"], m["value"], m["ts"], m["step"]) for m in batch],
                     synchronous=True)


_SINK: MetricSink | None = None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log to the active stage run: through its journaled sink when there is one (training never waits on
    the server), else straight to MLflow when a run is active, else nowhere."""
    if _SINK is not None:
        _SINK.log_metrics(metrics, step)
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics(metrics, step=step)


def log_artifact(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    if _SINK is not None:
        _SINK.log_artifact(path, artifact_path)
        return
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(path), artifact_path)


@dataclass(frozen=True)
class Replayed:
    journal: Path
    run_id: str
    sent: int
    marked_failed: bool


def replay_journals(uri: str | None = None, *, strict: bool = True) -> list[Replayed]:
    """Send what dead writers journaled but never got acknowledged; mark their runs FAILED if still RUNNING.

    A journal whose writer is alive (its flock held) is left alone; one for another tracking URI too.
    If the server refuses a backlog the journal stays, and :class:`TrackingUnavailable` is raised
    (``strict``) or a warning naming the journal is logged."""
    import fcntl
    import json

    uri = uri or tracking_uri()
    out: list[Replayed] = []
    d = journal_dir()
    if not d.is_dir():
        return out
    for path in sorted(d.glob("*.jsonl")):
        with open(path, "a+", encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is still running
            f.seek(0)
            items, acked, header = [], 0, None
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill mid-write
                kind = rec.get("kind")
                if kind == "header":
                    header = rec
                elif kind == "ack":
                    acked = max(acked, int(rec["n"]))
                elif kind in ("metric", "artifact"):
                    items.append(rec)
            if header is None or header.get("tracking_uri") != display_uri(uri):
                continue
            todo = [it for it in items[acked:] if it["kind"] != "artifact" or Path(it["path"]).exists()]
            run_id = header["run_id"]
            points = [it for it in todo if it["kind"] == "metric"]
            try:
                client = _client(uri)
                for i in range(0, len(points), MetricSink.BATCH):
                    _send(client, run_id, points[i : i + MetricSink.BATCH])
                for it in todo:
                    if it["kind"] == "artifact":
                        _send(client, run_id, [it])
                run = client.get_run(run_id)
                failed = run.info.status == "RUNNING"
                client.set_tag(run_id, "step3vl.tracking.replayed",
                               f"{len(todo)} journaled records sent after the server was lost during {header['stage']}")
                if failed:
                    client.set_terminated(run_id, "FAILED")
            except Exception as e:  # noqa: BLE001
                msg = redact(display_uri(f"replaying {path} into {uri} failed: {type(e).__name__}: {str(e)[:300]}"))
                if strict:
                    raise TrackingUnavailable(msg) from e
                _log().warning("%s; the journal is kept", msg)
                continue
        path.unlink()
        _log().warning("replayed %d journaled records into run %s (%s)%s", len(todo), run_id, header["stage"],
                       "; marked it FAILED" if failed else "")
        out.append(Replayed(path, run_id, len(todo), failed))
    return out


@contextlib.contextmanager
def stage_run(
    stage: str, cfg: TrackingConfig, *, parent_run_id: str | None = None, config: Any = None
) -> Iterator[Any]:
    """A child run for one stage (nested under ``parent_run_id`` when given); logs ``config``.

    Inside it, :func:`log_metrics`/:func:`log_artifact` go through a journaled :class:`MetricSink`, so
    the tracking server going away does not stop the stage (see the class)."""
    import mlflow

    preflight(tracking_uri(cfg))  # seconds, not MLflow's minutes of retries; sends journals a lost server left
    setup(cfg)
    from step3vl.devices import describe

    tags = {"step3vl.stage": stage, "step3vl.device": describe()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(run_name=stage, tags=tags, nested=mlflow.active_run() is not None)
    sink: MetricSink | None = None
    status = "FAILED"
    try:
        if config is not None:
            log_config(config)
        with attached_run(run.info.run_id, tracking_uri(cfg), stage, cfg.flush_timeout_s) as sink:
            yield run
        status = "FINISHED"
    finally:
        if sink is not None and sink.abandoned:
            _end_run_without_server()  # the server is gone: no minutes of retries
        elif sink is not None and sink.refused:
            try:
                mlflow.end_run(status)  # pops the run first; a deleted run refuses this too, and that is said
            except Exception as e:  # noqa: BLE001
                if _refusal(e) is None:
                    raise
        else:
            mlflow.end_run(status)


@contextlib.contextmanager
def attached_run(run_id: str, uri: str, stage: str, flush_timeout_s: float) -> Iterator[MetricSink]:
    """Route :func:`log_metrics`/:func:`log_artifact` into the run ``run_id`` through a journaled
    :class:`MetricSink`, leaving the run itself open: :func:`stage_run` inside its own run, a TrainJob's rank 0
    inside its component's. Raises :class:`TrackingLost` when the body succeeded but its points could not be
    sent, :class:`TrackingRefused` when the store refused some; after a body that failed, its own error wins
    (``sink.abandoned`` and ``sink.refused`` tell)."""
    global _SINK
    if _SINK is not None:
        raise RuntimeError(f"attached_run({run_id}): a stage run's sink is already active ({_SINK.run_id})")
    sink = _SINK = MetricSink(run_id, uri, stage)
    ok = False
    try:
        yield sink
        ok = True
    finally:
        _SINK = None
        try:
            sink.close(flush_timeout_s)
        except (TrackingLost, TrackingRefused):
            if ok:
                raise


def require_run(run_id: str, uri: str, stage: str) -> None:
    """Refuse, before any work, a run the store says does not exist: a run id handed to another process (a
    TrainJob's or a pod's ranks) with a wrong tracking URI. Their sink would take every refused point for a lost
    server and retry until its flush timeout. A store that does not answer is not judged here: the sink journals
    and retries, as designed."""
    if not _reachable(uri):
        return
    from mlflow.exceptions import MlflowException

    with _one_http_attempt(timeout_s=10):
        try:
            _client(uri).get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise TrackingRunMissing(
                    f"{stage}: MLflow run {run_id} does not exist in {display_uri(uri)}; check the tracking URI the "
                    "stage was given (MLFLOW_TRACKING_URI, tracking.uri)") from None
        except Exception:  # noqa: BLE001, S110 (not answering now: the sink's retries deal with that)
            pass


@contextlib.contextmanager
def _one_http_attempt(timeout_s: float) -> Iterator[None]:
    """MLflow's HTTP client without its minutes of retries, for the block."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(timeout_s)))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _end_run_without_server() -> None:
    """Leave the active run without MLflow's minutes of retries against a server that is gone: one quick
    attempt at marking it FAILED; a replay marks it later otherwise."""
    import mlflow

    with _one_http_attempt(timeout_s=3):
        try:
            mlflow.end_run("FAILED")  # pops the active run first, then tries the server once
        except Exception:  # noqa: BLE001, S110 (the server is gone: that is the point)
            pass
