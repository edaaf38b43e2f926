"""The data gate: Great Expectations checks that every dataset passes before a stage consumes it.

The gate streams the dataset once (:func:`step3vl.data.io.iter_shard`), turns each line into a
row of small derived columns (counts, flags, error strings, a content hash) and keeps only those,
so memory grows with the number of records, not with their text or images. One Great Expectations
suite then runs over that frame; its result is the source of truth for pass/fail, and each failing
expectation is mapped back to record ids through GE's unexpected index lists.

Checks (``CheckResult.name``):

- ``has_records``: the dataset is not empty.
- ``parse``: every line is UTF-8 JSON, one object, no duplicate keys, under the line-size limit.
- ``schema``: every record matches ``schemas/dataset.schema.json``.
- ``unique_ids``: ids are unique across all shards (and parts).
- ``messages_non_empty`` / ``no_empty_turns``: at least one message; no blank message content.
- ``image_tags_match``: ``<image>`` tags in user turns = ``len(images)``.
- ``image_paths_safe``: image paths stay inside the dataset directory.
- ``images_decode``: images exist, are PNG/JPEG, decode, and fit the byte and pixel budgets.
- ``answers_present``: a non-blank ``answer`` wherever one is needed (``require_answer``, split
  ``eval``, or a ``reward`` verifier named).
- ``token_length`` (with ``token_len`` and ``max_tokens``): prompt + completion fit the context.
- ``no_split_leakage`` (with ``forbidden_hashes``): no :func:`content_hash` (task + prompt turns +
  image pixels) shared with the eval sets.

Rows that fail ``parse`` or ``schema`` get nulls in the derived columns, which GE skips, so one bad
line is reported once, under the check that explains it.

A set too large for one process is judged in parts (data prep's): each part's frame goes through the suite's
row-level checks on its own (:func:`check_part`), which settle every check but the two about the whole set
(:data:`SET_CHECKS`); :func:`check_set` decides those from the parts' record counts and their ids' 64-bit digests
(sorted, cut into ranges of the digest space: memory bounded whatever the set's size), reads the ids back only
for the parts holding a repeated digest, and joins the parts' verdicts into the set's. One frame
(:func:`validate_dataset`, :func:`check_scan`) is a set of one part.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from PIL import Image

from step3vl.data.io import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_LINE_BYTES,
    DataError,
    RawRecord,
    UnsafeImageRef,
    decode_image,
    iter_shard,
    list_shards,
    read_image_bytes,
    resolve_image,
)
from step3vl.data.schema import schema_errors

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

IMAGE_TAG: Final = "<image>"
TokenLen = Callable[[str], int]


class GateFailed(DataError):
    """A dataset failed the gate; the message is the report's markdown."""

    def __init__(self, report: GateReport):
        super().__init__(report.to_markdown())
        self.report = report


