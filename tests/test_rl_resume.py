"""SIGKILL mid-stage and rerun: RLVR and PaCoRe training end bit-identical to an uninterrupted run."""

from collections.abc import Callable

import pytest
from sigkill import at_once, killed_and_rerun, published, stage_cmd, uninterrupted


@pytest.mark.slow
def test_rlvr_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path):
    # the tiny config's RLVR path: dynamic sampling (2x prompts rolled out) and a KL term to a frozen reference
    extra = ("--set", "rlvr.iterations=5", "--set", "rlvr.checkpoint_every=1", "--set", "rlvr.filter_groups=true",
             "--set", "rlvr.oversample=2", "--set", "rlvr.kl_coef=0.1")
    data = micro_data.out_dir

    def killed(at: int) -> Callable[[], str]:
        out = tmp_path / f"killed{at}"
        return lambda: killed_and_rerun(stage_cmd("rlvr", data, out, *extra, init=init_model),
                                        lambda: published(out / "checkpoints") >= at, f"{at} RLVR checkpoints",
                                        timeout=180)

    ref = stage_cmd("rlvr", data, tmp_path / "ref", *extra, init=init_model)
    got = at_once({"reference": lambda: uninterrupted(ref)}
                  | {f"killed after {at} iterations": killed(at) for at in (1, 3)})
    want = got.pop("reference")
    for name, d in got.items():
        assert d == want, name


@pytest.mark.slow
def test_pacore_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path):
    data = micro_data.out_dir
    points = {
        "after step 1's message set": lambda out: (out / "step-1" / "messages" / "MANIFEST.json").exists(),
        "mid step 1's warm-up": lambda out: published(out / "step-1" / "sft" / "checkpoints") >= 1,
        "after step 1": lambda out: (out / "step-1" / "model" / "MANIFEST.json").exists(),
    }

    def killed(name: str) -> Callable[[], str]:
        out = tmp_path / name.replace(" ", "_").replace("'", "")
        return lambda: killed_and_rerun(stage_cmd("pacore", data, out, init=init_model), lambda: points[name](out),
                                        name, resumes_checkpoint=False, timeout=180)

    ref = tmp_path / "ref"
    got = at_once({"reference": lambda: uninterrupted(stage_cmd("pacore", data, ref, init=init_model))}
                  | {f"killed {name}": killed(name) for name in points})
    want = got.pop("reference")
    assert (ref / "messages" / "step-1").is_dir() and (ref / "messages" / "step-2").is_dir()
    for name, d in got.items():
        assert d == want, name
