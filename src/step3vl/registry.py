"""The MLflow model registry for step3vl: lineage, the eval gate, promotion by alias, rollback.

Where it sits: a pipeline run's last stages call :func:`register_final` (a new version with its
lineage and eval metrics as tags, alias ``candidate``) and then :func:`promote`, which runs
:func:`gate` against the current ``champion`` and moves the alias only on a pass. ``step3vl
promote`` and ``step3vl registry list|show|rollback`` are the same functions from the CLI.

Weights never stream through the tracking server: a version's ``source`` is the checkpoint's
storage URI (a local path or ``s3://``), and only that URI, the sha256 of its manifest and the
lineage tags go through MLflow. ``models:/NAME@alias`` resolves back to that URI
(:func:`resolve_model_uri`), and the loader verifies every file against the manifest.

Every decision is recorded: the gate's result on the version (``step3vl.gate.<alias>.*`` tags) and
one JSON event per promotion attempt or rollback on the registered model (``step3vl.event.NNNNNN``),
which is the alias history ``registry show`` prints and ``rollback`` replays.

Concurrency: MLflow has no compare-and-set on aliases, so the read-gate-move sequence runs under a
:class:`RegistryLock`. Its atomic step is ``create_registered_model`` on a lock name: the store's
unique constraint lets exactly one creator win, on SQLite, on PostgreSQL and through a tracking
server alike, with no credentials beyond the registry's. A promotion also remembers the champion it
saw when it started; if another promotion moved the alias meanwhile it is refused with the winner
named, so two racing promotions end with one champion and one clear error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import os
import random
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from step3vl.config import PACKAGE_DIR, PromotionConfig, TrackingConfig, to_dict
from step3vl.errors import Step3VLError

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_TAG_KEY_BAD = re.compile(r"[^/\w.\- :]")

CANDIDATE = "candidate"
CHAMPION = "champion"
MANIFEST_TAG = "step3vl.manifest_sha256"
DATA_URI_TAG = "step3vl.data_uri"  # the data prep output the version was trained and evaluated on
DATA_HASH_TAG = re.compile(r"^step3vl\.data\.(?P<set>.+)\.sha256$")  # step3vl.data.<set>.sha256: its content hash
METRIC_TAG = "metric."  # + an eval metric key, e.g. metric.greedy/text_math/accuracy
EVENT_TAG = "step3vl.event."  # + a 6-digit sequence number, on the registered model
LOCK_PREFIX = "step3vl-lock."  # registered models named step3vl-lock.<model>.<alias> are locks
_EPS = 1e-9


class RegistryError(Step3VLError):
    """A registered model, version or alias does not exist or cannot be changed."""


class PromotionConflict(RegistryError):
    """Another promotion moved the alias between the moment this one read it and the moment it got the lock."""


class LockTimeout(RegistryError):
    """The alias stayed locked by another promotion for longer than the wait allowed."""


def client(cfg: TrackingConfig | None = None) -> Any:
    """An MlflowClient on ``$MLFLOW_TRACKING_URI`` > ``cfg.uri`` > the embedded store (see step3vl.tracking)."""
    import mlflow

    from step3vl.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.MlflowClient()


def _already_exists(e: Exception) -> bool:
    return "RESOURCE_ALREADY_EXISTS" in str(getattr(e, "error_code", ""))


def _not_found(e: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def default_actor() -> str:
    """Who is acting: ``$STEP3VL_ACTOR`` (a pipeline sets ``kfp:<run id>``) or ``user@host``."""
    env = os.environ.get("STEP3VL_ACTOR")
    if env:
        return env
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (some containers)
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


# --------------------------------------------------------------------------- resolve and register


def model_version(uri: str, tracking: TrackingConfig | None = None) -> Any:
    """The registered version ``models:/NAME@alias`` or ``models:/NAME/VERSION`` names (an MLflow ModelVersion)."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise RegistryError(f"'{uri}' is not of the form models:/NAME@alias or models:/NAME/VERSION")
    c = client(tracking)
    from mlflow.exceptions import MlflowException

    try:
        if m["alias"]:
            return c.get_model_version_by_alias(m["name"], m["alias"])
        return c.get_model_version(m["name"], m["version"])
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message}") from None