@dataclass(frozen=True)
class CheckResult:
    """One expectation's outcome: how many rows failed and a few of their ids."""

    name: str
    passed: bool
    failing_rows: int
    example_ids: list[str]
    description: str = ""
    # One line per example id, same order; for a dataset-level check, what was observed instead.
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GateReport:
    """The gate's verdict on one dataset."""

    path: str
    passed: bool
    n_records: int
    checks: list[CheckResult]
    seconds: float = 0.0
    # the content_hash of every record that has one (for data prep's hashes/<set>.txt); not part of the report
    content_hashes: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def check(self, name: str) -> CheckResult:
        """The result of the check called ``name`` (a ``KeyError`` if it did not run)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; ran: {[c.name for c in self.checks]}")

    def to_markdown(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        lines = [
            f"## Data gate {verdict}: `{self.path}`",
            "",
            f"{self.n_records} records, {len(self.checks)} checks, {self.seconds:.2f} s.",
            "",
            "| check | result | failing rows | example ids |",
            "|---|---|---|---|",
        ]
        for c in self.checks:
            ids = ", ".join(f"`{i}`" for i in c.example_ids)
            lines.append(f"| {c.name} | {'ok' if c.passed else 'FAIL'} | {c.failing_rows} | {ids} |")
        for c in self.failed_checks:
            lines += ["", f"### {c.name}: {c.description}"]
            lines += [f"- `{i}`: {d}" for i, d in zip(c.example_ids, c.details, strict=False)]
            lines += [f"- {d}" for d in c.details[len(c.example_ids):]]  # a table-level or erring check's
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        report = asdict(self)
        del report["content_hashes"]
        return json.dumps(report, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GateReport:
        """The report :meth:`to_json` wrote (without ``content_hashes``, which it does not hold)."""
        report = json.loads(text)
        return cls(**{**report, "checks": [CheckResult(**c) for c in report["checks"]]})

    def raise_if_failed(self) -> None:
        """Raise :class:`GateFailed` (carrying this report) unless every check passed."""
        if not self.passed:
            raise GateFailed(self)


# --------------------------------------------------------------------------- content hash


def content_hash(record: Mapping[str, Any], dataset_dir: str | os.PathLike[str] | None = None) -> str:
    """The leakage hash of a record: sha256 over its task, prompt turns and image pixels.

    The definition is :func:`step3vl.data.families.content_hash` (the generators use it to keep
    train sets clear of eval content), so a record hashes the same in memory and once written.
    This wrapper loads path and data-URI images through :func:`resolve_image` (safe paths,
    size limits); ``dataset_dir`` is needed only for relative paths. PIL images pass through.
    """
    from step3vl.data.families import content_hash as pixel_hash

    images: list[Image.Image] = []
    for ref in record.get("images", []):
        if isinstance(ref, Image.Image):
            images.append(ref)
        elif dataset_dir is None and not str(ref).startswith("data:"):
            raise ValueError(f"record {record.get('id')!r}: dataset_dir is needed to read image {ref!r}")
        else:
            images.append(resolve_image(dataset_dir or ".", ref, record_id=record.get("id")))
    return pixel_hash({**record, "images": images})


# --------------------------------------------------------------------------- derived columns


@dataclass(frozen=True)
class _ScanOptions:
    """Everything a shard scan needs (inherited by forked workers, never pickled)."""

    root: str
    max_line_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    require_answer: bool = False
    token_len: TokenLen | None = None


COLUMNS: Final = (
    "shard", "line_no", "id", "task", "split", "parse_error", "schema_error", "n_messages",
    "n_empty_turns", "n_image_tags", "n_images", "image_path_error", "image_error", "has_answer",
    "needs_answer", "token_len", "content_hash",
)  # fmt: skip


class _Scanner:
    """Turns raw lines into rows of derived columns."""

    def __init__(self, opts: _ScanOptions):
        from step3vl.data.families import content_hash as pixel_hash

        self.opts = opts
        self.pixel_hash = pixel_hash

    def load_images(self, refs: list[str], record_id: str) -> tuple[list[Image.Image], list[str], list[str]]:
        """Decoded images, unsafe-reference errors, other image errors."""
        images, unsafe, broken = [], [], []
        for ref in refs:
            try:
                data, declared = read_image_bytes(
                    self.opts.root, ref, record_id=record_id, max_bytes=self.opts.max_image_bytes
                )
                images.append(
                    decode_image(
                        data,
                        ref=ref,
                        record_id=record_id,
                        expected_format=declared,
                        max_pixels=self.opts.max_image_pixels,
                    )
                )
            except UnsafeImageRef as e:
                unsafe.append(str(e))
            except DataError as e:
                broken.append(str(e))
        return images, unsafe, broken

    def row(self, raw: RawRecord) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
        row["shard"], row["line_no"] = raw.shard, raw.line_no
        rec = raw.record
        if rec is None:
            row["parse_error"] = raw.error
            return row
        if isinstance(rec.get("id"), str):
            row["id"] = rec["id"]  # even for schema failures, so duplicates are still seen
        errors = schema_errors(rec)
        if errors:
            row["schema_error"] = "; ".join(errors)
            return row
        messages: list[dict[str, str]] = rec["messages"]
        row["task"], row["split"] = rec["task"], rec["split"]
        row["n_messages"] = len(messages)
        row["n_empty_turns"] = sum(1 for m in messages if not m["content"].strip())
        row["n_image_tags"] = sum(m["content"].count(IMAGE_TAG) for m in messages if m["role"] == "user")
        row["n_images"] = len(rec["images"])

        images, unsafe, broken = self.load_images(rec["images"], rec["id"])
        row["image_path_error"] = "; ".join(unsafe) if unsafe else None
        row["image_error"] = "; ".join(broken) if broken else None
        if not unsafe and not broken:
            row["content_hash"] = self.pixel_hash({**rec, "images": images})
        for img in images:
            img.close()

        answer = rec.get("answer")
        row["has_answer"] = int(isinstance(answer, str) and bool(answer.strip()))
        row["needs_answer"] = int(self.opts.require_answer or rec["split"] == "eval" or "reward" in rec)
        if self.opts.token_len is not None:
            row["token_len"] = int(self.opts.token_len(_token_text(rec)))
        return row


def _token_text(rec: Mapping[str, Any]) -> str:
    """What occupies the context: every turn, plus the longer completion of a preference pair."""
    parts = [m["content"] for m in rec["messages"]]
    completions = [rec[k] for k in ("chosen", "rejected") if k in rec]
    if completions:
        parts.append(max(completions, key=len))
    return "\n".join(parts)


def _scan_shard(shard: Path, opts: _ScanOptions) -> dict[str, list[Any]]:
    """Derived columns for every line of one shard."""
    scanner = _Scanner(opts)
    columns: dict[str, list[Any]] = {c: [] for c in COLUMNS}
    for raw in iter_shard(shard, max_line_bytes=opts.max_line_bytes):
        for key, value in scanner.row(raw).items():
            columns[key].append(value)
    return columns


# Set in forked workers only (by _init_worker), so that the options, including a token_len that
# cannot be pickled (a lambda, a tokenizer's bound method), reach them without pickling.
_worker_opts: _ScanOptions | None = None


def _init_worker(opts: _ScanOptions) -> None:
    global _worker_opts
    _worker_opts = opts


def _scan_shard_in_worker(shard: Path) -> dict[str, list[Any]]:
    assert _worker_opts is not None, "_init_worker did not run"
    return _scan_shard(shard, _worker_opts)


def _worker_count(requested: int | None, n_shards: int) -> int:
    if requested is not None and requested < 1:
        raise ValueError(f"workers must be >= 1, got {requested}")
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if requested is None:
        requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(requested, n_shards)


def _scan(
    root: Path, opts: _ScanOptions, workers: int | None, while_waiting: Callable[[], None] | None = None,
    shards: list[str] | None = None,
) -> pd.DataFrame:
    """Scan every shard, or the ``shards`` named (file names under ``root``), in parallel across processes when there
    are several, into one frame.

    Memory: a scan holds one line at a time; this process keeps only the derived columns.
    ``while_waiting`` runs here while the workers scan (the gate imports GE then).
    """
    import pandas as pd

    shards = list_shards(root) if shards is None else _named_shards(root, shards)
    n_workers = _worker_count(workers, len(shards))
    if n_workers == 1:
        if while_waiting is not None:
            while_waiting()
        parts = [_scan_shard(shard, opts) for shard in shards]
    else:
        # fork, as torch's DataLoader does: workers start in milliseconds, get the options by
        # inheritance, and never re-import __main__ (spawn/forkserver would re-run an unguarded
        # calling script, and cannot run from stdin).
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(n_workers, ctx, initializer=_init_worker, initargs=(opts,)) as pool:
            futures = [pool.submit(_scan_shard_in_worker, shard) for shard in shards]
            if while_waiting is not None:
                while_waiting()
            parts = [f.result() for f in futures]
    return pd.DataFrame({c: [v for part in parts for v in part[c]] for c in COLUMNS})


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class _Check:
    name: str
    description: str
    # builds the GE expectation (GE is imported lazily); None for SET_CHECKS, which check_set decides
    expectation: Callable[[], Any] | None
    detail: Callable[[Mapping[str, Any]], str]


# Checks about a whole set, decided by check_set over its parts; every other check is row-level: a part settles it.
SET_CHECKS: Final = ("has_records", "unique_ids")


def _gxe() -> Any:
    import great_expectations.expectations as gxe

    return gxe


def _checks(max_tokens: int | None, forbidden_hashes: Collection[str] | None) -> list[_Check]:
    """The gate's checks, in report order; GE is imported only when an expectation is built."""
    checks = [
        _Check(
            "has_records",
            "the dataset has at least one record",
            None,
            lambda r: "",
        ),
        _Check(
            "parse",
            "every line is one UTF-8 JSON object with unique keys, within the line-size limit",
            lambda: _gxe().ExpectColumnValuesToBeNull(column="parse_error"),
            lambda r: str(r["parse_error"]),
        ),
        _Check(
            "schema",
            "every record matches schemas/dataset.schema.json",
            lambda: _gxe().ExpectColumnValuesToBeNull(column="schema_error"),
            lambda r: str(r["schema_error"]),
        ),
        _Check(
            "unique_ids",
            "ids are unique across all shards",
            None,
            lambda r: f"id {r['id']!r} appears more than once: this copy is {r['shard']}:{r['line_no']}",
        ),
        _Check(
            "messages_non_empty",
            "every record has at least one message",
            lambda: _gxe().ExpectColumnValuesToBeBetween(column="n_messages", min_value=1),
            lambda r: "no messages",
        ),
        _Check(
            "no_empty_turns",
            "no message has empty or whitespace-only content",
            lambda: _gxe().ExpectColumnValuesToBeBetween(column="n_empty_turns", min_value=0, max_value=0),
            lambda r: f"{int(r['n_empty_turns'])} empty turn(s)",
        ),
        _Check(
            "image_tags_match",
            f"the number of {IMAGE_TAG} tags in user turns equals len(images)",
            lambda: _gxe().ExpectColumnPairValuesToBeEqual(column_A="n_image_tags", column_B="n_images"),
            lambda r: f"{int(r['n_image_tags'])} {IMAGE_TAG} tag(s) but {int(r['n_images'])} image(s)",
        ),
        _Check(
            "image_paths_safe",
            "image references stay inside the dataset directory",
            lambda: _gxe().ExpectColumnValuesToBeNull(column="image_path_error"),
            lambda r: str(r["image_path_error"]),
        ),
        _Check(
            "images_decode",
            "images exist, decode as PNG/JPEG and fit the byte and pixel budgets",
            lambda: _gxe().ExpectColumnValuesToBeNull(column="image_error"),
            lambda r: str(r["image_error"]),
        ),
        _Check(
            "answers_present",
            "records that need an answer (require_answer, split eval, or a reward) have one",
            lambda: _gxe().ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="has_answer", column_B="needs_answer", or_equal=True
            ),
            lambda r: "needs an answer but has none (or a blank one)",
        ),
    ]
    if max_tokens is not None:
        checks.append(
            _Check(
                "token_length",
                f"prompt + completion is at most {max_tokens} tokens",
                lambda: _gxe().ExpectColumnValuesToBeBetween(column="token_len", max_value=max_tokens),
                lambda r: f"{int(r['token_len'])} tokens > {max_tokens}",
            )
        )
    if forbidden_hashes is not None:
        forbidden = sorted(forbidden_hashes)
        checks.append(
            _Check(
                "no_split_leakage",
                "no record's content hash appears in the forbidden (eval) hashes",
                lambda: _gxe().ExpectColumnValuesToNotBeInSet(column="content_hash", value_set=forbidden),
                lambda r: f"content hash {str(r['content_hash'])[:16]}... is in the eval set",
            )
        )
    return checks


