"""SIGKILL at a seeded random point of SFT and RLHF, then rerun: the final weights are bit-identical to
an uninterrupted run (pretrain, RLVR and PaCoRe have the same test in test_train.py / test_rl_resume.py).

The kill point is drawn from ``random.Random($STEP3VL_RELIABILITY_SEED or 12)``: CI is reproducible,
and another seed explores other points. The reference and the killed run go side by side (``at_once``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from sigkill import at_once, digest, killed_and_rerun, published, run_until, stage_cmd, uninterrupted

SEED = int(os.environ.get("STEP3VL_RELIABILITY_SEED") or 12)
# RLHF on micro, cut to what the resume needs: a 2-step judge, 3 RL iterations, a checkpoint at each
RLHF_SET = ("--set", "rlhf.genrm_steps=2", "--set", "rlhf.genrm_heldout_pairs=4", "--set", "rlhf.iterations=3",
            "--set", "rlhf.checkpoint_every=1")

pytestmark = pytest.mark.slow


def test_sft_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path, reliability):
    data = micro_data.out_dir
    kill_at = random.Random(SEED).randint(1, 3)  # of the 4 checkpoints (every 2 of 8 steps)
    out = tmp_path / "killed"

    ref = stage_cmd("sft", data, tmp_path / "ref", init=init_model)
    killed = stage_cmd("sft", data, out, init=init_model)
    got = at_once({"reference": lambda: uninterrupted(ref),
                   "killed": lambda: killed_and_rerun(killed, lambda: published(out / "checkpoints") >= kill_at,
                                                      f"{kill_at} checkpoints", log=tmp_path / "killed.log")})
    assert got["killed"] == got["reference"], f"killed after {kill_at} checkpoints"
    reliability.record("sigkill-sft", outcome=f"killed after checkpoint {kill_at} of 4 (step {2 * kill_at}); rerun "
                       f"resumed and ended bit-identical (sha256 {got['killed'][:12]})", data_lost="none")


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

    data = micro_data.out_dir
    ref, out = tmp_path / "ref", tmp_path / "killed"
    point = random.Random(SEED).choice(sorted(ready_for(ref)))

    def reference() -> str:
        rc = run_until(stage_cmd("rlhf", data, ref, *RLHF_SET, init=init_model), finished(ref), tmp_path / "ref.log")
        assert rc in (None, 0), (tmp_path / "ref.log").read_text()[-2000:]
        return digest(ref / "model")

    def killed() -> tuple[str, bool]:
        cmd = stage_cmd("rlhf", data, out, *RLHF_SET, init=init_model)
        rc = run_until(cmd, ready_for(out)[point], tmp_path / "killed.log")
        assert rc is None, f"RLHF ended (rc={rc}) before it could be killed {point}"
        assert not (out / "model").exists()
        genrm_done = (out / "genrm" / "model" / "MANIFEST.json").exists()
        log = tmp_path / "rerun.log"
        rc = run_until(cmd, finished(out), log)
        text = log.read_text()
        assert rc in (None, 0), text[-2000:]
        assert "resuming from" in text  # the judge or the policy continued from its checkpoint, not from scratch
        return digest(out / "model"), genrm_done

    res = at_once({"reference": reference, "killed": killed})
    (got, genrm_done), want = res["killed"], res["reference"]
    assert got == want, f"killed {point}"
    reliability.record("sigkill-rlhf", outcome=f"killed {point} (judge {'finished' if genrm_done else 'unfinished'}); "
                       f"rerun resumed and the policy ended bit-identical (sha256 {got[:12]})", data_lost="none")
