"""The stages compute where ``step3vl.devices.default_device`` says: the process's GPU on a GPU pod.

There is no GPU here, so the tests use a second device that has real values, PyTorch's lazy tensor backend
(``second_device``): any tensor left on the CPU next to the model's fails there, as it would beside CUDA ones.
Each test runs the same work on the CPU and compares."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from second_device import lazy_device

from step3vl.rl.rollout import Completion, Prompt, SamplingParams


def _prompts():
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    return [Prompt([{"role": "user", "content": "What is 2 + 3?"}]),
            Prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}], [img])]


@pytest.fixture
def start(init_model) -> str:
    return str(init_model)


def test_a_cpu_tensor_beside_the_second_devices_fails(monkeypatch):
    """The harness catches what a GPU would: mixing devices is an error there."""
    with lazy_device(monkeypatch) as dev:
        x = torch.ones(3, device=dev)
        with pytest.raises(RuntimeError, match="lazy"):
            (x + torch.ones(3)).tolist()
        assert torch.stack(x.chunk(3)).tolist() == [[1.0], [1.0], [1.0]]  # the harness's own equivalents


def test_engine_generates_on_the_models_device(start, monkeypatch):
    """Prefill with images, the KV cache, sampling and decoding run on the model's device; greedy answers and
    their log-probs are those of the same model on the CPU."""
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import TorchEngine

    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    cpu = load_model(start)
    want = TorchEngine(cpu.model, cpu.tokenizer, cpu.processor).generate(_prompts(), 2, greedy)
    with lazy_device(monkeypatch) as dev:
        lm = load_model(start, device=dev)
        assert {p.device for p in lm.model.parameters()} == {dev}
        engine = TorchEngine(lm.model, lm.tokenizer, lm.processor)
        got = engine.generate(_prompts(), 2, greedy)
        sampled = engine.generate(_prompts(), 3, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=5))
        again = engine.generate(_prompts(), 3, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=5))
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    for g, w in zip(got, want):
        for c, d in zip(g, w):
            assert c.logprobs == pytest.approx(d.logprobs, abs=1e-4)
    assert [[c.token_ids for c in g] for g in sampled] == [[c.token_ids for c in g] for g in again]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for g in sampled for c in g)


def test_genrm_judges_on_the_models_device(micro_cfg, start, monkeypatch):
    """The judge's letter probabilities (its own forward, outside the engine) come from the model's device."""
    from step3vl.model.loading import load_model
    from step3vl.rl.genrm import GenRM

    def letters(lm):
        g = GenRM(lm.model, lm.tokenizer, lm.processor, max_judgment_tokens=4)
        comps = [Completion("", [g.think_end, 5], [0.0, 0.0], "stop", 0)] * 2
        return [v.p_a for v in g._letter_probs(g.prompts(_prompts(), ["4", "red"], ["5", "blue"]), comps)]

    want = letters(load_model(start))
    with lazy_device(monkeypatch) as dev:
        got = letters(load_model(start, device=dev))
    assert got == pytest.approx(want, abs=1e-5) and all(0.0 < p < 1.0 for p in got)


def _reward(records, completions):
    """A reward that differs between samples of a prompt, so that the update has something to learn."""
    return [float(sum(c.token_ids) % 3) for c in completions], {}


def test_rl_stage_runs_on_the_stages_device(micro_cfg, micro_data, start, tmp_path, monkeypatch):
    """One PPO iteration (GAE value head, KL to the frozen start, entropy bonus) with the policy on the stage's
    device: rollouts, old and reference log-probs, advantages, the update and the checkpoint. It learns what the
    same iteration learns on the CPU, up to the devices' arithmetic."""
    from step3vl.model.loading import load_model
    from step3vl.stages.rl import run_rl

    rl = dataclasses.replace(micro_cfg.rlvr, iterations=1, prompts_per_iteration=2, rollouts=2, max_response_tokens=6,
                             algorithm="gae", kl_coef=0.05, entropy_coef=0.01, epochs=1)
    cfg = dataclasses.replace(micro_cfg, rlvr=rl)
    cpu = run_rl("rlvr", cfg, micro_data.out_dir, start, str(tmp_path / "cpu"), reward_fn=_reward, progress=False)
    with lazy_device(monkeypatch) as dev:
        out = run_rl("rlvr", cfg, micro_data.out_dir, start, str(tmp_path / "lazy"), reward_fn=_reward, progress=False)
    assert (cpu.result.device, out.result.device) == ("cpu", str(dev))
    a, b = cpu.result.history[0], out.result.history[0]
    assert b["reward_std"] > 0 and b["reward_mean"] == a["reward_mean"]  # the same rollouts
    for key in ("policy_loss", "value_loss", "kl", "entropy"):
        assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    before = load_model(start).model.state_dict()
    want, got = load_model(cpu.model_uri).model.state_dict(), load_model(out.model_uri).model.state_dict()
    # AdamW's first step moves each weight by about ±lr whatever its gradient's size, so a gradient within
    # rounding of 0 may go either way on another device: the updates agree in direction on nearly every weight
    d_want = torch.cat([(want[k] - before[k]).flatten() for k in want])
    d_got = torch.cat([(got[k] - before[k]).flatten() for k in want])
    moved = d_want != 0
    assert int(moved.sum()) > 10_000
    assert float((torch.sign(d_got[moved]) == torch.sign(d_want[moved])).float().mean()) > 0.99


