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
    data_manifest.json  content hash, rows per task and the gate result of every set
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step3vl.config import DataConfig, DatasetSpec, PipelineConfig

log = logging.getLogger(__name__)

TRAIN_PURPOSES = ("pretrain", "sft")
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
    for name, spec in _progress(order, "generate", progress):
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


def _progress(items, desc: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="set", leave=False)
