"""The training loop under DeepSpeed ZeRO (2 CPU processes, gloo): matches the single-process run, and resumes exactly
from its own checkpoints or from those of another number of processes."""

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
    return _single(micro_data, tmp_path_factory.mktemp("single"))


def _single(micro_data, out: Path, ok: bool = True, overrides: str = "[]", stop: int | None = None) -> str:
    """The single-process run, in this process (plain torch, one thread as each torchrun rank has): its report, or
    the error's message when ``ok`` is False."""
    import torch

    import ds_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if not ok:
            with pytest.raises(ValueError) as e:  # what the training loop raises on a checkpoint it refuses
                ds_worker.run(str(micro_data.out_dir), str(out), overrides=json.loads(overrides), stop=stop)
            return str(e.value)
        out_text = ds_worker.run(str(micro_data.out_dir), str(out), overrides=json.loads(overrides), stop=stop)
    finally:
        torch.set_num_threads(threads)
    assert "BACKEND=torch" in out_text
    return out_text


def _distributed(micro_data, out: Path, zero_stage: int, port: int, ok: bool = True, nproc: int = 2,
                 **env: str) -> str:
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
         str(WORKER), str(micro_data.out_dir), str(out), str(zero_stage)],
        capture_output=True, text=True, env=_env(**env), timeout=900,
    )
    if not ok:
        assert p.returncode != 0
        return p.stderr
    assert p.returncode == 0, p.stderr[-5000:]
    assert f"BACKEND=deepspeed-zero{zero_stage}" in p.stdout
    return p.stdout


ZERO3_EVAL = ["pretrain.eval_data=eval", "pretrain.eval_every=2"]


@pytest.fixture(scope="module")
def zero2(micro_data, tmp_path_factory) -> str:
    return _distributed(micro_data, tmp_path_factory.mktemp("zero2"), 2, 29517, DS_GATHER_PROBE="1")


@pytest.fixture(scope="module")
def zero3(micro_data, tmp_path_factory) -> str:
    # held-out evaluation on: under ZeRO-3 its forward gathers shards, so every rank runs it
    return _distributed(micro_data, tmp_path_factory.mktemp("zero3"), 3, 29519, DS_OVERRIDES=json.dumps(ZERO3_EVAL),
                        DS_GATHER_PROBE="1")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_only_the_saving_rank_keeps_what_is_gathered(zero2, zero3, stage):
    """Every rank takes part in gathering the ZeRO partitions (the last checkpoint's weights and AdamW state, then
    the published model's weights), but only rank 0, which saves them, keeps a copy: a node's other ranks do not
    each hold the whole model and optimizer state (at 10B, 160 GB apiece)."""
    import re

    out = zero2 if stage == 2 else zero3
    kept: dict[tuple[str, str], list[int]] = {}
    # anywhere in a line: both ranks write to one pipe, so a rank's line may follow another's unfinished one
    for rank, what, n in re.findall(r"GATHERED rank=(\d+) (model|optimizer)=(\d+)", out):
        kept.setdefault((rank, what), []).append(int(n))
    assert kept[("1", "model")] == [0, 0] and kept[("1", "optimizer")] == [0]
    n_params = kept[("0", "optimizer")][0]
    assert n_params > 10 and all(n > n_params for n in kept[("0", "model")])  # every tensor of the state dict


def _final(stdout: str):
    """The last checkpoint of the run that printed ``stdout`` (its model is published beside it)."""
    from step3vl.checkpoint import latest_valid_checkpoint, load_checkpoint

    return load_checkpoint(latest_valid_checkpoint(Path(_line(stdout, "MODEL")).parent / "checkpoints"))


def _assert_same_state(got, want, atol: float = 0.0) -> None:
    """Model weights and AdamW state (moments and step of every parameter) of two checkpoints agree."""
    import torch

    def same(a, b) -> bool:
        return torch.equal(a, b) if atol == 0 else torch.allclose(a, b, rtol=0, atol=atol)

    assert set(got.model_state) == set(want.model_state)
    for k, v in want.model_state.items():
        assert same(got.model_state[k], v), (k, float((got.model_state[k] - v).abs().max()))
    og, ow = got.train_state["optimizer"], want.train_state["optimizer"]
    assert [g["params"] for g in og["param_groups"]] == [g["params"] for g in ow["param_groups"]]
    assert set(og["state"]) == set(ow["state"])
    assert len(ow["state"]) == sum(len(g["params"]) for g in ow["param_groups"])
    for i, e in ow["state"].items():
        assert float(og["state"][i]["step"]) == float(e["step"]) == got.train_state["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert same(og["state"][i][key], e[key]), (i, key, float((og["state"][i][key] - e[key]).abs().max()))


@pytest.mark.slow
def test_zero2_two_processes_match_single_process(single, zero2):
    a, b = json.loads(_line(single, "LOSSES")), json.loads(_line(zero2, "LOSSES"))
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=2e-3), (a, b)
    assert a[-1] < a[0]  # and it trains
    # the checkpoint holds ZeRO's partitioned optimizer state gathered, as one process holds it
    _assert_same_state(_final(zero2), _final(single), atol=1e-5)


