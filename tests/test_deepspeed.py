"""The training loop under DeepSpeed ZeRO (2 CPU processes, gloo) matches the single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "ds_worker.py"


def _line(out: str, key: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith(key + "="))[len(key) + 1:]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.fixture(scope="module")
def single(micro_data, tmp_path_factory) -> str:
    p = subprocess.run([sys.executable, str(WORKER), str(micro_data.out_dir), str(tmp_path_factory.mktemp("single"))],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "BACKEND=torch" in p.stdout
    return p.stdout


def _distributed(micro_data, out: Path, zero_stage: int, port: int, ok: bool = True, **env: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(WORKER), str(micro_data.out_dir), str(out), str(zero_stage)],
        capture_output=True, text=True, env=_env(**env), timeout=900,
    )
    if not ok:
        assert p.returncode != 0
        return p.stderr
    assert p.returncode == 0, p.stderr[-5000:]
    assert f"BACKEND=deepspeed-zero{zero_stage}" in p.stdout
    return p.stdout


@pytest.mark.slow
def test_zero2_two_processes_match_single_process(micro_data, single, tmp_path):
    dist = _distributed(micro_data, tmp_path / "zero2", 2, 29517)
    a, b = json.loads(_line(single, "LOSSES")), json.loads(_line(dist, "LOSSES"))
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=2e-3), (a, b)
    assert a[-1] < a[0]  # and it trains


@pytest.mark.slow
def test_zero3_publishes_the_whole_model(micro_data, single, tmp_path):
    """ZeRO-3 partitions the parameters across ranks; the published model holds them all, gathered (it held
    empty placeholders for the partitioned ones), and equals the single-process model."""
    import torch

    from step3vl.checkpoint import load_checkpoint

    # held-out evaluation on: under ZeRO-3 its forward gathers shards, so every rank runs it
    dist = _distributed(micro_data, tmp_path / "zero3", 3, 29519,
                        DS_OVERRIDES=json.dumps(["pretrain.eval_data=eval", "pretrain.eval_every=2"]))
    assert json.loads(_line(dist, "LOSSES")) == pytest.approx(json.loads(_line(single, "LOSSES")), rel=2e-3)
    evals = json.loads(_line(dist, "EVAL"))
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 0, 2 and 4
    want = load_checkpoint(_line(single, "MODEL")).model_state
    got = load_checkpoint(_line(dist, "MODEL")).model_state
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.allclose(got[k], v, atol=1e-4), k


@pytest.mark.slow
def test_zero2_run_resumes_its_checkpoint_with_fresh_optimizer_moments_when_asked(micro_data, tmp_path):
    """A ZeRO checkpoint holds no optimizer state: a rerun refuses it unless ``resume_fresh_optimizer`` (so a
    retried TrainJob goes on from its last checkpoint instead of failing for good)."""
    out, every = tmp_path / "zero2", json.dumps(["pretrain.checkpoint_every=2"])
    _distributed(micro_data, out, 2, 29521, DS_OVERRIDES=every, DS_STOP_AFTER="2")
    err = _distributed(micro_data, out, 2, 29523, ok=False, DS_OVERRIDES=every)
    assert "exact resume needs the optimizer state" in err and "resume_fresh_optimizer: true" in err
    again = _distributed(micro_data, out, 2, 29525,
                         DS_OVERRIDES=json.dumps(["pretrain.checkpoint_every=2", "pretrain.resume_fresh_optimizer=true"]))
    assert "STEP=4 RESUMED_FROM=2" in again
    losses = json.loads(_line(again, "LOSSES"))
    assert len(losses) == 4 and losses[-1] < losses[0]