def resolve_model_uri(uri: str) -> str:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` → the checkpoint URI it points at."""
    return model_version(uri).source


@dataclass(frozen=True)
class RegisteredData:
    """The data a version records in its lineage: where data prep published it ("" when the version does not
    say: registered before step3vl recorded it, or by hand without ``--data``), and each set's content hash."""

    uri: str
    hashes: dict[str, str]


def registered_data(uri: str, tracking: TrackingConfig | None = None) -> RegisteredData:
    """The data lineage of the version ``models:/NAME@alias`` or ``models:/NAME/VERSION`` names."""
    tags = model_version(uri, tracking).tags
    hashes = {m["set"]: v for k, v in tags.items() if (m := DATA_HASH_TAG.match(k))}
    return RegisteredData(tags.get(DATA_URI_TAG, ""), hashes)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 over a published checkpoint's per-file sha256/size list (what ``MANIFEST.json`` vouches for)."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def register_checkpoint(name: str, checkpoint_uri: str, *, run_id: str | None, tags: dict[str, str],
                        tracking: TrackingConfig | None = None) -> Any:
    """Register a published checkpoint as a new version of ``name`` with lineage tags."""
    from mlflow.exceptions import MlflowException

    from step3vl.storage import read_manifest

    manifest = read_manifest(checkpoint_uri)  # refuses an unpublished checkpoint
    c = client(tracking)
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if not _already_exists(e):
            raise
    all_tags = {MANIFEST_TAG: manifest_digest(manifest), **{k: str(v) for k, v in tags.items()}}
    return c.create_model_version(name, source=checkpoint_uri, run_id=run_id, tags=all_tags)


def metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    """Eval metrics as version tags (``metric.<key>``; characters MLflow refuses in keys become ``_``)."""
    return {METRIC_TAG + _TAG_KEY_BAD.sub("_", k): f"{float(v):.6g}" for k, v in metrics.items()}


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    out = {}
    for k, v in tags.items():
        if k.startswith(METRIC_TAG):
            with contextlib.suppress(ValueError):
                out[k[len(METRIC_TAG):]] = float(v)
    return out


def git_commit() -> str:
    """The commit of the running code: ``$STEP3VL_GIT_COMMIT`` (set when an image is built), else the checkout's
    ``HEAD`` (``+dirty`` with uncommitted tracked changes), else ``unknown``."""
    env = os.environ.get("STEP3VL_GIT_COMMIT")
    if env:
        return env
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE_DIR,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def data_hashes(data_manifest: Mapping[str, Any]) -> dict[str, str]:
    """``{set: content_hash}`` from a data prep ``data_manifest.json``."""
    return {name: str(info["content_hash"]) for name, info in data_manifest.get("sets", {}).items()
            if "content_hash" in info}


def register_final(
    name: str,
    checkpoint_uri: str,
    *,
    metrics: Mapping[str, float],
    stage: str,
    config_hash: str,
    data_manifest_hashes: Mapping[str, str] | None = None,
    data_uri: str = "",
    kfp_run_id: str = "",
    parent_run_id: str = "",
    commit: str | None = None,
    run_id: str | None = None,
    alias: str = CANDIDATE,
    tracking: TrackingConfig | None = None,
) -> Any:
    """Register a pipeline run's final model as a new version of ``name`` and point ``alias`` at it.

    Tags: KFP run id, MLflow parent run id, git commit, config hash, every dataset's content hash and, when
    given, where the data is (``data_uri``: data prep's output directory, local or ``s3://``), every eval metric
    (``metric.<key>``), the stage the checkpoint came from, the manifest's sha256.
    """
    tags = {
        "step3vl.stage": stage,
        "step3vl.kfp_run_id": kfp_run_id or "none",
        "step3vl.mlflow_parent_run_id": parent_run_id or "none",
        "step3vl.git_commit": commit or git_commit(),
        "step3vl.config_hash": config_hash,
        "step3vl.registered_by": default_actor(),
        **{f"step3vl.data.{_TAG_KEY_BAD.sub('_', k)}.sha256": v for k, v in (data_manifest_hashes or {}).items()},
        **({DATA_URI_TAG: data_uri} if data_uri else {}),
        **metric_tags(metrics),
    }
    mv = register_checkpoint(name, checkpoint_uri, run_id=run_id, tags=tags, tracking=tracking)
    client(tracking).set_registered_model_alias(name, alias, mv.version)
    return mv


# --------------------------------------------------------------------------- the eval gate


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: ``reasons`` explain it either way; ``failing_families`` are the ones that failed."""

    passed: bool
    reasons: tuple[str, ...]
    failing_families: tuple[str, ...] = ()


def family_accuracies(metrics: Mapping[str, float], mode: str = "greedy") -> dict[str, float]:
    """``{family: accuracy}`` from ``<mode>/<family>/accuracy`` keys (the evaluate stage's metrics.json) or,
    when there are none, from ``<family>/accuracy`` keys (``EvalResult.metrics()`` without a prefix)."""
    suffix = "/accuracy"
    for m in (mode, _TAG_KEY_BAD.sub("_", mode)):  # majority@8 is majority_8 once stored as a tag
        prefixed = {k[len(m) + 1 : -len(suffix)]: float(v) for k, v in metrics.items()
                    if k.startswith(m + "/") and k.endswith(suffix) and k.count("/") == 2}
        if prefixed:
            return prefixed
    return {k[: -len(suffix)]: float(v) for k, v in metrics.items() if k.endswith(suffix) and k.count("/") == 1}


def gate(candidate: Mapping[str, float], champion: Mapping[str, float] | None, policy: PromotionConfig) -> GateDecision:
    """Compare a candidate's eval metrics with the champion's (None: there is no champion yet).

    Fails when a ``min_accuracy`` family is missing or below its floor, when any family the champion
    was evaluated on is missing or dropped by more than ``max_regression``, or when the headline
    family does not beat the champion by ``min_improvement``.
    """
    cand = family_accuracies(candidate, policy.mode)
    if not cand:
        return GateDecision(False, (f"no {policy.mode}/<family>/accuracy metrics recorded for the candidate",))
    reasons: list[str] = []
    failing: list[str] = []

    def fail(fam: str, why: str) -> None:
        reasons.append(f"{fam}: {why}")
        if fam not in failing:
            failing.append(fam)

    for fam, floor in sorted(policy.min_accuracy.items()):
        if fam not in cand:
            fail(fam, f"not evaluated (min_accuracy requires {floor:.4f})")
        elif cand[fam] < floor - _EPS:
            fail(fam, f"accuracy {cand[fam]:.4f} is below the floor {floor:.4f}")
    h = policy.headline
    if h not in cand:
        fail(h, "headline family not evaluated")
    if champion is None:
        if not failing:
            reasons.append(f"no champion yet: floors met on {len(cand)} families")
        return GateDecision(not failing, tuple(reasons), tuple(failing))

    champ = family_accuracies(champion, policy.mode)
    for fam in sorted(champ):
        if fam not in cand:
            fail(fam, f"evaluated for the champion ({champ[fam]:.4f}) but not for the candidate")
            continue
        drop = champ[fam] - cand[fam]
        if drop > policy.max_regression + _EPS:
            fail(fam, f"accuracy {cand[fam]:.4f} regressed {drop:.4f} from the champion's {champ[fam]:.4f} "
                      f"(max {policy.max_regression:.4f})")
    if h in cand and h in champ:
        gain = cand[h] - champ[h]
        if gain < policy.min_improvement - _EPS:
            fail(h, f"headline accuracy {cand[h]:.4f} vs the champion's {champ[h]:.4f} ({gain:+.4f}) does not "
                    f"improve by {policy.min_improvement:.4f}")
        elif not failing:
            reasons.append(f"headline {h}: {cand[h]:.4f} vs the champion's {champ[h]:.4f} ({gain:+.4f})")
    elif h in cand and not failing:
        reasons.append(f"headline {h}: {cand[h]:.4f}; the champion has no {h} accuracy to compare")
    if not failing:
        reasons.append(f"no family regressed more than {policy.max_regression:.4f}")
    return GateDecision(not failing, tuple(reasons), tuple(failing))


# --------------------------------------------------------------------------- the lock


@dataclass(frozen=True)
class LockHolder:
    owner: str
    actor: str
    purpose: str
    acquired_at: str
    expires: float  # unix time


class RegistryLock:
    """Mutual exclusion on one alias of one registered model, through the registry itself.

    Acquire = ``create_registered_model("step3vl-lock.<model>.<alias>")``, which exactly one caller
    wins (the store's unique constraint); release = delete it. The lock carries a lease: a holder that
    died leaves a lock that expires after ``lease_s``, and a waiter breaks it. Breaking is itself
    exclusive: the breaker first creates ``<lock>.break.<owner>`` (one winner per stale owner), then
    deletes the lock only if that stale owner still holds it, so two waiters never both break and
    never delete a fresh lock. The lease must outlast a promotion (seconds), not a training run.
    """

    def __init__(self, c: Any, name: str, alias: str, *, actor: str = "", purpose: str = "",
                 lease_s: float = 300.0, timeout_s: float = 60.0, poll_s: float = 0.1) -> None:
        self.c, self.model, self.alias = c, name, alias
        self.lock_name = f"{LOCK_PREFIX}{name}.{alias}"
        self.owner = uuid.uuid4().hex
        self.actor, self.purpose = actor or default_actor(), purpose
        self.lease_s, self.timeout_s, self.poll_s = lease_s, timeout_s, poll_s
        self.held = False

    def holder(self) -> LockHolder | None:
        """Who holds the lock now (None when free)."""
        from mlflow.exceptions import MlflowException

        try:
            tags = self.c.get_registered_model(self.lock_name).tags
        except MlflowException as e:
            if _not_found(e):
                return None
            raise
        try:
            return LockHolder(tags["owner"], tags.get("actor", "?"), tags.get("purpose", ""),
                              tags.get("acquired_at", "?"), float(tags["expires"]))
        except (KeyError, ValueError):
            # created but tags not yet visible cannot happen (one request); a hand-made lock: never expires
            return LockHolder(tags.get("owner", "?"), tags.get("actor", "?"), "unrecognised lock", "?", float("inf"))

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.timeout_s
        while True:
            tags = {"step3vl.lock": "1", "owner": self.owner, "actor": self.actor, "purpose": self.purpose,
                    "acquired_at": _now(), "expires": f"{time.time() + self.lease_s:.3f}"}
            try:
                self.c.create_registered_model(self.lock_name, tags=tags,
                                               description=f"lock on {self.model}@{self.alias} (step3vl)")
                self.held = True
                return
            except MlflowException as e:
                # "does not exist": MLflow's SQL store answers a unique-constraint clash by reading the
                # existing model, which the winner may already have deleted again -- contended all the same
                if not (_already_exists(e) or _not_found(e)):
                    raise
            holder = self.holder()
            if holder is not None and holder.expires < time.time():
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                who = f"{holder.actor} ({holder.purpose}, since {holder.acquired_at})" if holder else "another caller"
                raise LockTimeout(f"{self.model}@{self.alias} is locked by {who}; gave up after {self.timeout_s:g} s "
                                  f"(a crashed holder's lock expires after its lease)")
            time.sleep(self.poll_s * (0.5 + random.random()))

    def _break(self, stale: LockHolder) -> None:
        from mlflow.exceptions import MlflowException

        marker = f"{self.lock_name}.break.{stale.owner}"
        try:
            self.c.create_registered_model(marker)
        except MlflowException as e:
            if _already_exists(e):
                return  # another waiter is breaking this lease
            raise
        try:
            now = self.holder()
            if now is not None and now.owner == stale.owner:
                self.c.delete_registered_model(self.lock_name)
        finally:
            with contextlib.suppress(MlflowException):
                self.c.delete_registered_model(marker)

    def still_held(self) -> bool:
        h = self.holder()
        return h is not None and h.owner == self.owner

    def release(self) -> None:
        from mlflow.exceptions import MlflowException

        if not self.held:
            return
        self.held = False
        if self.still_held():
            with contextlib.suppress(MlflowException):
                self.c.delete_registered_model(self.lock_name)

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- promotion and rollback


@dataclass(frozen=True)
class PromotionResult:
    name: str
    version: str
    alias: str
    promoted: bool
    forced: bool
    decision: GateDecision
    previous: str | None  # the version the alias pointed at before (None: unset)
    actor: str


def _alias_version(c: Any, name: str, alias: str) -> str | None:
    rm = c.get_registered_model(name)
    v = (rm.aliases or {}).get(alias)
    return str(v) if v is not None else None


def _get_version(c: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"{name} version {version}: {e.message}") from None


def _get_model(c: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    if name.startswith(LOCK_PREFIX):
        raise RegistryError(f"{name} is a step3vl lock, not a model")
    try:
        return c.get_registered_model(name)
    except MlflowException as e:
        raise RegistryError(f"registered model {name}: {e.message}") from None


def events(c: Any, name: str) -> list[dict[str, Any]]:
    """The alias history of ``name``: every promotion attempt and rollback, oldest first."""
    rm = _get_model(c, name)
    out = []
    for k in sorted(t for t in rm.tags if t.startswith(EVENT_TAG)):
        ev = json.loads(rm.tags[k])
        ev["seq"] = int(k[len(EVENT_TAG):])
        out.append(ev)
    return out


def _append_event(c: Any, name: str, event: dict[str, Any]) -> None:
    """Only called under the alias lock, so sequence numbers never collide."""
    seq = 1 + max((int(k[len(EVENT_TAG):]) for k in c.get_registered_model(name).tags if k.startswith(EVENT_TAG)),
                  default=0)
    c.set_registered_model_tag(name, f"{EVENT_TAG}{seq:06d}", json.dumps({"at": _now(), **event}, sort_keys=True))


_GATE_FIELDS = ("decision", "reasons", "failing_families", "compared_to", "at", "actor", "policy", "force_reason")


def _record(c: Any, name: str, version: str, alias: str, fields: Mapping[str, Any]) -> None:
    """The latest gate decision for ``alias`` on a version: every field written, so none is left from an earlier try."""
    for k in _GATE_FIELDS:
        v = fields.get(k, "")
        c.set_model_version_tag(name, version, f"step3vl.gate.{alias}.{k}", v if isinstance(v, str) else json.dumps(v))


def promote(
    name: str,
    version: str | int,
    to: str = CHAMPION,
    *,
    force: bool = False,
    reason: str | None = None,
    actor: str | None = None,
    policy: PromotionConfig | None = None,
    expected: str | None | object = ...,
    lock_timeout_s: float = 60.0,
    tracking: TrackingConfig | None = None,
) -> PromotionResult:
    """Gate ``version`` against the version ``to`` points at and move the alias on a pass.

    ``force`` moves it despite a failed gate and needs a ``reason``; who and why are recorded.
    ``expected`` is the version the caller believes ``to`` points at (default: read now); if another
    promotion moved the alias since, this one raises :class:`PromotionConflict` naming the winner.
    A refused promotion returns ``promoted=False`` with the failing families; it is not an error.
    """
    policy = policy or PromotionConfig()
    version = str(version)
    actor = actor or default_actor()
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs --reason: say why the gate is overridden")
    c = client(tracking)
    _get_model(c, name)
    mv = _get_version(c, name, version)
    if expected is ...:
        expected = _alias_version(c, name, to)
    with RegistryLock(c, name, to, actor=actor, purpose=f"promote v{version} to {to}",
                      timeout_s=lock_timeout_s) as lock:
        current = _alias_version(c, name, to)
        if current != expected:
            winner = _get_version(c, name, current) if current else None
            by = (winner.tags.get(f"step3vl.gate.{to}.actor", "?") if winner else "?")
            msg = (f"{name}@{to} moved from version {expected} to version {current} (by {by}) while promoting "
                   f"version {version}; version {current} won. Re-run promote to gate version {version} "
                   f"against version {current}")
            _record(c, name, version, to, {"decision": "conflict", "reasons": [msg], "compared_to": current or "none",
                                           "at": _now(), "actor": actor, "policy": to_dict(policy)})
            _append_event(c, name, {"action": "conflict", "alias": to, "version": version, "previous": current,
                                    "actor": actor, "reason": msg})
            raise PromotionConflict(msg)
        if current == version:
            dec = GateDecision(True, (f"version {version} is already {to}",))
            return PromotionResult(name, version, to, False, False, dec, current, actor)
        champ_metrics = metrics_from_tags(_get_version(c, name, current).tags) if current else None
        dec = gate(metrics_from_tags(mv.tags), champ_metrics, policy)
        promoted = dec.passed or force
        label = "passed" if dec.passed else ("forced" if force else "refused")
        fields: dict[str, Any] = {
            "decision": label, "reasons": list(dec.reasons), "failing_families": ",".join(dec.failing_families),
            "compared_to": current or "none", "at": _now(), "actor": actor, "policy": to_dict(policy),
            "force_reason": reason if force else "",
        }
        _record(c, name, version, to, fields)
        if promoted:
            # the alias write cannot be made conditional: check right before it that the lease is still ours
            if not lock.still_held():
                raise RegistryError(f"lost the lock on {name}@{to} (lease expired?) before moving it; nothing moved")
            c.set_registered_model_alias(name, to, version)
        _append_event(c, name, {"action": {"passed": "promote", "forced": "force", "refused": "refuse"}[label],
                                "alias": to, "version": version, "previous": current, "actor": actor,
                                "reason": reason or "", "failing": list(dec.failing_families)})
    return PromotionResult(name, version, to, promoted, force and not dec.passed, dec, current, actor)


def alias_stack(history: list[dict[str, Any]], alias: str = CHAMPION) -> list[str]:
    """The versions ``alias`` went through, oldest first, with rolled-back ones popped: rollback's target is [-2]."""
    stack: list[str] = []
    for ev in history:
        if ev.get("alias") != alias:
            continue
        if ev["action"] in ("promote", "force"):
            if not stack and ev.get("previous"):
                stack.append(ev["previous"])  # the champion before step3vl's first recorded move
            stack.append(ev["version"])
        elif ev["action"] == "rollback":
            while stack and stack[-1] != ev["version"]:
                stack.pop()
            if not stack:
                stack.append(ev["version"])
    return stack


def rollback(name: str, alias: str = CHAMPION, *, to_version: str | int | None = None, reason: str = "",
             actor: str | None = None, lock_timeout_s: float = 60.0,
             tracking: TrackingConfig | None = None) -> PromotionResult:
    """Point ``alias`` back at the version it had before its last promotion (or at ``to_version``,
    which must be an earlier holder of the alias). Recorded like a promotion; no gate runs."""
    actor = actor or default_actor()
    c = client(tracking)
    _get_model(c, name)
    with RegistryLock(c, name, alias, actor=actor, purpose=f"rollback {alias}", timeout_s=lock_timeout_s) as lock:
        current = _alias_version(c, name, alias)
        stack = alias_stack(events(c, name), alias)
        if current is None:
            raise RegistryError(f"{name}@{alias} is not set: nothing to roll back")
        if not stack or stack[-1] != current:
            raise RegistryError(f"{name}@{alias} points at version {current}, which step3vl's history did not put "
                                f"there (moved outside step3vl?); promote the wanted version with --force instead")
        if to_version is None:
            if len(stack) < 2:
                raise RegistryError(f"{name}@{alias}: version {current} has no earlier {alias} to roll back to")
            target = stack[-2]
        else:
            target = str(to_version)
            if target not in stack[:-1]:
                earlier = ", ".join(stack[:-1]) or "none"
                raise RegistryError(f"{name}@{alias}: version {target} was not an earlier {alias} "
                                    f"(earlier: {earlier}); promote it instead")
        _get_version(c, name, target)
        c.set_model_version_tag(name, current, f"step3vl.gate.{alias}.rolled_back",
                                json.dumps({"at": _now(), "actor": actor, "reason": reason, "to": target}))
        if not lock.still_held():
            raise RegistryError(f"lost the lock on {name}@{alias} (lease expired?) before moving it; nothing moved")
        c.set_registered_model_alias(name, alias, target)
        _append_event(c, name, {"action": "rollback", "alias": alias, "version": target, "previous": current,
                                "actor": actor, "reason": reason})
    dec = GateDecision(True, (f"rolled back from version {current}",))
    return PromotionResult(name, target, alias, True, False, dec, current, actor)


# --------------------------------------------------------------------------- reading the registry


def list_models(tracking: TrackingConfig | None = None) -> list[dict[str, Any]]:
    """Every registered model (locks excluded): name, latest version, aliases."""
    c = client(tracking)
    out = []
    for rm in c.search_registered_models(max_results=1000):
        if rm.name.startswith(LOCK_PREFIX):
            continue
        versions = [int(v.version) for v in (rm.latest_versions or [])]
        out.append({"name": rm.name, "latest_version": str(max(versions)) if versions else None,
                    "aliases": dict(rm.aliases or {})})
    return sorted(out, key=lambda m: m["name"])


def describe(name: str, tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """A registered model's aliases, every version (source, lineage tags, gate decisions) and alias history."""
    c = client(tracking)
    rm = _get_model(c, name)
    aliases = {k: str(v) for k, v in (rm.aliases or {}).items()}
    versions = []
    for mv in sorted(c.search_model_versions(f"name = '{name}'", max_results=10000), key=lambda v: int(v.version)):
        versions.append({
            "version": str(mv.version), "source": mv.source, "run_id": mv.run_id,
            "created": _dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, _dt.timezone.utc).isoformat(
                timespec="seconds"),
            "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
            "tags": dict(sorted(mv.tags.items())),
            "metrics": metrics_from_tags(mv.tags),
        })
    return {"name": name, "aliases": aliases, "versions": versions, "events": events(c, name)}


def version_gate(info: Mapping[str, Any], alias: str = CHAMPION) -> dict[str, Any]:
    """The gate fields recorded on one version (from :func:`describe`), JSON values decoded."""
    prefix = f"step3vl.gate.{alias}."
    out: dict[str, Any] = {}
    for k, v in info["tags"].items():
        if k.startswith(prefix):
            try:
                out[k[len(prefix):]] = json.loads(v) if v[:1] in "[{" else v
            except json.JSONDecodeError:
                out[k[len(prefix):]] = v
    return out


__all__ = [
    "CANDIDATE", "CHAMPION", "DATA_URI_TAG", "GateDecision", "LockTimeout", "PromotionConflict", "PromotionResult",
    "RegisteredData", "RegistryError", "RegistryLock", "alias_stack", "client", "data_hashes", "describe", "events",
    "family_accuracies", "gate", "git_commit", "list_models", "manifest_digest", "metric_tags", "metrics_from_tags",
    "model_version", "promote", "register_checkpoint", "register_final", "registered_data", "resolve_model_uri",
    "rollback", "version_gate",
]