@pytest.mark.slow
def test_zero3_publishes_the_whole_model(single, zero3):
    """ZeRO-3 partitions the parameters across ranks; the published model holds them all, gathered (it held
    empty placeholders for the partitioned ones), and equals the single-process model."""
    import torch

    from step3vl.checkpoint import load_checkpoint

    assert json.loads(_line(zero3, "LOSSES")) == pytest.approx(json.loads(_line(single, "LOSSES")), rel=2e-3)
    evals = json.loads(_line(zero3, "EVAL"))
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 0, 2 and 4
    want = load_checkpoint(_line(single, "MODEL")).model_state
    got = load_checkpoint(_line(zero3, "MODEL")).model_state
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.allclose(got[k], v, atol=1e-4), k


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_run_stopped_midway_resumes_exactly(micro_data, zero2, zero3, tmp_path, stage):
    """A ZeRO run stopped after step 2 and rerun ends exactly as the run that was never stopped: same losses,
    held-out losses, weights and AdamW moments, bit for bit (a retried TrainJob continues its job)."""
    straight = {2: zero2, 3: zero3}[stage]
    extra = ZERO3_EVAL if stage == 3 else []
    every = json.dumps(["pretrain.checkpoint_every=2", *extra])
    first = _distributed(micro_data, tmp_path, stage, 29521 + stage, DS_OVERRIDES=every, DS_STOP_AFTER="2")
    assert "STEP=2 RESUMED_FROM=None" in first
    again = _distributed(micro_data, tmp_path, stage, 29525 + stage, DS_OVERRIDES=every)
    assert "STEP=4 RESUMED_FROM=2" in again
    assert _line(again, "LOSSES") == _line(straight, "LOSSES")
    assert _line(again, "EVAL") == _line(straight, "EVAL")
    _assert_same_state(_final(again), _final(straight))


@pytest.mark.slow
def test_checkpoints_resume_on_another_number_of_processes(micro_data, single, tmp_path):
    """A ZeRO-2 checkpoint of 2 ranks resumes in one process, and one process's checkpoint under ZeRO-3 on 3 ranks
    (where most parameters do not split evenly, so the last rank's partitions are padded); both end as the single
    process that was never stopped, moments included (fresh moments would leave the weights 1e-3 away)."""
    every = json.dumps(["pretrain.checkpoint_every=2"])
    _distributed(micro_data, tmp_path / "to_single", 2, 29533, DS_OVERRIDES=every, DS_STOP_AFTER="2")
    to_single = _single(micro_data, tmp_path / "to_single", overrides=every)
    by3 = json.dumps(["pretrain.checkpoint_every=2", "pretrain.batch_size=6"])  # 3 ranks x micro-batch 2
    single6 = _single(micro_data, tmp_path / "single6", overrides=by3)
    _single(micro_data, tmp_path / "to_zero3", overrides=by3, stop=2)
    to_zero3 = _distributed(micro_data, tmp_path / "to_zero3", 3, 29531, nproc=3, DS_OVERRIDES=by3)
    for run, ref in ((to_single, single), (to_zero3, single6)):
        assert "STEP=4 RESUMED_FROM=2" in run
        assert json.loads(_line(run, "LOSSES")) == pytest.approx(json.loads(_line(ref, "LOSSES")), rel=1e-6)
        _assert_same_state(_final(run), _final(ref), atol=1e-5)


@pytest.mark.slow
def test_checkpoint_without_optimizer_state_resumes_with_fresh_moments_only_when_asked(micro_data, tmp_path):
    """Distributed checkpoints of earlier step3vl versions held no optimizer state: a rerun refuses them unless
    ``resume_fresh_optimizer``, which resumes weights, step, data position and RNG with fresh moments."""
    from step3vl.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint

    every = json.dumps(["pretrain.checkpoint_every=2"])
    _single(micro_data, tmp_path, overrides=every, stop=2)
    uri = latest_valid_checkpoint(tmp_path / "checkpoints")
    ck = load_checkpoint(uri)
    save_checkpoint(uri, model_state=ck.model_state, config=ck.config, tokenizer_dir=ck.tokenizer_dir,
                    train_state={**ck.train_state, "optimizer": None}, overwrite=True)
    err = _single(micro_data, tmp_path, ok=False, overrides=every)
    assert "holds no optimizer state" in err and "resume_fresh_optimizer: true" in err
    again = _single(micro_data, tmp_path,
                    overrides=json.dumps(["pretrain.checkpoint_every=2", "pretrain.resume_fresh_optimizer=true"]))
    assert "STEP=4 RESUMED_FROM=2" in again
    losses = json.loads(_line(again, "LOSSES"))
    assert len(losses) == 4 and losses[-1] < losses[0]
