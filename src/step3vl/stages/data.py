"""Data prep stage: synthetic families (or user datasets) → gated datasets → tokenizer → packed shards.

Order matters: eval sets are written first so that training sets can be generated around their
content hashes (train and eval never overlap), then the tokenizer is trained on the training text,
then every dataset passes the Great Expectations gate (token lengths measured with that tokenizer)
before the pre-training/SFT sets and the held-out set are packed.

Output layout under ``out_dir``::

    raw/<set>/        datasets in the documented JSONL format (published with MANIFEST.json)
    tokenizer/        the locally trained tokenizer
    packed/<set>/     packed shards for pretrain/sft sets, and eval packed twice (loss on all / assistant)
    reports/<set>.md  gate reports
    hashes/<set>.txt  the content hash of every record of each training set, sorted (the contamination check's)
    data_manifest.json  content hash, rows per task and the gate result of every set
    MANIFEST.json     sha256 of every file, written last (the directory is whole; see ``storage.seal_dir``)

With ``storage.root`` on object storage the sealed directory is then published to
``<storage.root>/data/<digest>/<version>`` (:func:`publish`), and the stages read it from there
(:func:`local_copy`: only the parts each one needs); the pipeline's ``Dataset`` artifact holds a
pointer to it, so that no pod downloads the whole directory as a KFP input. A user's set that data
prep read from object storage is not published again: ``data_manifest.json`` names its source and
the version read, and :func:`local_copy` reads it from there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step3vl.config import DataConfig, DatasetSpec, PipelineConfig
from step3vl.progress import track

log = logging.getLogger(__name__)

TRAIN_PURPOSES = ("pretrain", "sft")
HASHES_DIR = "hashes"
DATA_MANIFEST = "data_manifest.json"
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


def _corpus(dirs: list[Path], max_texts: int = 0) -> Iterator[str]:
    """Training text for the tokenizer: every message and preference text of the given datasets, or with
    ``max_texts`` at most that many: each set's share in proportion to its shards' bytes (at least one text),
    read from its first records only."""
    from step3vl.data.io import iter_records, list_shards

    quota: dict[Path, int | None] = dict.fromkeys(dirs)
    if max_texts:
        size = {d: sum(p.stat().st_size for p in list_shards(d)) for d in dirs}
        total = sum(size.values()) or 1
        quota = {d: max(1, int(max_texts * size[d] / total)) for d in dirs}
    for d in dirs:
        left = quota[d]
        for raw in iter_records(d):
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


def run(cfg: PipelineConfig, out_dir: str | Path, *, progress: bool = True, log_mlflow: bool = False) -> DataPrepOutputs:
    """The whole data prep stage. Raises ``GateFailed`` (with its report written) if any set fails the gate."""
    from step3vl.data.gate import GateFailed, dataset_hashes, validate_dataset
    from step3vl.data.io import DataError, dataset_sha256
    from step3vl.data.pack import pack_dataset
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import build_tokenizer, save_tokenizer
    from step3vl.storage import MANIFEST_NAME, fetch_dir, is_s3_uri, manifest_digest, read_manifest, seal_dir

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # rewritten below: never sealed while half-written
    gen = generate(cfg, out, progress=progress)
    raw: dict[str, Path] = {}
    for name, spec in cfg.data.sets.items():
        if not spec.path:
            raw[name] = out / "raw" / name
        elif is_s3_uri(spec.path):
            raw[name] = fetch_dir(spec.path, out / "raw" / name)  # published with a manifest: verified
        else:
            # copied in, so the data prep output is self-contained (a pipeline artifact other pods read)
            raw[name] = out / "raw" / name
            if raw[name].exists():
                shutil.rmtree(raw[name])
            if not Path(spec.path).is_dir():
                raise DataError(f"data.sets.{name}.path: {spec.path} is not a directory")
            shutil.copytree(spec.path, raw[name], symlinks=True)

    # tokenizer trained on the training text only (never on eval sets)
    train_dirs = [raw[n] for n, s in cfg.data.sets.items() if s.split == "train"]
    tok = build_tokenizer(cfg.model.tokenizer, corpus=_corpus(train_dirs, cfg.data.tokenizer_max_texts))  # streamed
    save_tokenizer(tok, out / "tokenizer")
    processor = ImageProcessor(cfg.model.vision)
    count = token_counter(tok, processor)
    # the context each purpose is consumed with; a preference pair holds a prompt and two responses
    context = {"pretrain": cfg.pretrain.seq_len, "sft": cfg.sft.seq_len, "rl": cfg.sft.seq_len,
               "eval": cfg.sft.seq_len, "preference": 2 * cfg.sft.seq_len}

    eval_hashes: set[str] = set()
    for name, spec in cfg.data.sets.items():
        if spec.split == "eval":
            eval_hashes |= dataset_hashes(raw[name])

    reports_dir = out / "reports"
    reports_dir.mkdir(exist_ok=True)
    manifest: dict[str, Any] = {"sets": {}, "tokenizer": {"vocab_size": len(tok)}}
    failed = []
    for name, spec in track(list(cfg.data.sets.items()), "gate", enabled=progress, unit=" set"):
        report = validate_dataset(
            raw[name],
            require_answer=spec.purpose in ANSWER_PURPOSES,
            max_tokens=context[spec.purpose],
            token_len=count,
            forbidden_hashes=eval_hashes if spec.split == "train" else None,
        )
        (reports_dir / f"{name}.md").write_text(report.to_markdown())
        (reports_dir / f"{name}.json").write_text(report.to_json())
        manifest["sets"][name] = {
            "purpose": spec.purpose,
            "split": spec.split,
            "path": f"raw/{name}",
            **({"source": {"uri": spec.path, "manifest_sha256": manifest_digest(read_manifest(raw[name]))}}
               if spec.path and is_s3_uri(spec.path) else {}),
            "content_hash": dataset_sha256(raw[name]),
            "n_records": report.n_records,
            "rows_per_task": _rows_per_task(raw[name]),
            "gate": {"passed": report.passed, "failed_checks": [c.name for c in report.failed_checks]},
            "generate": {k: v for k, v in gen.get(name, {}).items() if k in ("n_records", "n_images", "shards",
                                                                                "skipped_eval_duplicates")},
        }
        if not report.passed:
            failed.append(report)
        elif spec.split == "train":
            _write_hashes(out, name, report.content_hashes)
    if failed:
        _write_manifest(out, manifest)
        print("\n\n".join(r.to_markdown() for r in failed))
        raise GateFailed(failed[0])

    packs: list[tuple[str, str, str]] = []  # (dataset, packed name, loss_on)
    for name, spec in cfg.data.sets.items():
        if spec.purpose == "pretrain":
            packs.append((name, name, "all"))
        elif spec.purpose == "sft":
            packs.append((name, name, "assistant"))
        elif spec.purpose == "eval":
            packs.append((name, f"{name}-all", "all"))
            packs.append((name, f"{name}-assistant", "assistant"))
    for dataset, packed, loss_on in packs:
        seq_len = cfg.pretrain.seq_len if loss_on == "all" else cfg.sft.seq_len
        dest = out / "packed" / packed
        if dest.exists():
            shutil.rmtree(dest)
        index = pack_dataset(raw[dataset], str(dest), tokenizer=tok, processor=processor, seq_len=seq_len,
                             loss_on=loss_on, seed=set_seed(cfg.data, packed), open_rows=cfg.data.pack_open_rows,
                             progress=progress, extra_meta={"source": dataset})
        manifest["sets"][dataset].setdefault("packed", {})[packed] = {
            k: index[k] for k in ("rows", "samples", "tokens", "loss_tokens", "padding_fraction", "dropped_too_long")
        }
    _write_manifest(out, manifest)  # no timings or absolute paths: same inputs, byte-identical manifest
    timings = {"total": round(time.perf_counter() - t0, 2),
               "generate": {k: v.get("seconds") for k, v in gen.items()}}
    (out / "timings.json").write_text(json.dumps(timings, indent=1, sort_keys=True))
    seal_dir(out)  # last: a TrainJob fetches the data from object storage verified against it
    data_uri = publish(out, cfg.storage.root) if is_s3_uri(cfg.storage.root) else str(out)
    if log_mlflow:
        _log_to_mlflow(out, manifest, data_uri)
    return DataPrepOutputs(out, manifest, data_uri)


def publish(out: Path, root: str) -> str:
    """Publish the sealed data directory ``out`` to ``<root>/data/<digest>/<version>``; its URI.

    ``digest`` is the data's (:func:`step3vl.pipeline.lineage.data_digest`: the sets and the tokenizer), so the same
    data prepared again (a retried task, another run) reuses what is published there instead of uploading it twice.
    ``version`` hashes every file (reports and timings differ per run): two data preps publishing the same data at
    once write to folders of their own, never into each other's files.
    """
    from step3vl.pipeline.lineage import data_digest, sha256_json
    from step3vl.storage import NotPublishedError, join_uri, open_store, publish_dir, read_manifest

    base = join_uri(root, "data", data_digest(out)[:16])
    for entry in open_store(base).list(recursive=False):
        if entry.endswith("/"):
            try:
                read_manifest(join_uri(base, entry))
            except NotPublishedError:  # an upload that did not finish, or one under way
                continue
            log.info("data already published at %s", join_uri(base, entry))
            return join_uri(base, entry)
    uri = join_uri(base, sha256_json(read_manifest(out)["files"])[:16])
    # a user's set read from object storage stays where it is (data_manifest.json names it and its version): at the
    # recipe's scale, a second copy of its raw pre-training text would be terabytes
    sets = json.loads((out / DATA_MANIFEST).read_text())["sets"]
    skip = tuple(f"raw/{name}" for name, s in sets.items() if s.get("source"))
    # what an interrupted upload of this very version left there is replaced
    publish_dir(out, uri, skip=skip, sealed=True)
    return uri


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


def _write_hashes(out: Path, name: str, hashes: frozenset[str]) -> None:
    d = out / HASHES_DIR
    d.mkdir(exist_ok=True)
    (d / f"{name}.txt").write_text("".join(f"{h}\n" for h in sorted(hashes)))


def _rows_per_task(path: Path) -> dict[str, int]:
    from step3vl.data.io import iter_records

    counts: dict[str, int] = {}
    for raw in iter_records(path):
        if raw.record is not None:
            t = str(raw.record.get("task", "?"))
            counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / "data_manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(out / DATA_MANIFEST)


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