@contextmanager
def _quiet_ge() -> Iterator[None]:
    """Import GE and keep it quiet: no import-time warnings, no INFO logs, for the duration.

    GE logs through per-module loggers, and some set themselves to INFO explicitly
    (``great_expectations.data_context.types.base`` announces every ephemeral context), so
    raising the parent logger's level is not enough: every GE logger is raised, then restored.
    """
    parent = logging.getLogger("great_expectations")
    saved = {parent: parent.level}
    parent.setLevel(logging.WARNING)  # before the import: its module loggers inherit this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            import great_expectations  # noqa: F401 - ~2.5 s the first time

            for name, logger in list(logging.root.manager.loggerDict.items()):
                if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
                    saved.setdefault(logger, logger.level)
                    logger.setLevel(logging.WARNING)
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)


def _run_suite(df: pd.DataFrame, checks: list[_Check]) -> dict[str, Any]:
    """Validate ``df`` against one suite built from ``checks``; GE results keyed by check name."""
    with _quiet_ge():
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        asset = context.data_sources.add_pandas("step3vl_gate").add_dataframe_asset("records")
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": df}
        )
        suite = gx.ExpectationSuite(name="step3vl_data_gate")
        for check in checks:
            assert check.expectation is not None, f"{check.name} is decided over the whole set"
            expectation = check.expectation()
            expectation.meta = {"check": check.name}
            suite.add_expectation(expectation)
        result = batch.validate(suite, result_format={"result_format": "COMPLETE"})
    # Matched by meta, not position: GE does not keep the suite's order in its results.
    return {
        r.expectation_config.meta["check"]: r
        for r in result.results
        if r.expectation_config is not None and r.expectation_config.meta
    }


