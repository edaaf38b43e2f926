"""SIGKILL at a seeded random point of SFT and RLHF, then rerun: the final weights are bit-identical to
an uninterrupted run (pretrain, RLVR and PaCoRe have the same test in test_train.py / test_rl_resume.py).

The kill point is drawn from ``random.Random($STEP3VL_RELIABILITY_SEED or 12)``: CI is reproducible,
and another seed explores other points.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "conf" / "micro.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
SEED = int(os.environ.get("STEP3VL_RELIABILITY_SEED") or 12)
# RLHF on micro, cut to what the resume needs: a 2-step judge, 3 RL iterations, a checkpoint at each
RLHF_SET = ("--set", "rlhf.genrm_steps=2", "--set", "rlhf.genrm_heldout_pairs=4", "--set", "rlhf.iterations=3",
            "--set", "rlhf.checkpoint_every=1")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def init_model(micro_cfg, micro_data, tmp_path_factory) -> Path:
    """A random starting policy saved like a stage output."""
    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_data.tokenizer_dir)
    uri = tmp_path_factory.mktemp("init") / "model"
    save_checkpoint(str(uri), model_state=new_model(micro_cfg.model, tok, 0).state_dict(),
                    config=checkpoint_config(micro_cfg.model, tok, stage="sft"), tokenizer_dir=micro_data.tokenizer_dir)
    return uri


def _cmd(stage: str, data: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "step3vl.cli", "stage", stage, "--config", str(MICRO), "--data", str(data),
            "--init", str(init), "--out", str(out), "--no-tracking", *extra]


def digest(model_dir: Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def published(ck: Path) -> int:
    return len([p for p in ck.glob("step-*") if (p / "MANIFEST.json").exists()]) if ck.exists() else 0


def run_until(cmd: list[str], ready: Callable[[], bool], log: Path, timeout: float = 300) -> int | None:
    """Run ``cmd``; SIGKILL it once ``ready()`` holds. Returns its exit code, or None when it was killed."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=ENV, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while proc.poll() is None and not ready():
            assert time.time() < deadline, f"timed out: {' '.join(cmd)}"
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        return proc.returncode


def test_sft_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path, reliability):
    ref = tmp_path / "ref"
    subprocess.run(_cmd("sft", micro_data.out_dir, init_model, ref), check=True, env=ENV, capture_output=True)
    want = digest(ref / "model")
    kill_at = random.Random(SEED).randint(1, 3)  # of the 4 checkpoints (every 2 of 8 steps)
    out = tmp_path / "killed"
    rc = run_until(_cmd("sft", micro_data.out_dir, init_model, out), lambda: published(out / "checkpoints") >= kill_at,
                   tmp_path / "killed.log")
    assert rc is None, f"SFT ended (rc={rc}) before {kill_at} checkpoints"
    assert not (out / "model").exists()
    res = subprocess.run(_cmd("sft", micro_data.out_dir, init_model, out), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from" in res.stderr
    got = digest(out / "model")
    assert got == want, f"killed after {kill_at} checkpoints"
    reliability.record("sigkill-sft", outcome=f"killed after checkpoint {kill_at} of 4 (step {2 * kill_at}); rerun "
                       f"resumed and ended bit-identical (sha256 {got[:12]})", data_lost="none")


def test_rlhf_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path, reliability):
    def ready_for(out: Path) -> dict[str, Callable[[], bool]]:
        return {
            "after GenRM step 1": lambda: published(out / "genrm" / "checkpoints") >= 1,
            "after RL iteration 1": lambda: published(out / "checkpoints") >= 1,
            "after RL iteration 2": lambda: published(out / "checkpoints") >= 2,
        }

    def finished(out: Path) -> Callable[[], bool]:
        # the policy is published atomically; the win-rate comparison after it is not training
        return lambda: (out / "model" / "MANIFEST.json").exists()

    ref = tmp_path / "ref"
    rc = run_until(_cmd("rlhf", micro_data.out_dir, init_model, ref, *RLHF_SET), finished(ref), tmp_path / "ref.log")
    assert rc in (None, 0), (tmp_path / "ref.log").read_text()[-2000:]
    want = digest(ref / "model")
    point = random.Random(SEED).choice(sorted(ready_for(ref)))
    out = tmp_path / "killed"
    rc = run_until(_cmd("rlhf", micro_data.out_dir, init_model, out, *RLHF_SET), ready_for(out)[point],
                   tmp_path / "killed.log")
    assert rc is None, f"RLHF ended (rc={rc}) before it could be killed {point}"
    assert not (out / "model").exists()
    genrm_done = (out / "genrm" / "model" / "MANIFEST.json").exists()
    log = tmp_path / "rerun.log"
    rc = run_until(_cmd("rlhf", micro_data.out_dir, init_model, out, *RLHF_SET), finished(out), log)
    text = log.read_text()
    assert rc in (None, 0), text[-2000:]
    assert "resuming from" in text  # the judge or the policy continued from its checkpoint, not from scratch
    got = digest(out / "model")
    assert got == want, f"killed {point}"
    reliability.record("sigkill-rlhf", outcome=f"killed {point} (judge {'finished' if genrm_done else 'unfinished'}); "
                       f"rerun resumed and the policy ended bit-identical (sha256 {got[:12]})", data_lost="none")
