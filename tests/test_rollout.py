"""The torch rollout engine: seeded, batched with a shared prefill, greedy = argmax, stop strings."""

import pytest
import torch

from step3vl.model.loading import new_model
from step3vl.model.processor import ImageProcessor
from step3vl.model.tokenizer import load_tokenizer
from step3vl.rl.rollout import Prompt, RolloutError, SamplingParams, TorchEngine, make_engine


@pytest.fixture(scope="module")
def engine(micro_cfg, micro_data):
    tok = load_tokenizer(micro_data.tokenizer_dir)
    model = new_model(micro_cfg.model, tok, 0)
    return TorchEngine(model, tok, ImageProcessor(micro_cfg.model.vision))


def _prompts():
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    return [Prompt([{"role": "user", "content": "What is 2 + 3?"}]),
            Prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}], [img])]


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(temperature=1.0, max_tokens=8, seed=7)
    a = engine.generate(_prompts(), 3, p)
    b = engine.generate(_prompts(), 3, p)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert len(a) == 2 and all(len(g) == 3 for g in a)
    assert all(len(c.logprobs) == len(c.token_ids) for g in a for c in g)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45])
def test_a_vanishing_temperature_samples_its_greedy_limit(engine, temperature):
    """A temperature that is 0 in float32, or whose division overflows, is a valid request (the Python
    API takes any temperature > 0): it samples the argmax (its limit), not a softmax over inf/nan."""
    tiny = engine.generate(_prompts(), 2, SamplingParams(temperature=temperature, max_tokens=6, seed=3))
    greedy = engine.generate(_prompts(), 1, SamplingParams(temperature=0.0, max_tokens=6))
    assert [[c.token_ids for c in g] for g in tiny] == [[x[0].token_ids] * 2 for x in greedy]


def test_greedy_follows_the_argmax_and_batching_does_not_change_it(engine):
    g = SamplingParams(temperature=0.0, max_tokens=6)
    both = engine.generate(_prompts(), 1, g)
    alone = [engine.generate([p], 1, g)[0] for p in _prompts()]
    assert [x[0].token_ids for x in both] == [x[0].token_ids for x in alone]
    # the first greedy token is the argmax of the model's next-token distribution
    from step3vl.rl.rollout import encode_prompt

    ids, _ = encode_prompt(_prompts()[0], engine.tokenizer, engine.processor)
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0, -1]
    logits[engine.banned] = float("-inf")
    assert both[0][0].token_ids[0] == int(logits.argmax())


def test_logprobs_match_a_full_forward(engine):
    from step3vl.rl.rollout import encode_prompt

    c = engine.generate(_prompts()[:1], 1, SamplingParams(temperature=1.0, max_tokens=5, seed=3))[0][0]
    ids, _ = encode_prompt(_prompts()[0], engine.tokenizer, engine.processor)
    seq = torch.tensor([ids + c.token_ids])
    with torch.no_grad():
        logits = engine.model(seq).logits[0].float()
    logits[:, engine.banned] = float("-inf")
    lp = torch.log_softmax(logits, -1)
    want = [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(c.token_ids)]
    assert c.logprobs == pytest.approx(want, abs=1e-4)


def test_stop_strings_truncate(engine):
    outs = engine.generate(_prompts()[:1], 4, SamplingParams(temperature=1.0, max_tokens=12, seed=1))
    text = outs[0][0].text
    assert len(text) >= 3, text
    stop = text[1:3]
    again = engine.generate(_prompts()[:1], 4, SamplingParams(temperature=1.0, max_tokens=12, seed=1, stop=(stop,)))
    c = again[0][0]
    assert stop not in c.text and c.finish_reason == "stop" and text.startswith(c.text)


def test_vllm_backend_missing_is_a_clear_error(engine):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(RolloutError, match="vLLM is not installed"):
            make_engine("vllm", engine.model, engine.tokenizer, engine.processor)
    with pytest.raises(RolloutError, match="unknown rollout backend"):
        make_engine("tensorrt", engine.model, engine.tokenizer, engine.processor)
