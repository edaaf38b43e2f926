"""Helpers of the SIGKILL-and-resume tests (pretrain, SFT, RLVR, RLHF, PaCoRe): the stage command, a
weights digest, published checkpoints, kill-when-ready, and running a test's independent chains at once.

A SIGKILL test runs an uninterrupted reference and one or more kill-then-rerun trials. Each is a chain
of stage processes that depends on no other, so ``at_once`` runs them side by side, every process
single-threaded (``ENV``). On this 2-core machine two such micro-stage processes side by side took
12-14 s together, against 32-43 s one after another at two threads each (pretrain, 4 rounds, ABBA).
The reference and the trials run with the same thread count, so their weights compare bit for bit.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
MICRO = ROOT / "tests" / "conf" / "micro.yaml"
# every process of a SIGKILL test: one thread, so that chains side by side do not oversubscribe the cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

T = TypeVar("T")


def stage_cmd(stage: str, data: Path, out: Path, *extra: str, init: Path | None = None) -> list[str]:
    """``step3vl stage STAGE`` on the micro config, without tracking."""
    return [sys.executable, "-m", "step3vl.cli", "stage", stage, "--config", str(MICRO), "--data", str(data),
            *(("--init", str(init)) if init is not None else ()), "--out", str(out), "--no-tracking", *extra]


def digest(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (file layout aside)."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def published(ck: Path) -> int:
    """How many checkpoints under ``ck`` are complete (their manifest written)."""
    return len([p for p in ck.glob("step-*") if (p / "MANIFEST.json").exists()]) if ck.exists() else 0


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True)


def run_until(cmd: list[str], ready: Callable[[], bool], log: Path | None = None, timeout: float = 300) -> int | None:
    """Run ``cmd``; SIGKILL it once ``ready()`` holds. Returns its exit code, or None when it was killed."""
    with open(log or os.devnull, "wb") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while proc.poll() is None and not ready():
            if time.time() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}")
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        return proc.returncode


def uninterrupted(cmd: list[str]) -> str:
    """The reference: run ``cmd`` to its end; the digest of the model it published."""
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    return digest(Path(cmd[cmd.index("--out") + 1]) / "model")


def killed_and_rerun(cmd: list[str], ready: Callable[[], bool], what: str, *, log: Path | None = None,
                     resumes_checkpoint: bool = True, timeout: float = 300) -> str:
    """Run ``cmd``, SIGKILL it once ``ready()`` holds, rerun it to the end: the final model's digest.
    ``resumes_checkpoint``: the rerun must say it resumed from a training checkpoint (a kill between
    PaCoRe's phases leaves none: its rerun reuses what was published)."""
    out = Path(cmd[cmd.index("--out") + 1])
    rc = run_until(cmd, ready, log, timeout)
    assert rc is None, f"the run ended (rc={rc}) before {what}"
    assert not (out / "model").exists()
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    if resumes_checkpoint:
        assert "resuming from" in res.stderr
    return digest(out / "model")


def at_once(chains: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Run independent chains side by side (one thread each, waiting on its processes); every chain
    runs to its end, then the first failure is raised with the chain's name attached."""
    with ThreadPoolExecutor(max_workers=len(chains)) as pool:
        futures = {name: pool.submit(fn) for name, fn in chains.items()}
    out: dict[str, T] = {}
    for name, fut in futures.items():
        err = fut.exception()
        if err is not None:
            err.add_note(f"in chain {name!r}")
            raise err
        out[name] = fut.result()
    return out
