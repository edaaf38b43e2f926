"""Packing: every sample lands whole in exactly one row, best-fit beats next-fit on padding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from step3vl.data.pack import pack_dataset
from step3vl.model.processor import ImageProcessor
from step3vl.model.tokenizer import load_tokenizer


def _pack(micro_cfg, micro_data, tmp_path: Path, open_rows: int) -> tuple[dict, list[dict[str, np.ndarray]]]:
    out = tmp_path / f"packed-{open_rows}"
    index = pack_dataset(micro_data.out_dir / "raw" / "pretrain_broad", str(out),
                         tokenizer=load_tokenizer(micro_data.tokenizer_dir),
                         processor=ImageProcessor(micro_cfg.model.vision), seq_len=micro_cfg.pretrain.seq_len,
                         loss_on="all", seed=3, open_rows=open_rows, progress=False)
    assert json.loads((out / "index.json").read_text())["open_rows"] == open_rows
    return index, [load_file(str(out / s["file"])) for s in index["shards"]]


def _segments(shards: list[dict[str, np.ndarray]]) -> list[tuple[int, ...]]:
    """Every packed sample's token ids, checking each row's layout on the way."""
    out = []
    for sh in shards:
        for ids, seg, pos in zip(sh["input_ids"], sh["segment_ids"], sh["position_ids"], strict=True):
            used = int((seg > 0).sum())
            assert (seg[:used] > 0).all() and (seg[used:] == 0).all()  # padding only at the end
            assert (np.diff(seg[:used]) >= 0).all() and seg[0] == 1  # segments 1, 2, ... in order
            for s in range(1, int(seg.max()) + 1):
                where = np.flatnonzero(seg == s)
                assert (pos[where] == np.arange(len(where))).all()  # positions restart per sample
                out.append(tuple(ids[where].tolist()))
    return out


def test_best_fit_keeps_every_sample_and_pads_less(micro_cfg, micro_data, tmp_path):
    nf_index, nf = _pack(micro_cfg, micro_data, tmp_path, open_rows=1)
    bf_index, bf = _pack(micro_cfg, micro_data, tmp_path, open_rows=32)
    assert sorted(_segments(bf)) == sorted(_segments(nf))  # the same samples, each whole, once
    assert bf_index["samples"] == nf_index["samples"] and bf_index["tokens"] == nf_index["tokens"]
    assert bf_index["rows"] < nf_index["rows"]
    assert bf_index["padding_fraction"] < 0.5 * nf_index["padding_fraction"], (bf_index["padding_fraction"],
                                                                              nf_index["padding_fraction"])
    views = sum(len(sh["view_kind"]) for sh in bf)
    assert views == sum(len(sh["view_kind"]) for sh in nf)  # every image view travels with its sample


def test_open_rows_must_be_positive(micro_cfg, micro_data, tmp_path):
    with pytest.raises(ValueError, match="open_rows must be >= 1"):
        _pack(micro_cfg, micro_data, tmp_path, open_rows=0)


def test_pack_open_rows_is_validated_in_the_config_naming_the_key():
    from step3vl.config import ConfigError, PipelineConfig, from_dict

    with pytest.raises(ConfigError, match="'data.pack_open_rows' must be >= 1"):
        from_dict(PipelineConfig, {"data": {"pack_open_rows": 0}})
    assert from_dict(PipelineConfig, {"data": {"pack_open_rows": 32}}).data.pack_open_rows == 32


def test_default_packing_is_next_fit(micro_cfg, micro_data):
    """The data stage packs with ``data.pack_open_rows`` (1 in every shipped config): a row closes as
    soon as the next sample does not fit, so each row's samples are consecutive in the shuffled stream."""
    from step3vl.data.pack import PackedDataset

    assert micro_cfg.data.pack_open_rows == 1
    ds = PackedDataset(micro_data.packed("pretrain_broad"), ImageProcessor(micro_cfg.model.vision))
    assert ds.index["open_rows"] == 1


