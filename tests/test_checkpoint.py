"""Unit tests for step3vl.checkpoint: bit-exact save/load, exact resume, refusal of corrupt or unsafe dirs."""

from __future__ import annotations

import json
import logging
import math
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from step3vl.checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_uri,
    decode_state,
    encode_state,
    latest_valid_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from step3vl.storage import IntegrityError, NotPublishedError, StorageError, verify_dir


class TinyLM(torch.nn.Module):
    """Embedding tied to the output head, a LayerNorm and dropout: enough to exercise state + RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([1.5], dtype=torch.bfloat16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(self.embed(ids)))) * self.scale.float()


def train_step(model: TinyLM, opt: torch.optim.Optimizer, sched: Any) -> None:
    # Every RNG the state captures feeds into the step, so a wrong restore changes the result.
    ids = torch.randint(0, 32, (4, 6))
    noise = random.random() + float(np.random.rand())
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()) * (1 + noise)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def make_run(seed: int = 0) -> tuple[TinyLM, torch.optim.AdamW, Any]:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, opt, sched


def full_train_state(opt: torch.optim.Optimizer, sched: Any, step: int) -> dict[str, Any]:
    return {
        "step": step,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng_state(),
        "data": {"epoch": 0, "position": np.int64(step * 4), "shard": "train-00000"},
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_identical(a: Any, b: Any, path: str = "") -> None:
    """Exact equality including container types, dict key types/order, dtypes and tensor bits."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(_bits(a), _bits(b)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert [(k, type(k)) for k in a] == [(k, type(k)) for k in b], f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (d / "tokenizer_config.json").write_text("{}")
    return d


@pytest.fixture
def trained() -> tuple[TinyLM, torch.optim.AdamW, Any]:
    model, opt, sched = make_run()
    for _ in range(2):
        train_step(model, opt, sched)
    return model, opt, sched


CONFIG = {"model": {"hidden": 8, "vocab": 32}, "seed": 0, "lr": 1e-2}


def save_run(uri: str | Path, trained: Any, tokenizer_dir: Path | None = None) -> dict[str, Any]:
    model, opt, sched = trained
    return save_checkpoint(
        str(uri),
        model_state=model.state_dict(),
        config=CONFIG,
        tokenizer_dir=tokenizer_dir,
        train_state=full_train_state(opt, sched, step=2),
        extra_meta={"run": "unit"},
    )


# --------------------------------------------------------------------------- round trip


