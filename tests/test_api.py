"""The Python API (``step3vl.api``): load a checkpoint, answer in greedy, sere, majority@K and pacore, with images;
bad input refused by name."""

from __future__ import annotations

import pytest
from PIL import Image

from step3vl.errors import Step3VLError


@pytest.fixture(scope="module")
def model(micro_cfg, tmp_path_factory):
    from step3vl import api
    from step3vl.serve.tiny import random_checkpoint

    return api.load(random_checkpoint(tmp_path_factory.mktemp("api") / "ckpt", micro_cfg.model, seed=0))


def test_each_mode_answers_and_says_how(model):
    from step3vl.pacore.inference import compact

    greedy = model.answer("What is 2 plus 3?", mode="greedy", max_tokens=6)
    assert greedy == model.answer("What is 2 plus 3?", mode="greedy", max_tokens=6)  # deterministic
    assert greedy.mode == "greedy" and greedy.prompt_tokens > 0 and 1 <= greedy.completion_tokens <= 6

    sere = model.answer("What is 2 plus 3?", mode="sere", max_tokens=6, seed=4)
    assert sere == model.answer("What is 2 plus 3?", mode="sere", max_tokens=6, seed=4)  # seeded

    maj = model.answer("What is 2 plus 3?", mode="majority@5", max_tokens=6, seed=4)
    assert len(maj.samples) == 5 and maj.text in maj.samples
    assert maj.votes == sum(compact(s) == compact(maj.text) for s in maj.samples) >= 1
    assert maj.completion_tokens >= 5  # every sample's tokens

    pac = model.answer("What is 2 plus 3?", mode="pacore", rounds=[3], max_tokens=6, seed=4)
    assert pac.mode == "pacore" and len(pac.samples) == 3  # the conclusions its synthesis read
    assert pac.completion_tokens > len(pac.samples)  # every round's tokens


def test_conversations_with_images_and_batches(model, tmp_path):
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    img.save(tmp_path / "red.png")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image> What colour?"}]
    by_path = model.answer(chat, images=["red.png"], image_dir=tmp_path, mode="greedy", max_tokens=4)
    by_image = model.answer(chat, images=[img], mode="greedy", max_tokens=4)
    assert by_path == by_image and by_path.prompt_tokens > model.answer(
        "What colour?", mode="greedy", max_tokens=4).prompt_tokens
    many = model.answer_many([chat, "What is 2 plus 3?"], images=[[img], []], mode="greedy", max_tokens=4)
    assert many[0] == by_image and len(many) == 2


@pytest.mark.parametrize("kwargs, needle", [
    ({"conversation": "hi", "mode": "best-of"}, "unknown evaluation mode 'best-of'"),
    ({"conversation": "hi", "mode": "majority@0"}, "K must be at least 1"),
    ({"conversation": "hi <image>"}, "1 <image> tag(s) but 0 image(s)"),
    ({"conversation": [{"role": "assistant", "content": "x"}]}, "must end with a user turn"),
    ({"conversation": [{"role": "robot", "content": "x"}, {"role": "user", "content": "y"}]}, "message 0"),
    ({"conversation": "hi", "mode": "pacore", "rounds": []}, "at least one width"),
])
def test_bad_input_is_refused_by_name(model, kwargs, needle):
    conversation = kwargs.pop("conversation")
    with pytest.raises(Step3VLError) as e:
        model.answer(conversation, max_tokens=2, **kwargs)
    assert needle in str(e.value)


def test_answer_prompts_batches_every_prompt_into_one_call_per_round():
    from step3vl import api
    from step3vl.rl.rollout import Completion, Prompt, SamplingParams

    calls = []

    class Engine:
        def generate(self, prompts, n, params):
            calls.append((len(prompts), n))
            return [[Completion(f"<think>t</think>{i % 2}", [0, 0], [], "stop", 3) for i in range(n)]
                    for _ in prompts]

    prompts = [Prompt([{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    sp = SamplingParams(max_tokens=2)
    out = api.answer_prompts(Engine(), prompts, "majority@4", params=sp)
    assert calls == [(3, 4)] and [a.text for a in out] == ["<think>t</think>0"] * 3 and out[0].votes == 2
    calls.clear()
    out = api.answer_prompts(Engine(), prompts, "pacore", params=sp, rounds=[4, 2])
    assert calls == [(3, 4), (3, 2), (3, 1)] and all(a.completion_tokens == 14 for a in out)
