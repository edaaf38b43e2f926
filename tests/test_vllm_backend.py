"""The ``vllm`` rollout backend's adapter (``step3vl.rl.vllm_engine``), driven against a stand-in for vLLM's
offline API (``tests/fake_vllm``): vLLM itself cannot be installed beside this project's torch. What is tested is
step3vl's side: the export it starts from, the inputs and sampling it asks for, how it reads the outputs, when it
sleeps and wakes, and that the RL loop keeps its weights in step with the policy."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from step3vl.rl.rollout import Prompt, RolloutError, SamplingParams

FAKE = Path(__file__).resolve().parent / "fake_vllm"


@pytest.fixture
def fake_vllm(micro_cfg, monkeypatch):
    """``import vllm`` gives the stand-in, whose engines run the exported micro model."""
    from step3vl.model.loading import new_model
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.serve.export import load_export_state

    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine must set what it needs
    import vllm

    def factory(model_dir):
        tok = load_tokenizer(model_dir)
        net = new_model(micro_cfg.model, tok, 1).eval()
        missing, unexpected = net.load_state_dict(load_export_state(model_dir), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        return net, tok

    monkeypatch.setattr(vllm, "MODEL_FACTORY", factory)
    monkeypatch.setattr(vllm, "INSTANCES", [])
    yield vllm
    sys.modules.pop("vllm", None)


@pytest.fixture(scope="module")
def start(micro_cfg, micro_data, tmp_path_factory):
    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_data.tokenizer_dir)
    uri = str(tmp_path_factory.mktemp("start") / "model")
    save_checkpoint(uri, model_state=new_model(micro_cfg.model, tok, 0).state_dict(),
                    config=checkpoint_config(micro_cfg.model, tok, stage="sft"),
                    tokenizer_dir=str(micro_data.tokenizer_dir))
    return uri


def _engine(start, tmp_path):
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import make_engine

    lm = load_model(start)
    return lm, make_engine("vllm", lm.model, lm.tokenizer, lm.processor, checkpoint_uri=start, cfg=lm.cfg,
                           workdir=tmp_path / "vllm")


def test_engine_starts_from_the_export_and_reads_vllm_outputs_as_the_torch_engine(fake_vllm, start, tmp_path):
    import os

    from step3vl.model.tokenizer import encode_chat
    from step3vl.rl.vllm_engine import WeightSync

    lm, engine = _engine(start, tmp_path)
    llm = fake_vllm.INSTANCES[-1]
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process: weights handed over by reference
    assert llm.kwargs["worker_extension_cls"] == f"{WeightSync.__module__}.WeightSync"
    assert llm.kwargs["dtype"] == "bfloat16" and llm.kwargs["trust_remote_code"]
    assert (tmp_path / "vllm" / "model" / "config.json").is_file()  # the export vLLM loads
    prompts = [Prompt([{"role": "user", "content": "What is 2 + 3?"}]),
               Prompt([{"role": "user", "content": "Name a colour."}])]
    out = engine.generate(prompts, 3, SamplingParams(temperature=1.0, max_tokens=12, seed=4))
    eos = engine.eos_ids
    assert [len(g) for g in out] == [3, 3]
    for p, g in zip(prompts, out):
        ids, _ = encode_chat(lm.tokenizer, p.messages, add_generation_prompt=True)
        for c in g:
            assert c.prompt_tokens == len(ids) and len(c.logprobs) == len(c.token_ids)
            assert not eos & set(c.token_ids)  # vLLM's end-of-turn token is not a response token here
            assert c.finish_reason in ("stop", "length") and all(lp <= 0 for lp in c.logprobs)
            assert not set(c.token_ids) - set(engine.allowed)  # no image placeholder or turn opener
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # n samples differ
    assert llm.events == ["generate", "sleep1"] and engine.asleep  # the update gets the GPU
    greedy = engine.generate(prompts[:1], 1, SamplingParams(temperature=0.0, max_tokens=6))
    assert llm.events[-3:] == ["wake_up", "generate", "sleep1"]
    assert greedy[0][0].token_ids == engine.generate(prompts[:1], 1, SamplingParams(temperature=0.0,
                                                                                   max_tokens=6))[0][0].token_ids


def test_engine_refuses_images_vllm_cannot_expand(fake_vllm, start, tmp_path):
    from PIL import Image

    _, engine = _engine(start, tmp_path)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(RolloutError, match="10B image geometry"):
        engine.generate([Prompt([{"role": "user", "content": "<image>\nWhat is it?"}], [img])], 1)


def test_rl_on_the_vllm_backend_samples_from_the_current_policy(fake_vllm, micro_cfg, micro_data, start, tmp_path):
    """Each iteration hands the policy's weights to vLLM before its rollouts: the second iteration samples from
    the policy the first one trained (its checkpoint), not from the starting weights vLLM was loaded with."""
    from step3vl.checkpoint import checkpoint_uri, load_checkpoint
    from step3vl.eval.suite import load_records
    from step3vl.stages.rl import run_rl

    rl = dataclasses.replace(micro_cfg.rlvr, backend="vllm", iterations=2, checkpoint_every=1, prompts_per_iteration=2,
                             rollouts=2, max_response_tokens=6)
    cfg = dataclasses.replace(micro_cfg, rlvr=rl)
    ds = micro_data.out_dir / "raw" / rl.data
    text_only = [r for r in load_records(ds) if not r.get("images")]

    def reward(records, completions):
        return [float(sum(c.token_ids) % 3) for c in completions], {}

    out = run_rl("rlvr", cfg, micro_data.out_dir, start, str(tmp_path / "rl"), records=text_only, reward_fn=reward,
                 progress=False)
    assert out.result.iteration == 2
    llm = fake_vllm.INSTANCES[-1]
    assert llm.events.count("step3vl_load_weights") == 2 and llm.events.count("generate") == 2
    assert llm.events.index("step3vl_load_weights") < llm.events.index("generate")
    first, second = llm.synced
    after_one = load_checkpoint(checkpoint_uri(tmp_path / "rl" / "checkpoints", 1)).model_state
    start_w = load_checkpoint(start).model_state
    for name, t in second.items():
        if name in after_one:
            assert torch.equal(t, after_one[name].to(torch.bfloat16).to(t.dtype)), name
    assert any(not torch.equal(first[k], second[k]) for k in first)  # the update moved what vLLM samples from
    assert all(torch.equal(first[k], start_w[k].to(torch.bfloat16).to(first[k].dtype)) for k in first if k in start_w)