def test_round_trip_is_bit_exact(tmp_path: Path, trained: Any, tokenizer_dir: Path) -> None:
    model, opt, sched = trained
    state_before = full_train_state(opt, sched, step=2)
    uri = checkpoint_uri(tmp_path / "run", 2)
    manifest = save_run(uri, trained, tokenizer_dir)

    assert sorted(manifest["files"]) == [
        "config.json",
        "model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "train_state.json",
        "train_state.safetensors",
    ]
    assert manifest["meta"] == {"kind": "checkpoint", "format": "step3vl-checkpoint/1", "step": 2, "run": "unit"}
    assert uri.endswith("step-000002")

    ckpt = load_checkpoint(uri)
    assert ckpt.path == Path(uri)
    assert ckpt.manifest == manifest
    assert ckpt.config == CONFIG
    assert_identical(ckpt.model_state, {k: v.detach() for k, v in model.state_dict().items()})
    assert ckpt.model_state["scale"].dtype == torch.bfloat16
    assert_identical(ckpt.train_state, state_before)
    # the optimizer's int parameter ids and the torch RNG ByteTensor survive as such
    assert list(ckpt.train_state["optimizer"]["state"]) == [0, 1, 2]
    assert ckpt.train_state["rng"]["torch"].dtype == torch.uint8
    assert isinstance(ckpt.train_state["rng"]["python"], tuple)
    assert ckpt.tokenizer_dir is not None
    assert (ckpt.tokenizer_dir / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()


def test_resume_continues_exactly(tmp_path: Path, trained: Any) -> None:
    """Step 3 after a save/load/restore equals step 3 of the uninterrupted run, bit for bit."""
    uri = checkpoint_uri(tmp_path, 2)
    save_run(uri, trained)
    model, opt, sched = trained
    train_step(model, opt, sched)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a fresh process would start from arbitrary RNG states
    random.seed(123)
    np.random.seed(123)
    ckpt = load_checkpoint(uri)
    model2, opt2, sched2 = make_run(seed=99)
    model2.load_state_dict(ckpt.model_state)
    opt2.load_state_dict(ckpt.train_state["optimizer"])
    sched2.load_state_dict(ckpt.train_state["scheduler"])
    restore_rng_state(ckpt.train_state["rng"])
    train_step(model2, opt2, sched2)
    assert_identical({k: v.detach() for k, v in model2.state_dict().items()}, expected)


def test_state_codec_edge_cases() -> None:
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "__tensor__": "a str key that looks like a tag",
        "ints": {3: "three", -1: None, 0: [1, 2]},
        "mixed": {"a": 1, 2: "b", None: 2.5, True: False, 1.5: "f"},
        "tuple_of_tuples": ((1, (2, 3)), ()),
        "empty": {"d": {}, "l": [], "t": ()},
        "floats": [float("inf"), -0.0, 1e-310, float("nan")],
        "big": 2**100,
        "bytes": b"\x00\xffbytes",
        "np": {"i": np.int32(-7), "f": np.float32(0.1), "b": np.bool_(True), "arr": np.arange(5, dtype=np.uint32)},
        "views": [base[::2], base[1:4], base.view(3, 4).t()],
        "scalar": torch.tensor(2.0, dtype=torch.float64),
        "empty_tensor": torch.zeros(0, 3, dtype=torch.int64),
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "same": [base, base],
    }
    document, tensors = encode_state(state)
    document = json.loads(json.dumps(document))  # what train_state.json holds
    decoded = decode_state(document, tensors)
    assert_identical(decoded, state)


def test_unsupported_state_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"train state: optimizer/extra is a set"):
        encode_state({"optimizer": {"extra": {1, 2}}})
    with pytest.raises(CheckpointError, match=r"has a tuple key"):
        encode_state({"d": {(1, 2): 3}})


def test_tied_weights_are_saved(tmp_path: Path, trained: Any) -> None:
    model = trained[0]
    state = model.state_dict()
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()
    save_checkpoint(tmp_path / "c", model_state=state, config={})
    loaded = load_checkpoint(tmp_path / "c").model_state
    assert list(loaded) == list(state)
    assert torch.equal(loaded["embed.weight"], loaded["head.weight"])
    fresh = TinyLM()
    fresh.load_state_dict(loaded)
    assert fresh.head.weight is fresh.embed.weight