def _exception_message(ge_result: Any) -> str | None:
    info = ge_result.exception_info or {}
    infos = [info] if "raised_exception" in info else list(info.values())
    messages = [str(i.get("exception_message")) for i in infos if i.get("raised_exception")]
    return "; ".join(messages) or None


def _check_result(check: _Check, ge_result: Any, df: pd.DataFrame, max_examples: int) -> CheckResult:
    if ge_result is None:
        return CheckResult(check.name, False, 0, [], check.description, ["GE returned no result"])
    passed = bool(ge_result.success)
    result = ge_result.result or {}
    error = _exception_message(ge_result)
    if error is not None:
        return CheckResult(check.name, False, 0, [], check.description, [f"GE error: {error}"])
    if "unexpected_index_list" not in result:  # a table-level expectation: no rows to point at
        details = [] if passed else [f"observed: {result.get('observed_value')!r}"]
        return CheckResult(check.name, passed, 0, [], check.description, details)
    indices = [int(i) for i in result["unexpected_index_list"]]
    failing = int(result.get("unexpected_count") or len(indices))
    ids, details = [], []
    for i in indices[:max_examples]:
        row = df.iloc[i]
        record_id = row["id"]
        ids.append(record_id if isinstance(record_id, str) else f"{row['shard']}:{row['line_no']}")
        details.append(check.detail(row))
    return CheckResult(check.name, passed, failing, ids, check.description, details)


