"""Data prep stage: synthetic families (or user datasets) → gated datasets → tokenizer → packed shards.

Order matters: eval sets are written first so that training sets can be generated around their
content hashes (train and eval never overlap), then the tokenizer is trained on the training text,
then every dataset passes the Great Expectations gate (token lengths measured with that tokenizer)
before the pre-training/SFT sets and the held-out set are published packed.

The stage is three steps with files between them, :func:`run` calling them in turn:

1. :func:`plan`: the raw sets, the tokenizer, the eval sets' hashes, and ``plan.json``: every set split into
   parts of ``data.part_shards`` input shards;
2. :func:`prepare_part`, once per part, each on its own: the gate's scan of its shards (``scan.parquet``: the
   gate's derived columns, not its text), its row-level checks (``gate.json``: every check but the two about the
   whole set), its ids' digests, its records' content hashes, and its packed shards;
3. :func:`merge`: the gate's verdict on each set from its parts' (records present, ids unique across parts; a part's
   scan is read again only if it holds a repeated id), each packed set's parts joined (shards renumbered, counts
   summed), the manifest; sealed last. Its memory does not grow with the sets.

In the pipeline the three are tasks of their own (``components/data_prep.py``), the parts a ``ParallelFor``.
A set in one part (``part_shards: 0``) is packed exactly as the whole set was before parts existed; in several
parts, each part shuffles and packs its own records (another order, a few more part-filled rows).

Output layout under ``out_dir``::

    raw/<set>/        datasets in the documented JSONL format (published with MANIFEST.json)
    tokenizer/        the locally trained tokenizer
    packed/<set>/     packed shards for pretrain/sft sets, and eval packed twice (loss on all / assistant)
    reports/<set>.md  gate reports
    hashes/<set>/     the content hashes of each training set's records, a sorted file per part (the contamination
                      check's)
    data_manifest.json  content hash, rows per task and the gate result of every set
    plan.json         the sets' parts
    MANIFEST.json     sha256 of every file, written last (the directory is whole; see ``storage.seal_dir``)

With ``storage.root`` on object storage the sealed directory is then published to
``<storage.root>/data/<digest>/<version>`` (:func:`publish`), and the stages read it from there
(:func:`local_copy`: only the parts each one needs); the pipeline's ``Dataset`` artifact holds a
pointer to it, so that no pod downloads the whole directory as a KFP input. A user's set that data
prep read from object storage is not published again: ``data_manifest.json`` names its source and
the version read, and :func:`local_copy` reads it from there. Data prep itself reads such a set where it
is: the tokenizer its first shards, each part its own shards and the images their records name.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import posixpath
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from step3vl.config import DataConfig, DatasetSpec, PipelineConfig
from step3vl.progress import track

if TYPE_CHECKING:
    from step3vl.data.gate import PartGate
    from step3vl.data.pack import LossOn

log = logging.getLogger(__name__)

TRAIN_PURPOSES = ("pretrain", "sft")
HASHES_DIR = "hashes"
DATA_MANIFEST = "data_manifest.json"
PLAN_FILE = "plan.json"  # the sets' parts (data prep's plan), kept in the data directory
PREP_DIR = "prep"  # what the plan hands its parts and the merge: removed by the merge
PART_FILE = "part.json"  # written last in prep/parts/<index>: the part is done
SCAN_FILE = "scan.parquet"  # the gate's derived columns of a part
GATE_FILE = "gate.json"  # the gate's row-level checks of a part (gate.check_part)
IDS_FILE = "ids.npy"  # the 64-bit digests of a part's ids, sorted (gate.id_digests)
PART_HASHES = "hashes.txt"  # the content hashes of a training set's part, sorted
EVAL_HASHES = "eval_hashes.txt"
ANSWER_PURPOSES = ("rl", "eval")


def set_seed(data: DataConfig, name: str) -> int:
    """A distinct, stable seed per dataset so that two sets never repeat each other's records."""
    return (data.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _synthetic_records(name: str, spec: DatasetSpec, data: DataConfig, forbidden: set[str],
                       stats: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Records of every family in ``spec``, interleaved, skipping any whose content hash is forbidden."""
    from step3vl.data import families
    from step3vl.data.gate import content_hash

    seed = set_seed(data, name)
    per_family: list[Iterator[dict[str, Any]]] = []
    for fam, fs in spec.families.items():
        if fam not in families.FAMILIES:
            raise ValueError(f"data.sets.{name}.families: unknown family '{fam}' "
                             f"(registered: {', '.join(sorted(families.FAMILIES))})")
        per_family.append(_family_stream(fam, fs.n, seed, fs.difficulty, spec.split, data.image_size,
                                         forbidden, stats, content_hash))
    # round-robin interleave so that any prefix of the dataset is a mixture
    live = list(per_family)
    while live:
        nxt = []
        for it in live:
            rec = next(it, None)
            if rec is not None:
                yield rec
                nxt.append(it)
        live = nxt


def _family_stream(fam, n, seed, difficulty, split, size, forbidden, stats, content_hash):
    from step3vl.data import families

    made, index = 0, 0
    while made < n:
        batch = families.generate(fam, min(256, n - made), seed, list(difficulty), split, size, start=index)
        index += len(batch)
        for rec in batch:
            if forbidden and content_hash(rec) in forbidden:
                stats["skipped_eval_duplicates"] = stats.get("skipped_eval_duplicates", 0) + 1
                continue
            made += 1
            yield rec
            if made == n:
                return
        if index > 50 * n + 1000:
            raise RuntimeError(f"family {fam}: cannot find {n} records that avoid the eval set")


@dataclass(frozen=True)
class DataPrepOutputs:
    out_dir: Path
    manifest: dict[str, Any]
    data_uri: str = ""  # where the stages read it: out_dir, or where it was published (storage.root on S3)

    def raw(self, name: str) -> Path:
        return self.out_dir / "raw" / name

    def packed(self, name: str) -> Path:
        return self.out_dir / "packed" / name

    @property
    def tokenizer_dir(self) -> Path:
        return self.out_dir / "tokenizer"


def generate(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Write every synthetic dataset of ``cfg.data`` under ``out_dir/raw`` (eval sets first)."""
    from step3vl.data.gate import dataset_hashes
    from step3vl.data.io import write_dataset

    out = Path(out_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    summaries: dict[str, Any] = {}
    order = sorted(cfg.data.sets.items(), key=lambda kv: kv[1].split != "eval")
    eval_hashes: set[str] = set()
    for name, spec in track(order, "generate", enabled=progress, unit=" set"):
        dest = out / "raw" / name
        if spec.path:
            continue  # user datasets are fetched, not generated
        if dest.exists():
            shutil.rmtree(dest)
        t0 = time.perf_counter()
        stats: dict[str, int] = {}
        forbidden = eval_hashes if spec.split == "train" else set()
        summary = write_dataset(dest, _synthetic_records(name, spec, cfg.data, forbidden, stats),
                                shard_size=cfg.data.shard_size)
        summary.update(stats, seconds=round(time.perf_counter() - t0, 2))
        summaries[name] = summary
        if spec.split == "eval":
            eval_hashes |= dataset_hashes(dest)
    return summaries


class _RawSet:
    """Where data prep reads one set's shards: ``raw/<set>`` of the data directory, or (``source``) the user's set
    published on object storage, read in place: the shards and images a step needs are fetched into the node's cache
    (:class:`step3vl.storage.RemoteFiles`), never the whole set for one part of it."""

    def __init__(self, data_dir: str | Path, name: str, source: str = "") -> None:
        from step3vl.storage import RemoteFiles

        self.name, self.source = name, source
        self.local = Path(data_dir) / "raw" / name
        self.remote = RemoteFiles(source) if source else None

    @functools.cached_property
    def shard_sizes(self) -> dict[str, int]:
        """Shard file name → bytes, in name order (the order records are read in); listed once."""
        from step3vl.data.io import SHARD_GLOB, DataError, list_shards

        if self.remote is None:
            return {p.name: p.stat().st_size for p in list_shards(self.local)}
        sizes = {rel: int(e["size"]) for rel, e in sorted(self.remote.manifest["files"].items())
                 if "/" not in rel and fnmatch.fnmatch(rel, SHARD_GLOB)}
        if not sizes:
            raise DataError(f"data.sets.{self.name}.path: {self.source} has no {SHARD_GLOB} shards")
        return sizes

    def records(self, shards: list[str] | None = None) -> Iterator[Any]:
        """The raw records (:class:`step3vl.data.io.RawRecord`) of ``shards`` (default: every shard), one shard
        fetched at a time."""
        from step3vl.data.io import iter_shard

        for name in self.shard_sizes if shards is None else shards:
            yield from iter_shard(self.local / name if self.remote is None else self.remote.file(name))

    def root(self, shards: list[str]) -> Path:
        """A local folder holding ``shards`` and every image file their records name: what the gate and packing
        read of this part of the set."""
        if self.remote is None:
            return self.local
        files = self.remote.manifest["files"]
        refs: set[str] = set()
        for raw in self.records(shards):
            images = raw.record.get("images") if raw.record is not None else None
            if isinstance(images, list):  # references the manifest lacks are the gate's to report
                refs.update(r for r in (posixpath.normpath(i) for i in images if isinstance(i, str)) if r in files)
        return self.remote.only(list(shards) + sorted(refs))

    def whole(self) -> Path:
        return self.local if self.remote is None else self.remote.all()


def _corpus(sets: list[_RawSet], max_texts: int = 0) -> Iterator[str]:
    """Training text for the tokenizer: every message and preference text of the given datasets, or with
    ``max_texts`` at most that many: each set's share in proportion to its shards' bytes (at least one text),
    read from its first records only (a set on object storage: only the shards those are in are fetched)."""
    quota: dict[str, int | None] = {s.name: None for s in sets}
    if max_texts:
        size = {s.name: sum(s.shard_sizes.values()) for s in sets}
        total = sum(size.values()) or 1
        quota = {s.name: max(1, int(max_texts * size[s.name] / total)) for s in sets}
    for s in sets:
        left = quota[s.name]
        for raw in s.records():
            if raw.record is None:
                continue
            texts = [str(m.get("content", "")).replace("<image>", "") for m in raw.record.get("messages", [])]
            texts += [str(raw.record[k]) for k in ("chosen", "rejected") if k in raw.record]
            if left is not None:
                texts = texts[:left]
                left -= len(texts)
            yield from texts
            if left == 0:
                break


def token_counter(tokenizer: Any, processor: Any):
    """text → token count, counting each ``<image>`` as the longest placeholder an image can take."""
    per_image = processor.max_placeholder_tokens()

    def count(text: str) -> int:
        n_img = text.count("<image>")
        return len(tokenizer.encode(text.replace("<image>", ""), add_special_tokens=False)) + n_img * per_image

    return count


def _context(cfg: PipelineConfig) -> dict[str, int]:
    """The context (tokens) each purpose is consumed with: the gate's token_length; a preference pair holds a
    prompt and two responses."""
    return {"pretrain": cfg.pretrain.seq_len, "sft": cfg.sft.seq_len, "rl": cfg.sft.seq_len,
            "eval": cfg.sft.seq_len, "preference": 2 * cfg.sft.seq_len}


def packings(name: str, spec: DatasetSpec) -> list[tuple[str, LossOn]]:
    """(packed set name, loss on) of each packing of the set ``name``: pre-training and SFT sets once, the held-out
    set twice (loss on every token / on assistant tokens); RL and preference sets are not packed."""
    if spec.purpose == "pretrain":
        return [(name, "all")]
    if spec.purpose == "sft":
        return [(name, "assistant")]
    if spec.purpose == "eval":
        return [(f"{name}-all", "all"), (f"{name}-assistant", "assistant")]
    return []


def part_seed(data: DataConfig, packed: str, index: int) -> int:
    """The shuffle seed of part ``index`` of the packed set ``packed`` (part 0: the set's own seed)."""
    return set_seed(data, packed if index == 0 else f"{packed}#{index}")


def run(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = True, log_mlflow: bool = False) -> DataPrepOutputs:
    """The whole data prep stage in this process: :func:`plan`, :func:`prepare_part` of every part, :func:`merge`.
    Raises ``GateFailed`` (with its report written) if any set fails the gate."""
    t0 = time.perf_counter()
    parts = plan(cfg, out_dir, progress=progress)["parts"]
    for i in track(range(len(parts)), "parts", enabled=progress and len(parts) > 1, unit=" part"):
        prepare_part(cfg, out_dir, i, progress=progress)
    return merge(cfg, out_dir, progress=progress, log_mlflow=log_mlflow, started=t0)


def plan(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Data prep's first step: generate the synthetic sets (eval first), copy in local user sets (a set on object
    storage is read where it is when ``storage.root`` is on object storage too, else copied in), train the tokenizer
    on the training text, hash the eval sets, and split every set into parts of ``data.part_shards`` input shards.

    Writes ``raw/``, ``tokenizer/`` and ``plan.json`` (the parts) under ``out_dir``, and what :func:`merge` needs
    under ``prep/``; returns the plan. Each part is then gated and packed on its own (:func:`prepare_part`).
    """
    from step3vl.data.gate import dataset_hashes
    from step3vl.data.io import DataError, dataset_sha256_of_manifest
    from step3vl.model.tokenizer import build_tokenizer, save_tokenizer
    from step3vl.storage import MANIFEST_NAME, fetch_dir, is_s3_uri, manifest_digest, read_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten by merge: never sealed while half-written
    (out / PLAN_FILE).unlink(missing_ok=True)  # rewritten last: no part starts from an earlier plan
    shutil.rmtree(out / PREP_DIR, ignore_errors=True)
    gen = generate(cfg, out, progress=progress)
    in_place = is_s3_uri(cfg.storage.root)
    raw: dict[str, _RawSet] = {}
    sets: dict[str, Any] = {name: {} for name in cfg.data.sets}  # per set: its source, and how it is read
    for name, spec in cfg.data.sets.items():
        if spec.path and is_s3_uri(spec.path):
            raw[name] = _RawSet(out, name, spec.path)
            manifest = raw[name].remote.manifest
            if in_place:  # each part reads it there, checking that it reads this version
                sets[name].update(in_place=True, content_hash=dataset_sha256_of_manifest(manifest))
            else:  # a local data directory is self-contained (a pipeline artifact other pods read)
                manifest = read_manifest(fetch_dir(spec.path, out / "raw" / name, overwrite=True))  # the version copied
                raw[name] = _RawSet(out, name)
            sets[name]["source"] = {"uri": spec.path, "manifest_sha256": manifest_digest(manifest)}
            continue
        raw[name] = _RawSet(out, name)
        if spec.path:
            if raw[name].local.exists():
                shutil.rmtree(raw[name].local)
            if not Path(spec.path).is_dir():
                raise DataError(f"data.sets.{name}.path: {spec.path} is not a directory")
            shutil.copytree(spec.path, raw[name].local, symlinks=True)

    # tokenizer trained on the training text only (never on eval sets)
    train = [raw[n] for n, s in cfg.data.sets.items() if s.split == "train"]
    save_tokenizer(build_tokenizer(cfg.model.tokenizer, corpus=_corpus(train, cfg.data.tokenizer_max_texts)),
                   out / "tokenizer")
    eval_hashes: set[str] = set()
    for name, spec in cfg.data.sets.items():
        if spec.split == "eval":
            eval_hashes |= dataset_hashes(raw[name].whole())

    parts: list[dict[str, Any]] = []
    for name in cfg.data.sets:
        shards = list(raw[name].shard_sizes)
        step = cfg.data.part_shards or len(shards)
        chunks = [shards[i:i + step] for i in range(0, len(shards), step)]
        parts += [{"set": name, "index": i, "shards": chunk} for i, chunk in enumerate(chunks)]
        sets[name]["parts"] = len(chunks)
    the_plan = {"sets": sets, "parts": parts}
    prep = out / PREP_DIR
    (prep / "parts").mkdir(parents=True)
    (prep / EVAL_HASHES).write_text("".join(f"{h}\n" for h in sorted(eval_hashes)))
    (prep / "generate.json").write_text(json.dumps(gen, indent=1, sort_keys=True))
    _write_json(out / PLAN_FILE, the_plan)  # last: a plan file means the step is done
    log.info("data prep: %d sets in %d parts", len(sets), len(parts))
    return the_plan


def prepare_part(cfg: PipelineConfig, data_dir: str | Path, index: int, *, out: str | Path | None = None,
                 progress: bool = True) -> Path:
    """Gate and pack part ``index`` of the plan in ``data_dir`` (:func:`plan`; only read), in ``out`` (default
    ``prep/parts/<index>`` of ``data_dir``), which it returns: the gate's scan of its shards (``scan.parquet``), its
    row-level checks (``gate.json``, :func:`step3vl.data.gate.check_part`; :func:`merge` decides the rest with the
    set's other parts), its ids' digests (``ids.npy``), a training set's content hashes (``hashes.txt``) and its
    packed shards. A part holding a record packing cannot read (a bad line, a schema violation, a broken image) is
    judged but not packed: the merge fails the set."""
    import numpy as np

    from step3vl.data.gate import check_part, id_digests, import_ge, scan_dataset
    from step3vl.data.io import DataError
    from step3vl.data.pack import pack_dataset
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.storage import manifest_digest

    plan_dir = Path(data_dir)
    the_plan = json.loads((plan_dir / PLAN_FILE).read_text())
    if not 0 <= index < len(the_plan["parts"]):
        raise DataError(f"{plan_dir / PLAN_FILE}: no part {index} (it has {len(the_plan['parts'])})")
    part = the_plan["parts"][index]
    name, shards = part["set"], part["shards"]
    if name not in cfg.data.sets:
        raise DataError(f"{plan_dir / PLAN_FILE}: part {index} is of set {name!r}, which data.sets does not name")
    spec = cfg.data.sets[name]
    entry = the_plan["sets"][name]
    source = entry["source"] if entry.get("in_place") else None
    raw = _RawSet(plan_dir, name, source["uri"] if source else "")
    if source and manifest_digest(raw.remote.manifest) != source["manifest_sha256"]:
        raise DataError(f"{source['uri']} (set {name}) was published again since data prep planned it: run it again")
    t0 = time.perf_counter()
    root = raw.root(shards)
    tok = load_tokenizer(plan_dir / "tokenizer")
    processor = ImageProcessor(cfg.model.vision)
    df = scan_dataset(root, shards=shards, require_answer=spec.purpose in ANSWER_PURPOSES,
                      token_len=token_counter(tok, processor), while_waiting=import_ge)
    scan_s = time.perf_counter() - t0
    eval_hashes = set((plan_dir / PREP_DIR / EVAL_HASHES).read_text().split()) if spec.split == "train" else None
    report = check_part(df, source["uri"] if source else f"raw/{name}", max_tokens=_context(cfg)[spec.purpose],
                        forbidden_hashes=eval_hashes, seconds=scan_s)
    dest = Path(out) if out is not None else plan_dir / PREP_DIR / "parts" / f"{index:05d}"
    (dest / PART_FILE).unlink(missing_ok=True)  # written last
    for stale in (SCAN_FILE, GATE_FILE, IDS_FILE, PART_HASHES, "packed"):
        shutil.rmtree(dest / stale) if (dest / stale).is_dir() else (dest / stale).unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    df.to_parquet(dest / SCAN_FILE)  # read again only where the set's gate finds a repeated id in this part
    (dest / GATE_FILE).write_text(report.to_json())
    np.save(dest / IDS_FILE, id_digests(df["id"]))
    if spec.split == "train":
        (dest / PART_HASHES).write_text("".join(f"{h}\n" for h in sorted(report.content_hashes)))
    unreadable = int((df[["parse_error", "schema_error", "image_path_error", "image_error"]].notna().any(axis=1)
                      | (df["n_image_tags"] != df["n_images"])).sum())
    if not unreadable:
        for packed, loss_on in packings(name, spec):
            pack_dataset(root, str(dest / "packed" / packed), tokenizer=tok, processor=processor,
                         seq_len=cfg.pretrain.seq_len if loss_on == "all" else cfg.sft.seq_len, loss_on=loss_on,
                         seed=part_seed(cfg.data, packed, part["index"]), open_rows=cfg.data.pack_open_rows,
                         progress=progress, extra_meta={"source": name}, shards=shards, allow_empty=True)
    tasks = df.loc[df["task"].notna(), "task"].value_counts()
    _write_json(dest / PART_FILE, {**part, "unreadable_records": unreadable,
                                   "rows_per_task": {str(k): int(v) for k, v in sorted(tasks.items())},
                                   "seconds": round(time.perf_counter() - t0, 3)})  # last: the part is done
    return dest


def merge(cfg: PipelineConfig, data_dir: str | Path, *, plan_dir: str | Path | None = None,
          parts: list[str | Path] | None = None, progress: bool = True, log_mlflow: bool = False,
          started: float | None = None) -> DataPrepOutputs:
    """Data prep's last step, once every part is prepared (:func:`prepare_part`): the gate's verdict on each set
    (:func:`step3vl.data.gate.check_set` of its parts' verdicts: ids unique across parts), reports, ``hashes/``,
    each packed set's parts joined into one (``packed/<name>``), ``data_manifest.json``; then ``data_dir`` is sealed
    and, with ``storage.root`` on object storage, published. Raises ``GateFailed`` (with its report written) if any set
    fails.

    By default the plan and the parts are where :func:`run` leaves them, in ``data_dir`` (whose ``prep/`` is then
    removed, its packed shards moved). In the pipeline they are other tasks' outputs, only read: ``plan_dir`` (its
    raw sets, tokenizer and plan are copied into ``data_dir``) and ``parts``, one per part in plan order: a folder
    (its packed shards are linked, or copied) or the ``s3://`` URI the part was published to (only its verdict, its
    ids' digests and its indexes are fetched, its scan only if it holds a repeated id; its packed shards and hashes
    are copied by the S3 server when the data directory is published, so ``storage.root`` must be on S3 too, and
    ``data_dir`` is whole only there).
    """
    from step3vl.data.gate import GateFailed, check_set
    from step3vl.data.io import DataError, dataset_sha256
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.storage import MANIFEST_NAME, is_s3_uri, seal_dir

    t0 = time.perf_counter() if started is None else started
    out = Path(data_dir)
    own = plan_dir is None  # the plan and the parts are run's, in out: moved, and prep/ removed at the end
    planned = out if own else Path(plan_dir)
    prep = planned / PREP_DIR
    the_plan = json.loads((planned / PLAN_FILE).read_text())
    generated = json.loads((prep / "generate.json").read_text())
    given = [prep / "parts" / f"{i:05d}" for i in range(len(the_plan["parts"]))] if parts is None else list(parts)
    if len(given) != len(the_plan["parts"]):
        raise DataError(f"{planned / PLAN_FILE} plans {len(the_plan['parts'])} parts; {len(given)} were given")
    if any(is_s3_uri(str(d)) for d in given) and not is_s3_uri(cfg.storage.root):
        raise DataError("parts on object storage are joined there: storage.root must be on object storage too")
    parts_of: dict[str, list[_Part]] = {name: [] for name in the_plan["sets"]}
    for i, (part, d) in enumerate(zip(the_plan["parts"], given)):
        got = _Part.open(d, [packed for packed, _ in packings(part["set"], cfg.data.sets[part["set"]])]
                         if part["set"] in cfg.data.sets else [])
        if got is None or {k: got.done[k] for k in ("set", "index", "shards")} != part:
            raise DataError(f"{d}: part {i} of data prep (set {part['set']}, {len(part['shards'])} shards) "
                            "was not prepared" + ("" if got is None else f" (it holds set {got.done['set']} part "
                                                  f"{got.done['index']})"))
        parts_of[part["set"]].append(got)
    if set(parts_of) != set(cfg.data.sets):
        raise DataError(f"{planned / PLAN_FILE} plans sets {sorted(parts_of)}, data.sets names "
                        f"{sorted(cfg.data.sets)}")
    if not own:  # the data directory holds the plan's raw sets, tokenizer and plan
        out.mkdir(parents=True, exist_ok=True)
        for entry in planned.iterdir():
            if entry.name not in (PREP_DIR, MANIFEST_NAME):
                (shutil.copytree(entry, out / entry.name, symlinks=True, dirs_exist_ok=True) if entry.is_dir()
                 else shutil.copy2(entry, out / entry.name))

    reports_dir = out / "reports"
    reports_dir.mkdir(exist_ok=True)
    manifest: dict[str, Any] = {"sets": {}, "tokenizer": {"vocab_size": len(load_tokenizer(out / "tokenizer"))}}
    remote: dict[str, tuple[str, dict[str, Any]]] = {}  # files left in their parts on object storage
    failed = []
    for name, spec in track(list(cfg.data.sets.items()), "gate", enabled=progress, unit=" set"):
        entry = the_plan["sets"][name]  # a set read in place: each part checked the version it read
        report = check_set(entry["source"]["uri"] if entry.get("in_place") else str(out / "raw" / name),
                           [p.gate() for p in parts_of[name]])
        (reports_dir / f"{name}.md").write_text(report.to_markdown())
        (reports_dir / f"{name}.json").write_text(report.to_json())
        content_hash = entry["content_hash"] if entry.get("in_place") else dataset_sha256(out / "raw" / name)
        rows_per_task = sum((Counter(p.done["rows_per_task"]) for p in parts_of[name]), Counter())
        manifest["sets"][name] = {
            "purpose": spec.purpose,
            "split": spec.split,
            "path": f"raw/{name}",
            **({"source": entry["source"]} if "source" in entry else {}),
            "content_hash": content_hash,
            "n_records": report.n_records,
            "rows_per_task": dict(sorted(rows_per_task.items())),
            "gate": {"passed": report.passed, "failed_checks": [c.name for c in report.failed_checks]},
            "generate": {k: v for k, v in generated.get(name, {}).items()
                         if k in ("n_records", "n_images", "shards", "skipped_eval_duplicates")},
        }
        if not report.passed:
            failed.append(report)
        elif spec.split == "train":  # each part's file, where the contamination check reads them
            remote.update(_join_hashes(out / HASHES_DIR / name, parts_of[name], move=own))
    if failed:
        _write_manifest(out, manifest)
        print("\n\n".join(r.to_markdown() for r in failed))
        raise GateFailed(failed[0])

    for name, spec in cfg.data.sets.items():
        for packed, _loss_on in packings(name, spec):
            unpacked = [p.done["index"] for p in parts_of[name] if not p.has(f"packed/{packed}/")]
            if unpacked:  # the gate passed, so every record was readable
                raise DataError(f"set {name}: parts {unpacked} were not packed into {packed}")
            index, elsewhere = _join_packed(out / "packed" / packed, packed, parts_of[name], move=own)
            remote.update({f"packed/{packed}/{rel}": src for rel, src in elsewhere.items()})
            manifest["sets"][name].setdefault("packed", {})[packed] = {
                k: index[k] for k in ("rows", "samples", "tokens", "loss_tokens", "padding_fraction",
                                      "dropped_too_long")}
    _write_manifest(out, manifest)  # no timings or absolute paths: same inputs, byte-identical manifest
    timings = {"total": round(time.perf_counter() - t0, 2),
               "generate": {k: v.get("seconds") for k, v in generated.items()},
               "parts": [p.done["seconds"] for name in parts_of for p in parts_of[name]]}
    (out / "timings.json").write_text(json.dumps(timings, indent=1, sort_keys=True))
    if own:
        shutil.rmtree(prep)
    # last: a TrainJob fetches the data from object storage verified against it. Shards of parts on object storage
    # are not here: the manifest lists them, and publishing copies them there from their parts
    seal_dir(out, remote={rel: entry for rel, (_, entry) in remote.items()})
    data_uri = publish(out, cfg.storage.root, remote={rel: uri for rel, (uri, _) in remote.items()}) \
        if is_s3_uri(cfg.storage.root) else str(out)
    if log_mlflow:
        _log_to_mlflow(out, manifest, data_uri)
    return DataPrepOutputs(out, manifest, data_uri)


@dataclass(frozen=True)
class _Part:
    """A prepared part as the merge reads it: ``done`` (its ``part.json``) and ``dir``, a local folder with its
    scan and packed indexes; for a part published on object storage (the pipeline's, with ``storage.root`` there),
    ``remote`` holds its files, of which only those are fetched: its packed shards are copied on the server."""

    done: dict[str, Any]
    dir: Path
    remote: Any = None  # step3vl.storage.RemoteFiles

    @classmethod
    def open(cls, where: str | Path, packed: list[str]) -> _Part | None:
        """The part at ``where`` (a folder, or an ``s3://`` URI); None if it is not a finished part."""
        from step3vl.data.pack import INDEX_FILE
        from step3vl.storage import NotPublishedError, RemoteFiles, is_s3_uri

        if not is_s3_uri(str(where)):
            d = Path(where)
            return cls(json.loads((d / PART_FILE).read_text()), d) if (d / PART_FILE).is_file() else None
        try:
            files = RemoteFiles(str(where))
        except NotPublishedError:
            return None
        have = files.manifest["files"]
        if PART_FILE not in have:
            return None
        d = files.only([PART_FILE, GATE_FILE, IDS_FILE] + [f"packed/{p}/{INDEX_FILE}" for p in packed
                                                           if f"packed/{p}/{INDEX_FILE}" in have])
        return cls(json.loads((d / PART_FILE).read_text()), d, files)

    def gate(self) -> PartGate:
        """The part as the set's gate judges it: its row-level verdict, its ids' digests (memory-mapped), and its
        scan's id columns, read (fetched, for a part on object storage) only if the gate asks for them."""
        import numpy as np
        import pandas as pd

        from step3vl.data.gate import GateReport, PartGate

        def rows() -> pd.DataFrame:
            scan = self.dir / SCAN_FILE if self.remote is None else self.remote.file(SCAN_FILE)
            return pd.read_parquet(scan, columns=["id", "shard", "line_no"])

        return PartGate(GateReport.from_json((self.dir / GATE_FILE).read_text()),
                        np.load(self.dir / IDS_FILE, mmap_mode="r"), rows)

    def has(self, prefix: str) -> bool:
        if self.remote is not None:
            return any(rel.startswith(prefix) for rel in self.remote.manifest["files"])
        return (self.dir / prefix).is_dir()


def _join_packed(dest: Path, packed: str, parts: list[_Part], *, move: bool
                 ) -> tuple[dict[str, Any], dict[str, tuple[str, dict[str, Any]]]]:
    """One packed set at ``dest`` from the packed sets of its parts, in order: their shards renumbered
    (``pack-00000``, … across parts), moved (``move``) or else linked or copied, their counts summed; sealed. A set
    of one part is that part as it was. Returns the index, and the shards left where they are (those of parts on
    object storage): name → (their URI, their manifest entry)."""
    from step3vl.data.io import DataError
    from step3vl.data.pack import INDEX_FILE, padding_fraction
    from step3vl.storage import seal_dir, verify_dir

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    index: dict[str, Any] = {}
    elsewhere: dict[str, tuple[str, dict[str, Any]]] = {}
    for part in parts:
        src = part.dir / "packed" / packed
        if part.remote is None:
            verify_dir(src)
        got = json.loads((src / INDEX_FILE).read_text())
        if not index:
            index = {**got, "shards": [], "too_long_examples": [], "per_task": {}}
            for k in ("samples", "rows", "tokens", "loss_tokens", "dropped_too_long"):
                index[k] = 0
        for shard in got["shards"]:
            name = f"pack-{len(index['shards']):05d}.safetensors"
            if part.remote is None:
                _move_or_link(src / shard["file"], dest / name, move)
            else:
                rel = f"packed/{packed}/{shard['file']}"
                elsewhere[name] = (f"{part.remote.uri}/{rel}", part.remote.manifest["files"][rel])
            index["shards"].append({**shard, "file": name})
        for k in ("samples", "rows", "tokens", "loss_tokens", "dropped_too_long"):
            index[k] += got[k]
        for task, n in got["per_task"].items():
            index["per_task"][task] = index["per_task"].get(task, 0) + n
        index["too_long_examples"] = (index["too_long_examples"] + got["too_long_examples"])[:5]
    if not index["shards"]:
        raise DataError(f"{dest.name}: nothing to pack (every sample longer than seq_len={index['seq_len']}?)")
    index["padding_fraction"] = padding_fraction(index["tokens"], index["rows"], index["seq_len"])
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))
    seal_dir(dest, extra={"kind": "packed-dataset", "rows": index["rows"]},
             remote={rel: entry for rel, (_, entry) in elsewhere.items()})
    return index, elsewhere


def _join_hashes(dest: Path, parts: list[_Part], *, move: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """A training set's content hashes in ``dest``, one file per part (``part-00000.txt``, … in order): moved
    (``move``) or else linked or copied. Returns the files left where they are (those of parts on object storage),
    as :func:`_join_packed` does, by their path in the data directory."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    elsewhere = {}
    for k, part in enumerate(parts):
        name = f"part-{k:05d}.txt"
        if part.remote is None:
            _move_or_link(part.dir / PART_HASHES, dest / name, move)
        else:
            elsewhere[f"{HASHES_DIR}/{dest.name}/{name}"] = (f"{part.remote.uri}/{PART_HASHES}",
                                                            part.remote.manifest["files"][PART_HASHES])
    return elsewhere


def _move_or_link(src: Path, dest: Path, move: bool) -> None:
    if move:
        os.replace(src, dest)
        return
    try:
        os.link(src, dest)  # a packed shard is never written again: the part's output and ours can share it
    except OSError:
        shutil.copy2(src, dest)


def publish(out: Path, root: str, *, remote: dict[str, str] | None = None) -> str:
    """Publish the sealed data directory ``out`` to ``<root>/data/<digest>/<version>``; its URI.

    ``digest`` is :func:`content_digest`: every file but the reports and timings, so the same data prepared again the
    same way (a retried task, another run) reuses what is published there instead of uploading it twice, and data
    packed otherwise (another ``seq_len``) is published apart. ``version`` hashes every file (reports and timings
    differ per run): two data preps publishing the same data at once write to folders of their own, never into each
    other's files. A user's set read from object storage is not in ``out`` (:func:`plan`): ``data_manifest.json``
    names it and the version read. ``remote``: files of ``out``'s manifest that are elsewhere on object storage (the
    packed shards of the pipeline's parts), copied from there by the server.
    """
    from step3vl.pipeline.lineage import sha256_json
    from step3vl.storage import NotPublishedError, join_uri, open_store, publish_dir, read_manifest

    files = read_manifest(out)["files"]
    base = join_uri(root, "data", content_digest(files)[:16])
    for entry in open_store(base).list(recursive=False):
        if entry.endswith("/"):
            try:
                read_manifest(join_uri(base, entry))
            except NotPublishedError:  # an upload that did not finish, or one under way
                continue
            log.info("data already published at %s", join_uri(base, entry))
            return join_uri(base, entry)
    uri = join_uri(base, sha256_json(files)[:16])
    # what an interrupted upload of this very version left there is replaced
    publish_dir(out, uri, sealed=True, remote=remote)
    return uri


def content_digest(files: dict[str, Any]) -> str:
    """The digest of a data directory's content from its manifest's ``files``: the sha256 of every file but the gate
    reports and timings (which differ per run; the rest is a deterministic function of the data and the config)."""
    from step3vl.pipeline.lineage import sha256_json

    return sha256_json({rel: e["sha256"] for rel, e in sorted(files.items())
                        if not rel.startswith("reports/") and rel != "timings.json"})


def local_copy(data_dir: str | Path, sets: list[str] | tuple[str, ...] = (), files: tuple[str, ...] = ()) -> Path:
    """A local folder holding ``raw/<set>`` for each of ``sets`` and the ``files``/folders named of the data directory
    ``data_dir``: the directory itself when it is local; for an ``s3://`` one, the node's verified copy of those
    parts only (:class:`step3vl.storage.RemoteFiles`; each file downloaded once per node). A user's set that data
    prep read from object storage is copied from there (``raw/<set>`` links to it), the version data prep read.
    """
    from step3vl.data.io import DataError
    from step3vl.storage import RemoteFiles, is_s3_uri, manifest_digest

    if not is_s3_uri(str(data_dir)):
        return Path(data_dir)
    data = RemoteFiles(str(data_dir))
    sources = {}
    if sets:
        entries = json.loads((data.only([DATA_MANIFEST]) / DATA_MANIFEST).read_text())["sets"]
        sources = {name: entries[name]["source"] for name in sets if entries.get(name, {}).get("source")}
    parts = [f"raw/{name}" for name in sets if name not in sources] + list(files)
    log.info("this node's copy of %s: %s", data_dir, ", ".join(parts + [f"{n} from {s['uri']}"
                                                                       for n, s in sources.items()]))
    local = data.only(parts)
    for name, src in sources.items():
        remote = RemoteFiles(src["uri"])
        if manifest_digest(remote.manifest) != src["manifest_sha256"]:
            raise DataError(f"{src['uri']} (set {name} of {data_dir}) was published again since data prep read it: "
                            "run data prep again")
        link = local / "raw" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        target = remote.all()
        try:
            os.symlink(target, link, target_is_directory=True)
        except FileExistsError:  # another process of this node linked it (the same version: the same folder)
            if not (link.is_symlink() and Path(os.readlink(link)) == target):
                raise DataError(f"{link} exists and is not a link to {target}") from None
    return local


def read_data_manifest(data_dir: str | Path) -> dict[str, Any]:
    """``data_manifest.json`` of a data directory, local or ``s3://`` (verified against its MANIFEST.json)."""
    return json.loads((local_copy(data_dir, files=(DATA_MANIFEST,)) / DATA_MANIFEST).read_text())


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _write_json(out / DATA_MANIFEST, manifest)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


def _log_to_mlflow(out: Path, manifest: dict[str, Any], data_uri: str) -> None:
    """Every dataset becomes an MLflow input of the active run, so model versions trace to their data."""
    import mlflow
    import mlflow.data
    import pandas as pd

    from step3vl.storage import join_uri

    for name, info in manifest["sets"].items():
        df = pd.DataFrame([{"task": k, "rows": v} for k, v in info["rows_per_task"].items()])
        ds = mlflow.data.from_pandas(df, source=join_uri(data_uri, info["path"]), name=name,
                                     digest=info["content_hash"][:32])
        mlflow.log_input(ds, context=info["purpose"])
    mlflow.log_artifact(str(out / DATA_MANIFEST))
    mlflow.log_artifact(str(out / "timings.json"))
    mlflow.log_artifacts(str(out / "reports"), artifact_path="gate_reports")
