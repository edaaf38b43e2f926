"""Disk full while a checkpoint is written: a real, small tmpfs (needs root to mount; skipped otherwise).

The tmpfs is filled so that the next checkpoint runs out of space at a chosen point (while writing the
weights, the training state, or the manifest); each time the previous checkpoint must stay the latest
valid one, nothing half-written may remain, and once space is freed the same step must save.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from step3vl.checkpoint import (
    CheckpointError,
    checkpoint_uri,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

PAGE = os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root; CI runs as root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)  # 1 MiB of weights
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    return {"model_state": model.state_dict(), "config": {"d": 512},
            "train_state": {"step": 1, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}}


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _fill(root: Path, leave: int) -> Path:
    """A file taking all free space of ``root``'s filesystem but ``leave`` bytes."""
    st = os.statvfs(root)
    free = st.f_bavail * st.f_frsize
    filler = root / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - leave))
    return filler


@pytest.mark.slow
def test_disk_full_during_checkpoint_keeps_previous_valid(tmp_path, reliability):
    state = _state()
    probe = tmp_path / "probe"
    manifest = save_checkpoint(str(probe), **state)
    sizes = {rel: _pages(e["size"]) for rel, e in manifest["files"].items()}
    weights, everything = sizes["model.safetensors"], sum(sizes.values())
    # where the write runs out of space: mid-weights, mid-train-state, at the manifest
    levels = {"while writing the weights": weights // 2,
              "while writing the training state": weights + PAGE,
              "at the manifest": everything}
    seen = []
    with tmpfs(tmp_path / "fs", "8m") as fs:
        root = fs / "checkpoints"
        first = checkpoint_uri(root, 1)
        save_checkpoint(first, **state)
        for where, leave in levels.items():
            filler = _fill(fs, leave)
            with pytest.raises(CheckpointError) as err:  # one error type, whichever writer ran out of space
                save_checkpoint(checkpoint_uri(root, 2), **state)
            text = f"{type(err.value).__name__}: {err.value}"
            cause = err.value.__cause__
            assert getattr(cause, "errno", None) == errno.ENOSPC or "No space left" in text, text
            assert str(root / "step-000002") in text, text  # names the checkpoint being written
            assert latest_valid_checkpoint(root) == first, where
            assert sorted(os.listdir(root)) == ["step-000001"], f"leftovers {where}: {os.listdir(root)}"
            ck = load_checkpoint(first)
            assert all(torch.equal(ck.model_state[k], v) for k, v in state["model_state"].items())
            seen.append(f"{where} (CheckpointError: {' '.join(str(err.value).split()[:2])} … failed: "
                        f"{str(err.value).rsplit('failed: ', 1)[-1][:70]})")
            filler.unlink()
        save_checkpoint(checkpoint_uri(root, 2), **state)  # space freed: the same step saves
        assert latest_valid_checkpoint(root) == checkpoint_uri(root, 2)
    reliability.record("disk-full", outcome="ENOSPC " + ", ".join(seen) + "; each time step 1 stayed the latest valid "
                       "checkpoint and loaded bit-exact, no leftovers; after freeing space step 2 saved",
                       data_lost="none")