# --------------------------------------------------------------------------- entry points


def import_ge() -> None:
    """Import Great Expectations (quietly): a few seconds the first time in a process."""
    with _quiet_ge():
        pass


def validate_dataset(
    path: str | os.PathLike[str],
    *,
    require_answer: bool = False,
    max_tokens: int | None = None,
    token_len: TokenLen | None = None,
    forbidden_hashes: Collection[str] | None = None,
    max_examples: int = 5,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> GateReport:
    """Run the data gate on the dataset at ``path`` and return its report (it does not raise).

    ``require_answer`` is for RL and eval datasets. ``token_len`` (text -> token count) and
    ``max_tokens`` go together and add the ``token_length`` check. ``forbidden_hashes`` (e.g.
    :func:`dataset_hashes` of the eval sets, when validating a train set) adds
    ``no_split_leakage``. Call ``report.raise_if_failed()`` to fail a stage.

    Shards are scanned in up to ``workers`` forked processes (default: one per available CPU, at
    most one per shard; one where ``fork`` is unavailable). The result does not depend on it.

    A :class:`DataError` is raised only when ``path`` is not a dataset at all (no directory or no
    shards); everything wrong inside a dataset is reported.
    """
    if (max_tokens is None) != (token_len is None):
        raise ValueError("max_tokens and token_len go together: give both or neither")
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    start = time.perf_counter()
    df = scan_dataset(path, require_answer=require_answer, token_len=token_len, max_line_bytes=max_line_bytes,
                      max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels, workers=workers,
                      while_waiting=import_ge)
    return check_scan(df, str(path), max_tokens=max_tokens, forbidden_hashes=forbidden_hashes,
                      max_examples=max_examples, seconds=time.perf_counter() - start)


def scan_dataset(
    path: str | os.PathLike[str],
    *,
    shards: list[str] | None = None,
    require_answer: bool = False,
    token_len: TokenLen | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
    while_waiting: Callable[[], None] | None = None,
) -> pd.DataFrame:
    """The gate's first half: one row of derived columns (:data:`COLUMNS`) per line of the dataset at ``path``, or
    of its ``shards`` only (file names, in that order). Frames of a dataset's parts, scanned apart (data prep's
    parts), concatenated in shard order are the frame of the whole, which :func:`check_scan` judges."""
    root = Path(path)
    opts = _ScanOptions(
        os.fspath(root), max_line_bytes, max_image_bytes, max_image_pixels, require_answer, token_len
    )
    return _scan(root, opts, workers, while_waiting=while_waiting, shards=shards)


def check_scan(
    df: pd.DataFrame,
    path: str,
    *,
    max_tokens: int | None = None,
    forbidden_hashes: Collection[str] | None = None,
    max_examples: int = 5,
    seconds: float = 0.0,
) -> GateReport:
    """The gate's second half on one :func:`scan_dataset` frame, the whole set: :func:`check_part` and
    :func:`check_set` of it as a set of one part; ``path`` names the dataset in the report, ``seconds`` is the
    scan's."""
    part = check_part(df, path, max_tokens=max_tokens, forbidden_hashes=forbidden_hashes,
                      max_examples=max_examples, seconds=seconds)
    return check_set(path, [PartGate(part, id_digests(df["id"]), lambda: df)], max_examples=max_examples)


def check_part(
    df: pd.DataFrame,
    path: str,
    *,
    max_tokens: int | None = None,
    forbidden_hashes: Collection[str] | None = None,
    max_examples: int = 5,
    seconds: float = 0.0,
) -> GateReport:
    """The Great Expectations suite's row-level checks (all but :data:`SET_CHECKS`) over a :func:`scan_dataset`
    frame of a set or of a part of one: what the part settles alone. Its ``content_hashes`` are the frame's."""
    valid = df["parse_error"].isna() & df["schema_error"].isna()
    if max_tokens is not None and df.loc[valid, "token_len"].isna().any():
        raise ValueError(f"{path}: max_tokens needs token lengths, and the scan measured none (scan with token_len)")
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    start = time.perf_counter()
    checks = [c for c in _checks(max_tokens, forbidden_hashes) if c.name not in SET_CHECKS]
    ge_results = _run_suite(df, checks)
    results = [_check_result(c, ge_results.get(c.name), df, max_examples) for c in checks]
    return GateReport(
        path=path,
        passed=all(r.passed for r in results),
        n_records=len(df),
        checks=results,
        seconds=round(seconds + time.perf_counter() - start, 3),
        content_hashes=frozenset(df["content_hash"].dropna()),
    )


def id_digests(ids: pd.Series) -> np.ndarray:
    """The 64-bit digests of a scan's ``id`` column (rows without an id left out), sorted: what :func:`check_set`
    compares across parts. Two ids may share a digest; check_set reads the ids back before calling them repeated."""
    import numpy as np

    return np.sort(_digests(ids.dropna()))


def _digests(ids: pd.Series) -> np.ndarray:
    """Each id's 64-bit digest, in order (pandas' vectorised hash of the ids as strings)."""
    import numpy as np
    import pandas as pd

    return pd.util.hash_pandas_object(ids.astype(str), index=False).to_numpy(dtype=np.uint64)


@dataclass(frozen=True)
class PartGate:
    """A part of a set as :func:`check_set` judges it: its :func:`check_part` report, its :func:`id_digests` (a
    memory-mapped array will do), and ``rows``, which returns its scan's ``id``, ``shard`` and ``line_no`` columns
    in row order (called only for a part holding a digest that occurs twice in the set)."""

    report: GateReport
    ids: np.ndarray
    rows: Callable[[], pd.DataFrame]


def check_set(path: str, parts: list[PartGate], *, max_examples: int = 5, chunk: int = 1 << 23) -> GateReport:
    """The gate's verdict on a set from its parts' (in order): ``has_records`` and ``unique_ids`` decided over them
    all, every other check joined from theirs (failing rows summed, examples in the set's order). Repeated ids are
    found ``chunk`` digests at a time (:func:`_repeated_digests`), so memory does not grow with the set."""
    if not parts:
        raise ValueError(f"{path}: a set has at least one part")
    names = [[c.name for c in p.report.checks] for p in parts]
    if any(n != names[0] for n in names):
        raise ValueError(f"{path}: its parts were judged with different checks: {names[0]} and "
                         f"{next(n for n in names if n != names[0])}")
    start = time.perf_counter()
    n_records = sum(p.report.n_records for p in parts)
    described = {c.name: c for c in _checks(0, ())}  # every check there is, in report order
    results: dict[str, CheckResult] = {
        "has_records": CheckResult("has_records", n_records >= 1, 0, [], described["has_records"].description,
                                   [] if n_records >= 1 else [f"observed: {n_records}"]),
        "unique_ids": _unique_ids(parts, described["unique_ids"], max_examples, chunk),
    }
    for i, name in enumerate(names[0]):
        got = [p.report.checks[i] for p in parts]
        ids = [x for c in got for x in c.example_ids][:max_examples]
        details = [d for c in got for d in c.details[:len(c.example_ids)]][:len(ids)]
        details += [d for c in got for d in c.details[len(c.example_ids):]]  # a check that erred in a part
        results[name] = CheckResult(name, all(c.passed for c in got), sum(c.failing_rows for c in got), ids,
                                    got[0].description, details)
    order = list(described)
    checks = sorted(results.values(), key=lambda c: order.index(c.name))
    return GateReport(
        path=path,
        passed=all(c.passed for c in checks),
        n_records=n_records,
        checks=checks,
        seconds=round(sum(p.report.seconds for p in parts) + time.perf_counter() - start, 3),
        content_hashes=frozenset().union(*(p.report.content_hashes for p in parts)),
    )


def _unique_ids(parts: list[PartGate], check: _Check, max_examples: int, chunk: int) -> CheckResult:
    """``unique_ids`` over every part, as GE's ExpectColumnValuesToBeUnique judges one frame: each row whose id
    another row also has fails (rows without an id are skipped)."""
    import numpy as np

    repeated = _repeated_digests([p.ids for p in parts], chunk)
    rows = []  # (part, row, id, shard, line_no) of every row whose id's digest is repeated
    for k, part in enumerate(parts if len(repeated) else []):
        if not len(part.ids):
            continue
        at = np.minimum(np.searchsorted(part.ids, repeated), len(part.ids) - 1)
        if not (part.ids[at] == repeated).any():
            continue
        frame = part.rows().reset_index(drop=True)
        named = frame[frame["id"].notna()]
        hit = named[np.isin(_digests(named["id"]), repeated)]
        rows += [(k, i, r["id"], r["shard"], r["line_no"]) for i, r in zip(hit.index, hit.to_dict("records"))]
    counts = Counter(row[2] for row in rows)
    failing = sorted(r for r in rows if counts[r[2]] > 1)  # digests shared by distinct ids are not repeats
    examples = failing[:max_examples]
    return CheckResult(check.name, not failing, len(failing), [r[2] for r in examples], check.description,
                       [check.detail({"id": r[2], "shard": r[3], "line_no": r[4]}) for r in examples])


def _repeated_digests(arrays: list[np.ndarray], chunk: int) -> np.ndarray:
    """The values occurring more than once across the sorted ``arrays`` (and within any one), sorted. The uint64
    space is cut into ranges holding about ``chunk`` values in all; each range's slices are joined and sorted alone."""
    import numpy as np

    total = sum(len(a) for a in arrays)
    n_ranges = max(1, -(-total // chunk))
    bounds = [(k << 64) // n_ranges for k in range(n_ranges)] + [None]
    found = []
    for lo, hi in zip(bounds, bounds[1:]):
        pieces = [a[np.searchsorted(a, np.uint64(lo)):(None if hi is None else np.searchsorted(a, np.uint64(hi)))]
                  for a in arrays]
        joined = np.sort(np.concatenate(pieces))
        found.append(np.unique(joined[1:][joined[1:] == joined[:-1]]))
    return np.concatenate(found)


def _named_shards(root: Path, names: list[str]) -> list[Path]:
    if not names:
        raise DataError(f"{str(root)!r}: no shards named to scan")
    if not root.is_dir():
        raise DataError(f"dataset directory {str(root)!r} does not exist or is not a directory")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataError(f"dataset directory {str(root)!r} has no shard {missing[0]!r}")
    return [root / n for n in names]


def dataset_hashes(
    path: str | os.PathLike[str],
    *,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
) -> set[str]:
    """The :func:`content_hash` of every record of a dataset (typically an eval set).

    Raises :class:`DataError` if any record cannot be hashed (bad line, schema violation, bad
    image): a dataset that fails its own gate cannot vouch for what it contains.
    """
    root = Path(path)
    opts = _ScanOptions(os.fspath(root), MAX_LINE_BYTES, max_image_bytes, max_image_pixels)
    df = _scan(root, opts, workers)
    unhashable = df[df["content_hash"].isna()]
    if len(unhashable):
        row = unhashable.iloc[0]
        reasons = [row[c] for c in ("parse_error", "schema_error", "image_path_error", "image_error")]
        reason = next((r for r in reasons if isinstance(r, str)), "unknown")
        raise DataError(
            f"{root}: {len(unhashable)} record(s) cannot be hashed; first, "
            f"{row['shard']}:{row['line_no']}: {reason}. Run the data gate on it."
        )
    return set(df["content_hash"])