def test_streamed_dataset_reads_the_same_rows_keeping_few_shards_on_disk(micro_cfg, micro_data, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """A packed set read through RemoteFiles (as a TrainJob reads S3) gives the rows of the local set, downloads a
    shard when first read, and leaves at most ``keep_shards`` of them on the node's disk."""
    import torch

    from step3vl.data.pack import PackedDataset
    from step3vl.storage import LocalStore, RemoteFiles, seal_dir

    proc = ImageProcessor(micro_cfg.model.vision)
    data = tmp_path / "data"
    index = pack_dataset(micro_data.out_dir / "raw" / "pretrain_broad", str(data / "packed" / "pb"),
                         tokenizer=load_tokenizer(micro_data.tokenizer_dir), processor=proc,
                         seq_len=micro_cfg.pretrain.seq_len, loss_on="all", rows_per_shard=8, progress=False)
    n = len(index["shards"])
    assert n >= 6
    seal_dir(data)
    local = PackedDataset(data / "packed" / "pb", proc)
    downloaded: list[str] = []
    real = LocalStore.download_file
    monkeypatch.setattr(LocalStore, "download_file", lambda self, key, dest: (downloaded.append(key),
                                                                            real(self, key, dest)))
    files = RemoteFiles(str(data), tmp_path / "node")
    streamed = PackedDataset("packed/pb", proc, files=files, keep_shards=3)
    assert downloaded == ["packed/pb/index.json"] and streamed.shard_rows == local.shard_rows

    def on_disk() -> list[str]:
        return sorted(p.name for p in streamed.path.glob("pack-*.safetensors"))

    for s in list(range(n)) + [0]:  # every shard, then the first again, evicted by then
        refs = [(s, r) for r in range(local.shard_rows[s])]
        a, b = local.batch(refs), streamed.batch(refs)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels), s
        assert torch.equal(a.global_pixels, b.global_pixels) and a.view_order == b.view_order, s
        assert len(on_disk()) <= 3
    shards = [f"packed/pb/{s['file']}" for s in index["shards"]]
    assert downloaded[1:] == shards + shards[:1]
    assert on_disk() == sorted(p.rsplit("/", 1)[1] for p in shards[n - 2:] + shards[:1])
    with pytest.raises(ValueError, match="keep at least 2"):
        PackedDataset("packed/pb", proc, files=files, keep_shards=1)


def test_shards_do_not_depend_on_the_number_of_tokenizing_workers(micro_cfg, micro_data, tmp_path):
    tok, proc = load_tokenizer(micro_data.tokenizer_dir), ImageProcessor(micro_cfg.model.vision)
    shards = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        index = pack_dataset(micro_data.out_dir / "raw" / "pretrain_broad", str(out), tokenizer=tok, processor=proc,
                             seq_len=micro_cfg.pretrain.seq_len, loss_on="all", seed=3, progress=False,
                             workers=workers)
        shards[workers] = [(out / s["file"]).read_bytes() for s in index["shards"]]
    assert shards[1] == shards[2] and len(shards[1]) >= 1


def test_a_record_failing_in_a_tokenizing_worker_is_named(micro_cfg, micro_data, tmp_path):
    import shutil

    from step3vl.data.io import DataError

    src = tmp_path / "set"
    shutil.copytree(micro_data.out_dir / "raw" / "pretrain_broad", src)
    shard = sorted(src.glob("*.jsonl"))[0]
    bad = {"id": "bad-image-turn", "task": "caption", "split": "train", "source": "test", "images": [],
           "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image> no"}]}
    shard.write_text(shard.read_text() + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="record bad-image-turn: <image> outside a user turn") as err:
        pack_dataset(src, str(tmp_path / "out"), tokenizer=load_tokenizer(micro_data.tokenizer_dir),
                     processor=ImageProcessor(micro_cfg.model.vision), seq_len=micro_cfg.pretrain.seq_len,
                     loss_on="all", progress=False, workers=2)
    assert err.value.record_id == "bad-image-turn"
