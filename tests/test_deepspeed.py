"""The training loop under DeepSpeed ZeRO-2 (2 CPU processes, gloo) matches the single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "ds_worker.py"


def _losses(out: str) -> list[float]:
    line = next(ln for ln in out.splitlines() if ln.startswith("LOSSES="))
    return json.loads(line[len("LOSSES="):])


@pytest.mark.slow
def test_zero2_two_processes_match_single_process(micro_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    single = subprocess.run([sys.executable, str(WORKER), str(micro_data.out_dir), str(tmp_path / "single")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    dist = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(WORKER), str(micro_data.out_dir), str(tmp_path / "zero2")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert dist.returncode == 0, dist.stderr[-5000:]
    assert "BACKEND=torch" in single.stdout and "BACKEND=deepspeed-zero2" in dist.stdout
    a, b = _losses(single.stdout), _losses(dist.stdout)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=2e-3), (a, b)
    assert a[-1] < a[0]  # and it trains
