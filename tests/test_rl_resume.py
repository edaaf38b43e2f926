"""SIGKILL mid-stage and rerun: RLVR and PaCoRe training end bit-identical to an uninterrupted run."""

from collections.abc import Callable
from pathlib import Path

import pytest
from sigkill import at_once, digest, published, run, run_until, stage_cmd


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


def _kill_rerun_digest(stage: str, data: Path, init: Path, out: Path, ready: Callable[[], bool], what: str,
                       *extra: str, resumes_checkpoint: bool = True) -> str:
    """Run the stage, SIGKILL it once ``ready()`` holds, rerun it to the end: the final weights' digest.
    ``resumes_checkpoint``: the rerun must say it resumed from a training checkpoint (a kill between
    PaCoRe's phases leaves none to resume from: the rerun reuses what was published)."""
    cmd = stage_cmd(stage, data, out, *extra, init=init)
    rc = run_until(cmd, ready, timeout=180)
    assert rc is None, f"the run ended (rc={rc}) before {what}"
    assert not (out / "model").exists()
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-2000:]
    if resumes_checkpoint:
        assert "resuming from" in res.stderr
    return digest(out / "model")


def _reference(stage: str, data: Path, init: Path, out: Path, *extra: str) -> Callable[[], str]:
    def go() -> str:
        res = run(stage_cmd(stage, data, out, *extra, init=init))
        assert res.returncode == 0, res.stderr[-2000:]
        return digest(out / "model")

    return go


@pytest.mark.slow
def test_rlvr_sigkill_and_resume_is_bit_identical(micro_data, init_model, tmp_path):
    # the tiny config's RLVR path: dynamic sampling (2x prompts rolled out) and a KL term to a frozen reference
    extra = ("--set", "rlvr.iterations=5", "--set", "rlvr.checkpoint_every=1", "--set", "rlvr.filter_groups=true",
             "--set", "rlvr.oversample=2", "--set", "rlvr.kl_coef=0.1")
    data = micro_data.out_dir

    def killed(at: int) -> Callable[[], str]:
        out = tmp_path / f"killed{at}"
        return lambda: _kill_rerun_digest("rlvr", data, init_model, out, lambda: published(out / "checkpoints") >= at,
                                          f"{at} RLVR checkpoints", *extra)

    got = at_once({"reference": _reference("rlvr", data, init_model, tmp_path / "ref", *extra)}
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
        return lambda: _kill_rerun_digest("pacore", data, init_model, out, lambda: points[name](out), name,
                                          resumes_checkpoint=False)

    got = at_once({"reference": _reference("pacore", data, init_model, tmp_path / "ref")}
                  | {f"killed {name}": killed(name) for name in points})
    want = got.pop("reference")
    ref = tmp_path / "ref"
    assert (ref / "messages" / "step-1").is_dir() and (ref / "messages" / "step-2").is_dir()
    for name, d in got.items():
        assert d == want, name
