"""Each safeguard, removed, makes a reliability case fail: proof that the cases test the safeguards.

Every case is a plain function that asserts its promise. It passes as is (the ``test_..._holds``
tests) and, with the safeguard monkeypatched away, the same function must raise AssertionError.
"""

from __future__ import annotations

import os
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from test_data_gate import append_lines, clean_records, image, make, raw_line, record

from step3vl import storage
from step3vl.checkpoint import checkpoint_uri, latest_valid_checkpoint, load_checkpoint, save_checkpoint
from step3vl.data import gate as gate_mod
from step3vl.data import io as data_io
from step3vl.data.gate import validate_dataset
from step3vl.data.io import UnsafeImageRef, iter_records, resolve_image
from step3vl.storage import IntegrityError, NotPublishedError, publish_dir, read_manifest


# --------------------------------------------------------------------------- the cases


def case_crash_mid_publish(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A publish that dies while copying its second file leaves nothing a reader can see."""
    src = tmp / "src"
    (src / "shards").mkdir(parents=True)
    for i in range(3):
        (src / "shards" / f"{i}.bin").write_bytes(bytes([i]) * 1000)
    dest = tmp / "published" / "dataset"
    real_copy, calls = shutil.copyfile, {"n": 0}

    def crash_on_second(a, b, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash mid-publish")
        return real_copy(a, b, **kw)

    monkeypatch.setattr(shutil, "copyfile", crash_on_second)
    try:
        with pytest.raises(OSError, match="simulated crash"):
            publish_dir(src, dest)
    finally:
        monkeypatch.setattr(shutil, "copyfile", real_copy)
    visible = storage.open_store(tmp / "published").list()
    assert visible == [], f"a reader sees {visible} of an unfinished publish"
    try:
        read_manifest(dest)
    except NotPublishedError:
        pass
    else:
        raise AssertionError(f"{dest} looks published after a crash mid-publish")
    return "nothing visible after the crash"


def case_corrupt_newest_checkpoint(tmp: Path) -> str:
    """A bit flip in the newest checkpoint: resume falls back to the previous one, loading it is refused."""
    tmp.mkdir(parents=True, exist_ok=True)
    root = tmp / "ckpts"
    save_checkpoint(checkpoint_uri(root, 1), model_state={"w": torch.zeros(64)}, config={})
    save_checkpoint(checkpoint_uri(root, 2), model_state={"w": torch.ones(64)}, config={})
    weights = Path(checkpoint_uri(root, 2)) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # same size, one bit of a weight
    weights.write_bytes(bytes(data))
    latest = latest_valid_checkpoint(root)
    assert latest == checkpoint_uri(root, 1), f"resume would start from the corrupt {Path(str(latest)).name}"
    try:
        load_checkpoint(checkpoint_uri(root, 2))
    except IntegrityError:
        pass
    else:
        raise AssertionError("the corrupt checkpoint loaded")
    return "corrupt step 2 skipped, step 1 resumed"


def case_outside_image(tmp: Path) -> str:
    """``../outside.png`` (a real image next to the dataset) is refused by the gate and by the loader."""
    tmp.mkdir(parents=True, exist_ok=True)
    image(7, 16).save(tmp / "outside.png")
    ds = make(tmp, clean_records())
    append_lines(ds, raw_line(record(9, images=["../outside.png"])))
    report = validate_dataset(ds, workers=1)
    failed = [c.name for c in report.failed_checks]
    assert failed == ["image_paths_safe"], f"the gate let an image outside the dataset through (failed: {failed})"
    try:
        resolve_image(ds, "../outside.png")
    except UnsafeImageRef:
        pass
    else:
        raise AssertionError("an image outside the dataset was read")
    return "refused by image_paths_safe"


def case_huge_line(tmp: Path) -> str:
    """A 10 MB line is refused without being read whole."""
    tmp.mkdir(parents=True, exist_ok=True)
    ds = make(tmp, clean_records())
    append_lines(ds, raw_line(record(9, images=[], messages=[{"role": "user", "content": "x" * (10 << 20)},
                                                             {"role": "assistant", "content": "y"}])))
    tracemalloc.start()
    try:
        rows = list(iter_records(ds))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows[5].error is not None and "byte limit" in rows[5].error, "the 10 MB line was accepted"
    assert peak < 3 << 20, f"peak {peak >> 20} MiB: the line was read whole"
    return f"refused, peak {peak >> 10} KiB"


def _flat_png(width: int, height: int) -> bytes:
    """A complete, valid grayscale PNG of width x height (it compresses to almost nothing)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = zlib.compress(b"\x00" * ((width + 1) * height), 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def case_pixel_bomb(tmp: Path) -> str:
    """A small, valid PNG declaring 7100x7100 (over the 50 MP budget) is refused from its header."""
    tmp.mkdir(parents=True, exist_ok=True)
    ds = make(tmp, clean_records())
    (ds / "images" / "big.png").write_bytes(_flat_png(7100, 7100))
    append_lines(ds, raw_line(record(9, images=["images/big.png"])))
    report = validate_dataset(ds, workers=1)
    failed = [c.name for c in report.failed_checks]
    assert failed == ["images_decode"], f"a 50 MP image passed the gate (failed: {failed})"
    assert "pixel" in report.check("images_decode").details[0]
    return "refused from the header"


# --------------------------------------------------------------------------- with the safeguards


def test_crash_mid_publish_leaves_nothing_visible(tmp_path, monkeypatch, reliability):
    outcome = case_crash_mid_publish(tmp_path, monkeypatch)
    reliability.record("crash-mid-publish", outcome=outcome + "; nothing under the destination, read_manifest "
                       "says not published", data_lost="none")


def test_cases_hold_with_every_safeguard(tmp_path):
    case_corrupt_newest_checkpoint(tmp_path / "a")
    case_outside_image(tmp_path / "b")
    case_huge_line(tmp_path / "c")
    case_pixel_bomb(tmp_path / "d")


# --------------------------------------------------------------------------- without them


def test_without_atomic_publish_a_partial_checkpoint_is_visible(tmp_path, monkeypatch, reliability):
    def in_place(src, dest, manifest, overwrite, move, remote=None):  # no staging, no rename: where readers look
        dest.mkdir(parents=True, exist_ok=True)
        (dest / storage.MANIFEST_NAME).write_bytes(storage._manifest_bytes(manifest))
        for rel in manifest["files"]:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dest / rel)

    monkeypatch.setattr(storage, "_publish_local", in_place)
    with pytest.raises(AssertionError) as err:
        case_crash_mid_publish(tmp_path, monkeypatch)
    reliability.record("crash-mid-publish", outcome=f"atomic publish removed → case fails: {err.value}".split("\n")[0])


def test_without_checksums_a_corrupt_checkpoint_is_resumed(tmp_path, monkeypatch, reliability):
    real = storage._check_against
    monkeypatch.setattr(storage, "_check_against", lambda where, manifest, present, content: real(
        where, manifest, present, None))  # presence only, no size or sha256
    with pytest.raises(AssertionError) as err:
        case_corrupt_newest_checkpoint(tmp_path)
    reliability.record("corrupt-checkpoint", outcome=f"checksum check removed → case fails: {err.value}".split("\n")[0])


def test_without_the_path_check_an_outside_image_is_read(tmp_path, monkeypatch, reliability):
    def naive(root, ref, where, record_id, max_bytes):
        with open(os.path.join(root, ref), "rb") as f:
            return f.read()

    monkeypatch.setattr(data_io, "_read_safe_path", naive)
    with pytest.raises(AssertionError) as err:
        case_outside_image(tmp_path)
    reliability.record("bad-data-hostile", outcome=f"path check removed → case fails: {err.value}".split("\n")[0])


def test_without_the_line_limit_a_huge_line_is_read_whole(tmp_path, monkeypatch, reliability):
    real = data_io._iter_lines
    monkeypatch.setattr(data_io, "_iter_lines", lambda f, shard, max_line_bytes: real(f, shard, 1 << 40))
    with pytest.raises(AssertionError) as err:
        case_huge_line(tmp_path)
    reliability.record("bad-data-hostile", outcome=f"line limit removed → case fails: {err.value}".split("\n")[0])


def test_without_the_pixel_limit_a_bomb_is_decoded(tmp_path, monkeypatch, reliability):
    real = data_io.decode_image

    def unlimited(data, **kw):  # whatever budget the caller passes
        return real(data, **{**kw, "max_pixels": 1 << 40})

    monkeypatch.setattr(gate_mod, "decode_image", unlimited)
    monkeypatch.setattr(data_io, "decode_image", unlimited)
    with pytest.raises(AssertionError) as err:
        case_pixel_bomb(tmp_path)
    reliability.record("bad-data-hostile", outcome=f"pixel limit removed → case fails: {err.value}".split("\n")[0])

