"""SIGKILL mid-stage and rerun: RLVR and PaCoRe training end bit-identical to an uninterrupted run."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}


@pytest.fixture(scope="module")
def init_model(micro_cfg, micro_data, tmp_path_factory):
    """A (random) starting policy saved like a stage output."""
    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_data.tokenizer_dir)
    model = new_model(micro_cfg.model, tok, 0)
    uri = tmp_path_factory.mktemp("init") / "model"
    save_checkpoint(str(uri), model_state=model.state_dict(), config=checkpoint_config(micro_cfg.model, tok, stage="sft"),
                    tokenizer_dir=str(micro_data.tokenizer_dir))
    return uri


def _cmd(stage, data_dir, init, out, *extra):
    return [sys.executable, "-m", "step3vl.cli", "stage", stage, "--config", str(ROOT / "tests/conf/micro.yaml"),
            "--data", str(data_dir), "--init", str(init), "--out", str(out), "--no-tracking", *extra]


def _digest(model_dir: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(model_dir / "model.safetensors")).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _kill_when(proc, ready, what, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {what}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _done(ck: Path) -> int:
    return len([p for p in ck.glob("step-*") if (p / "MANIFEST.json").exists()]) if ck.exists() else 0


@pytest.mark.slow
def test_rlvr_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path):
    # the tiny config's RLVR path: dynamic sampling (2x prompts rolled out) and a KL term to a frozen reference
    extra = ("--set", "rlvr.iterations=5", "--set", "rlvr.checkpoint_every=1", "--set", "rlvr.filter_groups=true",
             "--set", "rlvr.oversample=2", "--set", "rlvr.kl_coef=0.1")
    ref = tmp_path / "ref"
    subprocess.run(_cmd("rlvr", micro_data.out_dir, init_model, ref, *extra), check=True, env=ENV, capture_output=True)
    want = _digest(ref / "model")
    for kill_at in (1, 3):
        out = tmp_path / f"killed{kill_at}"
        proc = subprocess.Popen(_cmd("rlvr", micro_data.out_dir, init_model, out, *extra), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, lambda: _done(out / "checkpoints") >= kill_at, f"{kill_at} RLVR checkpoints")
        assert not (out / "model").exists()
        res = subprocess.run(_cmd("rlvr", micro_data.out_dir, init_model, out, *extra), env=ENV, capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "resuming from" in res.stderr
        assert _digest(out / "model") == want, f"killed after {kill_at} iterations"


@pytest.mark.slow
def test_pacore_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd("pacore", micro_data.out_dir, init_model, ref), check=True, env=ENV, capture_output=True)
    want = _digest(ref / "model")
    assert (ref / "messages" / "step-1").is_dir() and (ref / "messages" / "step-2").is_dir()
    points = {
        "after step 1's message set": lambda out: (out / "step-1" / "messages" / "MANIFEST.json").exists(),
        "mid step 1's warm-up": lambda out: _done(out / "step-1" / "sft" / "checkpoints") >= 1,
        "after step 1": lambda out: (out / "step-1" / "model" / "MANIFEST.json").exists(),
    }
    for name, ready in points.items():
        out = tmp_path / name.replace(" ", "_").replace("'", "")
        proc = subprocess.Popen(_cmd("pacore", micro_data.out_dir, init_model, out), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_when(proc, lambda: ready(out), name)
        assert not (out / "model").exists()
        res = subprocess.run(_cmd("pacore", micro_data.out_dir, init_model, out), env=ENV, capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert _digest(out / "model") == want, f"killed {name}"