def test_checkpoint_without_train_state(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", model_state={"w": torch.ones(2)}, config={"a": 1})
    ckpt = load_checkpoint(tmp_path / "c")
    assert ckpt.train_state is None and ckpt.tokenizer_dir is None
    assert ckpt.manifest["meta"]["kind"] == "checkpoint"


def test_the_same_model_saved_again_has_the_same_bytes(tmp_path: Path, trained: Any) -> None:
    """A checkpoint's digest is the sha256 of its files, and a rerun that republishes a model (PaCoRe from a finished
    checkpoint root) must give the same digest. safetensors writes its metadata map in a random order per save, so
    without the header made canonical about one save in two differed."""
    from safetensors import safe_open

    model, _, _ = trained
    state = {k: v.detach() for k, v in model.state_dict().items()}
    digests = set()
    for i in range(12):
        manifest = save_checkpoint(tmp_path / f"c{i}", model_state=state, config=CONFIG)
        digests.add(manifest["files"]["model.safetensors"]["sha256"])
    assert len(digests) == 1
    raw = (tmp_path / "c0" / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == ["format", "step3vl.order"]
    with safe_open(str(tmp_path / "c0" / "model.safetensors"), framework="pt") as f:  # still a valid file
        assert f.metadata()["format"] == "pt"
    assert_identical(load_checkpoint(tmp_path / "c0").model_state, state)
    assert list(load_checkpoint(tmp_path / "c0").model_state) == list(state)  # the saved order kept


def test_save_refuses_existing_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", model_state={"w": torch.ones(2)}, config={})
    with pytest.raises(StorageError, match="already exists"):
        save_checkpoint(tmp_path / "c", model_state={"w": torch.zeros(2)}, config={})
    save_checkpoint(tmp_path / "c", model_state={"w": torch.zeros(2)}, config={}, overwrite=True)
    assert torch.equal(load_checkpoint(tmp_path / "c").model_state["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c"], "no build or staging directory is left behind"


# --------------------------------------------------------------------------- refusal


def test_truncated_weights_are_refused_naming_the_file(tmp_path: Path, trained: Any) -> None:
    uri = tmp_path / "c"
    save_run(uri, trained)
    weights = uri / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(IntegrityError, match=r"model\.safetensors has \d+ bytes, manifest says \d+") as err:
        load_checkpoint(uri)
    assert err.value.files == ["model.safetensors"]


def test_edited_train_state_is_refused_naming_the_file(tmp_path: Path, trained: Any) -> None:
    uri = tmp_path / "c"
    save_run(uri, trained)
    path = uri / "train_state.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # same size, one bit of the last tensor flipped
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"train_state\.safetensors sha256 differs"):
        load_checkpoint(uri)


def test_planted_pickle_file_is_refused(tmp_path: Path, trained: Any) -> None:
    uri = tmp_path / "c"
    save_run(uri, trained)
    torch.save({"w": torch.ones(1)}, uri / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle-format file"):
        load_checkpoint(uri)
    (uri / "pytorch_model.bin").unlink()
    (uri / "tokenizer").mkdir(exist_ok=True)
    (uri / "tokenizer" / "extra.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"tokenizer/extra\.pkl"):
        load_checkpoint(uri)


def test_save_refuses_pickle_in_tokenizer_dir(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tokenizer_dir / "state.pt").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match=r"tokenizer/state\.pt is a pickle-format file"):
        save_checkpoint(tmp_path / "c", model_state={"w": torch.ones(1)}, config={}, tokenizer_dir=tokenizer_dir)
    assert not (tmp_path / "c").exists()


def test_loading_never_unpickles(tmp_path: Path, trained: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    save_run(tmp_path / "c", trained)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during load_checkpoint")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert load_checkpoint(tmp_path / "c").train_state["step"] == 2


def test_unpublished_checkpoint_is_refused(tmp_path: Path, trained: Any) -> None:
    uri = tmp_path / "c"
    save_run(uri, trained)
    (uri / "MANIFEST.json").unlink()
    with pytest.raises(NotPublishedError, match="not published"):
        load_checkpoint(uri)


# --------------------------------------------------------------------------- latest valid


def test_latest_valid_checkpoint_skips_corrupt_newest(
    tmp_path: Path, trained: Any, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    assert latest_valid_checkpoint(root) is None
    for step in (1, 2, 10):
        save_run(checkpoint_uri(root, step), trained)
    assert latest_valid_checkpoint(root) == str(root / "step-000010")  # numeric, not lexical, order

    weights = root / "step-000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    # an unfinished publish from a crashed writer and an unrelated directory are ignored too
    (root / "step-000011").mkdir()
    (root / "step-000011" / "model.safetensors").write_bytes(b"partial")
    (root / "notes").mkdir()
    with caplog.at_level(logging.WARNING, logger="step3vl.checkpoint"):
        assert latest_valid_checkpoint(root) == str(root / "step-000002")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-000010" in w and "model.safetensors" in w for w in warnings), warnings
    assert any("step-000011" in w and "not published" in w for w in warnings), warnings
    verify_dir(root / "step-000002")
