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


def _display_uri(uri: str) -> str:
    """``uri`` with any ``user:password@`` part masked, for error messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def preflight(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast, naming the URI, when the tracking store is unreachable; returns the URI checked.

    MLflow's own client retries an unreachable server for minutes (7 retries, exponential backoff)
    before a run can even start; this one request answers in ``timeout`` seconds at most. An HTTP
    server counts as reachable if it answers at all, except 502/503/504 (a gateway speaking for a
    server that is down): auth and routing are MLflow's business. A ``sqlite:``/``file:`` store needs
    its directory to exist or be creatable; a SQLite store is created here, under a lock.
    """
    import urllib.error
    import urllib.request

    uri = uri or tracking_uri()
    shown = _display_uri(uri)
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
    return uri


def _create_sqlite_store(uri: str, where: Path) -> None:
    """Create (or migrate) an embedded SQLite store under a file lock.

    Two runs starting at once on a fresh store otherwise both run MLflow's schema migrations and one
    fails ("duplicate column name", "Online migration expected to match one row"); once the schema
    exists, opening it is a no-op.
    """
    import fcntl

    import mlflow

    with open(where / ".step3vl-mlflow-init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


@contextlib.contextmanager
def stage_run(
    stage: str, cfg: TrackingConfig, *, parent_run_id: str | None = None, config: Any = None
) -> Iterator[Any]:
    """A child run for one stage (nested under ``parent_run_id`` when given); logs ``config``."""
    import mlflow

    setup(cfg)
    tags = {"step3vl.stage": stage}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=stage, tags=tags, nested=mlflow.active_run() is not None) as run:
        if config is not None:
            log_config(config)
        yield run