def test_training_loop_trains_on_the_process_device(micro_cfg, micro_data, start, tmp_path, monkeypatch):
    """SFT steps (packed rows with images) on the process's device give the CPU's losses, up to the devices'
    arithmetic (AdamW's early ±lr steps amplify rounding: 0.4% apart here at most), and publish a model."""
    from step3vl.stages.train import run_training

    cpu = run_training("sft", micro_cfg, micro_data.out_dir, str(tmp_path / "cpu"), init_uri=start, progress=False)
    with lazy_device(monkeypatch) as dev:
        got = run_training("sft", micro_cfg, micro_data.out_dir, str(tmp_path / "lazy"), init_uri=start,
                           progress=False)
    assert (cpu.result.device, got.result.device) == ("cpu", str(dev))
    assert [h["loss"] for h in got.result.history] == pytest.approx([h["loss"] for h in cpu.result.history],
                                                                    rel=1e-2)


def test_rl_stage_refuses_a_policy_whose_training_state_cannot_fit_its_gpu(micro_cfg, start, monkeypatch):
    """On a GPU the RL stage checks, before any rollout, that the fp32 gradients and AdamW moments (12 B per
    trainable parameter) and the KL reference (4 B per parameter) fit the GPU's free memory; on the CPU it does not
    ask. (The GPU is faked: the model's device and the GPU's free memory are all that is read.)"""
    from step3vl import devices
    from step3vl.errors import Step3VLError
    from step3vl.model.loading import load_model
    from step3vl.stages.rl import require_fits

    model = load_model(start).model
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    on = {"device": torch.device("cuda", 0)}
    free = {"bytes": 0}
    monkeypatch.setattr(devices, "module_device", lambda m: on["device"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 141 * 1024**3))
    with_kl = dataclasses.replace(micro_cfg.rlvr, kl_coef=0.05)
    free["bytes"] = 16 * n - 1
    with pytest.raises(Step3VLError, match=r"rlvr: the policy's training state needs at least .* GiB more on cuda:0 "
                                           rf"\({n:,} trainable parameters x 12 B .* frozen KL reference\)"):
        require_fits("rlvr", model, with_kl)
    free["bytes"] = 16 * n
    require_fits("rlvr", model, with_kl)  # exactly enough
    free["bytes"] = 12 * n
    require_fits("rlvr", model, dataclasses.replace(with_kl, kl_coef=0.0))  # no reference to hold
    free["bytes"] = 0
    on["device"] = torch.device("cpu")
    require_fits("rlvr", model, with_kl)  # the CPU is not judged
