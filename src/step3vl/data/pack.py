"""Packed training shards: tokenised once at data prep, so training never re-tokenises.

A packed dataset is a published directory (``MANIFEST.json`` last) with ``index.json`` and
``pack-00000.safetensors``, … Each shard holds ``N`` rows of ``seq_len`` tokens:

- ``input_ids`` int32 (N, L), ``loss_mask`` uint8 (N, L) — assistant tokens only for SFT, every
  text token for pre-training; never image tokens,
- ``segment_ids`` int16 (N, L) — 1, 2, … per sample in the row, 0 on padding; attention is
  block-diagonal causal over segments so packed samples never see each other,
- ``position_ids`` int32 (N, L) — restart at 0 for every sample,
- ``global_pixels`` uint8 (G, 3, S, S), ``crop_pixels`` uint8 (C, 3, c, c), and for the views of
  row i, in ``<im_patch>`` order: ``view_kind[o[i]:o[i+1]]`` (0 global, 1 crop) and
  ``view_index[o[i]:o[i+1]]`` with ``o = row_view_offsets`` (N+1,).

Samples come in a seeded shuffled stream (window = one input shard) and are packed best-fit into a
bounded set of open rows (``open_rows``, ``data.pack_open_rows``): each sample goes to the open row it
fills most tightly; when none has room, the fullest row is closed (if ``open_rows`` are open) and a new
one starts. Memory stays bounded by the shard size and the open rows, not the dataset size. With one
open row (the default) this is next-fit packing, which leaves about a sixth of tiny's rows empty;
32 open rows leave about 4.5%.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from step3vl.data.io import DataError, iter_records, iter_shard, resolve_image
from step3vl.model.processor import ImageProcessor
from step3vl.progress import track
from step3vl.model.tokenizer import (
    IMAGE_END,
    IMAGE_PATCH,
    IMAGE_START,
    IMAGE_TOKEN,
    PATCH_END,
    PATCH_NEWLINE,
    PATCH_START,
)

if TYPE_CHECKING:
    from step3vl.storage import RemoteFiles

log = logging.getLogger(__name__)

PACK_FORMAT = "step3vl-packed/1"
INDEX_FILE = "index.json"
IGNORE_INDEX = -100
LossOn = Literal["all", "assistant"]


@dataclass
class Sample:
    """One record, tokenised: ids, loss mask and its image views (uint8) in placeholder order."""

    input_ids: list[int]
    loss_mask: list[int]
    views: list[tuple[int, np.ndarray]]  # (kind: 0 global / 1 crop, (3, side, side) uint8)
    record_id: str = ""
    task: str = ""


def image_token_ids(tokenizer: Any) -> set[int]:
    return set(tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END, IMAGE_PATCH, PATCH_START, PATCH_END,
                                                 PATCH_NEWLINE]))


def tokenize_record(
    record: dict[str, Any],
    dataset_dir: str | Path,
    tokenizer: Any,
    processor: ImageProcessor,
    loss_on: LossOn,
    *,
    drop_trailing_assistant: bool = False,
) -> Sample:
    """Expand ``<image>`` markers into placeholders, apply the chat template, build the loss mask."""
    from step3vl.model.tokenizer import encode_chat

    rid = str(record.get("id", "?"))
    images = [resolve_image(dataset_dir, ref, record_id=rid) for ref in record.get("images", [])]
    messages = list(record["messages"])
    if drop_trailing_assistant and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    it = iter(images)
    views: list[tuple[int, np.ndarray]] = []
    out_msgs = []
    for m in messages:
        content = m["content"]
        k = content.count(IMAGE_TOKEN)
        if k:
            if m["role"] != "user":
                raise DataError(f"record {rid}: <image> outside a user turn", record_id=rid)
            mine = [next(it) for _ in range(k)]
            content = processor.expand_text(content, mine)
            for img in mine:
                *crops, global_view = processor.raw_views(img)  # placeholder order: crops, then global
                views.extend((1, v) for v in crops)
                views.append((0, global_view))
        out_msgs.append({"role": m["role"], "content": content})
    if next(it, None) is not None:
        raise DataError(f"record {rid}: more images than <image> markers", record_id=rid)
    ids, amask = encode_chat(tokenizer, out_msgs, add_generation_prompt=drop_trailing_assistant)
    if loss_on == "assistant":
        mask = list(amask)
    else:
        skip = image_token_ids(tokenizer)
        mask = [0 if t in skip else 1 for t in ids]
    # the first token has no predecessor in its own sample: in a packed row it would be
    # "predicted" from the previous sample's last token
    mask[0] = 0
    return Sample(ids, mask, views, rid, str(record.get("task", "")))


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    seg: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    views: list[tuple[int, np.ndarray]] = field(default_factory=list)
    samples: int = 0


class _ShardBuilder:
    def __init__(self, seq_len: int, pad_id: int) -> None:
        self.seq_len, self.pad_id = seq_len, pad_id
        self.rows: list[_Row] = []

    def add_row(self, row: _Row) -> None:
        self.rows.append(row)

    def arrays(self) -> dict[str, np.ndarray]:
        n, L = len(self.rows), self.seq_len
        ids = np.full((n, L), self.pad_id, np.int32)
        mask = np.zeros((n, L), np.uint8)
        seg = np.zeros((n, L), np.int16)
        pos = np.zeros((n, L), np.int32)
        g, c, kinds, idx, offs = [], [], [], [], [0]
        for i, r in enumerate(self.rows):
            k = len(r.ids)
            ids[i, :k], mask[i, :k], seg[i, :k], pos[i, :k] = r.ids, r.mask, r.seg, r.pos
            for kind, v in r.views:
                if kind == 0:
                    kinds.append(0)
                    idx.append(len(g))
                    g.append(v)
                else:
                    kinds.append(1)
                    idx.append(len(c))
                    c.append(v)
            offs.append(len(kinds))
        out = {
            "input_ids": ids, "loss_mask": mask, "segment_ids": seg, "position_ids": pos,
            "view_kind": np.asarray(kinds, np.uint8), "view_index": np.asarray(idx, np.int32),
            "row_view_offsets": np.asarray(offs, np.int64),
        }
        out["global_pixels"] = np.stack(g) if g else np.zeros((0, 3, 1, 1), np.uint8)
        out["crop_pixels"] = np.stack(c) if c else np.zeros((0, 3, 1, 1), np.uint8)
        return out


def pack_dataset(
    dataset_dir: str | Path,
    out_uri: str,
    *,
    tokenizer: Any,
    processor: ImageProcessor,
    seq_len: int,
    loss_on: LossOn,
    seed: int = 0,
    rows_per_shard: int = 1024,
    open_rows: int = 1,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    workers: int | None = None,
    shards: list[str] | None = None,
    allow_empty: bool = False,
) -> dict[str, Any]:
    """Tokenise and pack a (gated) dataset into shards at ``out_uri``; returns the index.

    Records are tokenised in up to ``workers`` forked processes (default: one per available CPU), in order, and
    packed here: the shards do not depend on the number of workers. ``shards`` (file names under ``dataset_dir``)
    packs those input shards only (one part of a set, :mod:`step3vl.stages.data`); ``allow_empty`` then accepts a
    part with nothing to pack (every sample longer than ``seq_len``) instead of raising."""
    if open_rows < 1:
        raise ValueError(f"open_rows must be >= 1, got {open_rows}")
    from step3vl.storage import publish_dir

    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rng = random.Random(seed)
    stats = {"samples": 0, "rows": 0, "tokens": 0, "loss_tokens": 0, "dropped_too_long": 0, "per_task": {}}
    too_long_examples: list[str] = []
    with tempfile.TemporaryDirectory(prefix="step3vl-pack-") as tmp:
        out_shards: list[dict[str, Any]] = []
        builder = _ShardBuilder(seq_len, pad_id)
        open_: list[_Row] = []  # rows still taking samples, in the order they were opened

        def close_row(row: _Row) -> None:
            del open_[next(i for i, r in enumerate(open_) if r is row)]  # by identity: rows can be equal
            builder.add_row(row)
            stats["rows"] += 1
            if len(builder.rows) >= rows_per_shard:
                flush_shard()

        def flush_shard() -> None:
            nonlocal builder
            if not builder.rows:
                return
            name = f"pack-{len(out_shards):05d}.safetensors"
            arrs = builder.arrays()
            save_file(arrs, str(Path(tmp) / name))
            out_shards.append({"file": name, "rows": len(builder.rows),
                           "loss_tokens": int(arrs["loss_mask"].sum()),
                           "tokens": int((arrs["segment_ids"] > 0).sum())})
            builder = _ShardBuilder(seq_len, pad_id)

        for sample in track(_shuffled_samples(dataset_dir, tokenizer, processor, loss_on, rng, workers=workers,
                                              shards=shards),
                            f"pack {Path(dataset_dir).name}", enabled=progress, unit=" samples"):
            n = len(sample.input_ids)
            if n > seq_len:
                stats["dropped_too_long"] += 1
                if len(too_long_examples) < 5:
                    too_long_examples.append(f"{sample.record_id} ({n} tokens)")
                continue
            fits = [r for r in open_ if len(r.ids) + n <= seq_len]
            if fits:  # best fit: the row this sample leaves with the least room (the oldest on a tie)
                row = max(fits, key=lambda r: len(r.ids))
            else:
                if len(open_) >= open_rows:
                    close_row(max(open_, key=lambda r: len(r.ids)))
                row = _Row()
                open_.append(row)
            seg = row.samples + 1
            row.ids += sample.input_ids
            row.mask += sample.loss_mask
            row.seg += [seg] * n
            row.pos += list(range(n))
            row.views += sample.views
            row.samples += 1
            if len(row.ids) == seq_len:
                close_row(row)
            stats["samples"] += 1
            stats["tokens"] += n
            stats["loss_tokens"] += sum(sample.loss_mask)
            stats["per_task"][sample.task] = stats["per_task"].get(sample.task, 0) + 1
        for row in list(open_):
            close_row(row)
        flush_shard()
        if stats["dropped_too_long"]:
            log.warning("%s: %d samples longer than seq_len=%d were not packed, e.g. %s", dataset_dir,
                        stats["dropped_too_long"], seq_len, ", ".join(too_long_examples))
        if not out_shards and not allow_empty:
            raise DataError(f"{dataset_dir}: nothing to pack (every sample longer than seq_len={seq_len}?)")
        index = {
            "format": PACK_FORMAT, "seq_len": seq_len, "loss_on": loss_on, "seed": seed, "shards": out_shards,
            "open_rows": open_rows,
            "padding_fraction": padding_fraction(stats["tokens"], stats["rows"], seq_len),
            "too_long_examples": too_long_examples,
            "vision": {"image_size": processor.vision.image_size, "crop_size": processor.vision.crop_size},
            **stats, **(extra_meta or {}),
        }
        (Path(tmp) / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))
        publish_dir(tmp, out_uri, extra={"kind": "packed-dataset", "rows": stats["rows"]})
    return index


def padding_fraction(tokens: int, rows: int, seq_len: int) -> float:
    """The share of packed positions that hold no token (0 for no rows)."""
    return 1 - tokens / (rows * seq_len) if rows else 0.0


def _shuffled_samples(dataset_dir, tokenizer, processor, loss_on, rng: random.Random,
                      window: int = 4096, workers: int | None = None,
                      shards: list[str] | None = None) -> Iterator[Sample]:
    """Tokenised samples in a seeded shuffled order, shuffling within a bounded window (tokenised by ``workers``
    processes a window at a time: memory stays bounded by the window); of the ``shards`` named, or every shard."""
    import itertools
    import multiprocessing

    from step3vl.data.gate import _worker_count

    def raw_records() -> Iterator[Any]:
        if shards is None:
            return iter_records(dataset_dir)
        return itertools.chain.from_iterable(iter_shard(Path(dataset_dir, name)) for name in shards)

    def windows() -> Iterator[list[dict[str, Any]]]:
        buf: list[dict[str, Any]] = []
        for raw in raw_records():
            if raw.record is None:
                raise DataError(f"{dataset_dir}/{raw.where}: {raw.error} (run the data gate first)")
            buf.append(raw.record)
            if len(buf) >= window:
                yield buf
                buf = []
        yield buf

    job = (dataset_dir, tokenizer, processor, loss_on)
    n = _worker_count(workers, window)
    with contextlib.ExitStack() as stack:
        if n > 1:  # forked, as the gate's scan: the tokenizer and processor arrive by inheritance, not pickled
            ctx = multiprocessing.get_context("fork")
            pool = stack.enter_context(ctx.Pool(n, initializer=_init_tokenize_worker, initargs=(job,)))
        for records in windows():
            if n > 1:
                buf = pool.map(_tokenize_in_worker, records, chunksize=max(1, len(records) // (4 * n)))
            else:
                buf = [tokenize_record(r, dataset_dir, tokenizer, processor, loss_on) for r in records]
            rng.shuffle(buf)
            yield from buf


_tokenize_job: tuple[Any, ...] | None = None  # (dataset_dir, tokenizer, processor, loss_on), in forked workers only


def _init_tokenize_worker(job: tuple[Any, ...]) -> None:
    global _tokenize_job
    _tokenize_job = job


def _tokenize_in_worker(record: dict[str, Any]) -> Sample:
    assert _tokenize_job is not None, "_init_tokenize_worker did not run"
    dataset_dir, tokenizer, processor, loss_on = _tokenize_job
    return tokenize_record(record, dataset_dir, tokenizer, processor, loss_on)


# --------------------------------------------------------------------------- reading


@dataclass
class PackedBatch:
    """A training micro-batch built from packed rows."""

    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # (B, L) long
    segment_ids: torch.Tensor  # (B, L) long
    global_pixels: torch.Tensor  # float, normalised
    crop_pixels: torch.Tensor
    view_order: list[tuple[str, int]]

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    def attention_mask(self) -> dict[str, torch.Tensor]:
        """Block-diagonal causal mask (B, 1, L, L) on the batch's device, True = attend; padding attends to
        itself only."""
        seg = self.segment_ids
        L = seg.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        same = seg[:, :, None] == seg[:, None, :]
        mask = same & causal & (seg[:, :, None] > 0)
        mask |= torch.eye(L, dtype=torch.bool, device=seg.device)
        return {"full_attention": mask[:, None]}

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **moved)

    @property
    def has_images(self) -> bool:
        return len(self.view_order) > 0


class PackedDataset:
    """Random access to packed rows, one shard in memory at a time (plus the one being switched to).

    ``path`` is a local packed set, verified whole on opening; or, with ``files`` (the :class:`RemoteFiles` of a
    data directory on S3), the set's folder in it (``"packed/pretrain_broad"``): shards are then downloaded and
    verified when first read, and at most ``keep_shards`` of the set stay on the node's disk (the least recently
    used go first), however large the set is.
    """

    def __init__(self, path: str | Path, processor: ImageProcessor, *, files: RemoteFiles | None = None,
                 keep_shards: int = 4) -> None:
        from step3vl.storage import verify_dir

        self._files, self.keep_shards = files, keep_shards
        if files is None:
            self.path = Path(path)
            verify_dir(self.path)
            index_text = (self.path / INDEX_FILE).read_text()
        else:
            if keep_shards < 2:
                raise ValueError(f"keep_shards={keep_shards}: a batch can span two shards, so keep at least 2")
            self._prefix = str(path).strip("/") + "/"
            self.path = files.dir / self._prefix
            index_text = files.file(self._prefix + INDEX_FILE).read_text()
        self.index = json.loads(index_text)
        if self.index.get("format") != PACK_FORMAT:
            raise DataError(f"{self.path}: not a packed dataset (format {self.index.get('format')!r})")
        self.processor = processor
        self.shard_rows = [s["rows"] for s in self.index["shards"]]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def seq_len(self) -> int:
        return int(self.index["seq_len"])

    @property
    def n_shards(self) -> int:
        return len(self.shard_rows)

    def __len__(self) -> int:
        return sum(self.shard_rows)

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            name = self.index["shards"][i]["file"]
            if self._files is None:
                self._cache[i] = load_file(str(self.path / name))
            else:
                with self._files.hold(self._prefix + name) as local:
                    self._cache[i] = load_file(str(local))  # read into memory: the file may be evicted after
                self._evict(keep=name)
        return self._cache[i]

    def _evict(self, keep: str) -> None:
        """Leave at most ``keep_shards`` of this set's shards on the node's disk, the most recently used."""
        assert self._files is not None
        names = {s["file"] for s in self.index["shards"]}
        present = [p for p in self.path.iterdir() if p.name in names and p.name != keep]

        def last_used(p: Path) -> int:
            try:
                return p.stat().st_mtime_ns
            except FileNotFoundError:  # another rank of the node evicted it meanwhile
                return -1

        present.sort(key=last_used, reverse=True)
        for p in present[self.keep_shards - 1:]:
            self._files.evict(self._prefix + p.name)

    def batch(self, refs: list[tuple[int, int]]) -> PackedBatch:
        """Collate rows ``[(shard, row), ...]`` into a batch; views re-indexed batch-wide."""
        ids, mask, seg, pos, g, c, order = [], [], [], [], [], [], []
        for si, ri in refs:
            t = self.shard(si)
            ids.append(t["input_ids"][ri])
            mask.append(t["loss_mask"][ri])
            seg.append(t["segment_ids"][ri])
            pos.append(t["position_ids"][ri])
            lo, hi = int(t["row_view_offsets"][ri]), int(t["row_view_offsets"][ri + 1])
            for kind, vi in zip(t["view_kind"][lo:hi].tolist(), t["view_index"][lo:hi].tolist()):
                if kind == 0:
                    order.append(("global", len(g)))
                    g.append(t["global_pixels"][vi])
                else:
                    order.append(("crop", len(c)))
                    c.append(t["crop_pixels"][vi])
        input_ids = torch.stack(ids).long()
        labels = input_ids.masked_fill(torch.stack(mask) == 0, IGNORE_INDEX)
        vis = self.processor.vision
        return PackedBatch(
            input_ids=input_ids,
            labels=labels,
            position_ids=torch.stack(pos).long(),
            segment_ids=torch.stack(seg).long(),
            global_pixels=self.processor.normalise(torch.stack(g)) if g else torch.zeros(0, 3, vis.image_size, vis.image_size),
            crop_pixels=self.processor.normalise(torch.stack(c)) if c else torch.zeros(0, 3, vis.crop_size, vis.crop_size),
            view_order=order,
        )
