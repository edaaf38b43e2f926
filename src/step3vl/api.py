"""The Python API: load a model once, then answer conversations in any of the recipe's modes.

.. code-block:: python

    from step3vl import api

    model = api.load("models:/step3vl-tiny@champion")   # a path, s3://… or a registry reference
    model.answer("What is 12 plus 7?", mode="pacore", rounds=[16]).text
    model.answer([{"role": "user", "content": "<image> How many circles are there?"}], images=["circles.png"],
                 mode="majority@8")

Modes (as ``step3vl eval`` and the ``mode`` extension of ``step3vl serve`` name them):

- ``greedy``: one temperature-0 answer;
- ``sere``: one sample at the recipe's evaluation setting (temperature 1, top-p 1);
- ``majority@K``: K samples; the answer is the first whose conclusion (text after the last ``</think>``) is the
  most common one, and ``votes`` says how many samples share it;
- ``pacore``: parallel coordinated reasoning: each round of ``rounds`` generates its width in one batch, the
  conclusions go into the controller prompt of the next round, and a final round of 1 synthesises the answer.

:func:`answer_prompts` is the same over prompts already built, for callers that own an engine (the server).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from step3vl.errors import Step3VLError
from step3vl.rl.rollout import Completion, Prompt, SamplingParams

DEFAULT_ROUNDS = (16,)  # the recipe's PaCoRe setting


@dataclass(frozen=True)
class Answer:
    """One answer and how it was reached."""

    text: str
    mode: str
    finish_reason: str  # "stop" | "length", of the answer's own sample
    completion_tokens: int  # generated tokens behind this answer: every sample and every round
    prompt_tokens: int  # of the prompt as given (PaCoRe's later rounds read longer controller prompts)
    samples: tuple[str, ...] = ()  # majority@K: the K samples; pacore: the conclusions its last round read
    votes: int = 1  # majority@K: samples whose conclusion is the answer's


@dataclass(frozen=True)
class Vote:
    """majority@K over one group of samples: the winning sample, how many share its conclusion, and the tokens
    generated over the whole group."""

    completion: Completion
    votes: int
    sample_tokens: int


def vote(group: Sequence[Completion]) -> Vote:
    """The first sample whose conclusion is the group's most common (an empty conclusion never wins)."""
    from step3vl.pacore.inference import compact, majority_vote

    best = group[majority_vote([c.text for c in group])]
    votes = sum(compact(c.text) == compact(best.text) for c in group)
    return Vote(best, votes, sum(len(c.token_ids) for c in group))


def parse_mode(mode: str) -> tuple[str, int]:
    """``(kind, k)``: ``("greedy", 1)``, ``("sere", 1)``, ``("majority", K)`` or ``("pacore", 1)``; a
    :class:`Step3VLError` names the modes for anything else."""
    from step3vl.eval.modes import check_mode

    check_mode(mode)
    if mode.startswith("majority@"):
        k = int(mode.split("@", 1)[1])
        if k < 1:
            raise Step3VLError(f"mode {mode}: K must be at least 1")
        return "majority", k
    return mode, 1


def sampling(mode: str, *, max_tokens: int | None = None, seed: int | None = None,
             params: SamplingParams | None = None) -> SamplingParams:
    """The sampling a mode answers with: ``params`` if given, else greedy for ``greedy`` and the recipe's evaluation
    setting (temperature 1, top-p 1) for the sampling modes; ``max_tokens`` and ``seed`` override."""
    from step3vl.eval.suite import EVAL_SAMPLING, GREEDY

    sp = params or (GREEDY if parse_mode(mode)[0] == "greedy" else EVAL_SAMPLING)
    if max_tokens is not None:
        sp = replace(sp, max_tokens=max_tokens)
    return replace(sp, seed=seed) if seed is not None else sp


def answer_prompts(engine: Any, prompts: Sequence[Prompt], mode: str = "sere", *, params: SamplingParams,
                   rounds: Sequence[int] = DEFAULT_ROUNDS, pacore_seed: int = 0) -> list[Answer]:
    """One :class:`Answer` per prompt, in ``mode``: each of greedy, sere and majority@K is one batched ``generate``
    over every prompt; pacore is one per round. ``pacore_seed`` seeds the shuffle of the conclusions."""
    from step3vl.pacore.inference import pacore_generate

    kind, k = parse_mode(mode)
    if not prompts:
        return []
    if kind == "pacore":
        out = []
        for r in pacore_generate(engine, prompts, list(rounds), params, seed=pacore_seed):
            c = r.completion
            out.append(Answer(c.text, mode, c.finish_reason, r.total_tokens,
                              r.prompt_tokens[0] if r.prompt_tokens else c.prompt_tokens,
                              tuple(r.conclusions[-1]) if r.conclusions else ()))
        return out
    groups = engine.generate(list(prompts), k, params)
    if kind != "majority":
        return [Answer(c.text, mode, c.finish_reason, len(c.token_ids), c.prompt_tokens) for (c,) in groups]
    out = []
    for group in groups:
        v = vote(group)
        c = v.completion
        out.append(Answer(c.text, mode, c.finish_reason, v.sample_tokens, c.prompt_tokens,
                          tuple(x.text for x in group), v.votes))
    return out


Conversation = str | Sequence[dict[str, str]]


def _prompt(conversation: Conversation, images: Sequence[Any], image_dir: str | os.PathLike[str]) -> Prompt:
    from step3vl.data.io import resolve_image

    if isinstance(conversation, str):
        messages = [{"role": "user", "content": conversation}]
    else:
        messages = [dict(m) for m in conversation]
    if not messages or messages[-1].get("role") != "user":
        raise Step3VLError("a conversation to answer must end with a user turn")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise Step3VLError(f"message {i}: needs a role of system, user or assistant and a string content")
    tags = sum(m["content"].count("<image>") for m in messages if m["role"] == "user")
    if tags != len(images):
        raise Step3VLError(f"the user turns have {tags} <image> tag(s) but {len(images)} image(s) were given")
    loaded = [im if hasattr(im, "convert") else resolve_image(image_dir, str(im)) for im in images]
    return Prompt(messages, loaded)


class Model:
    """A loaded model and the engine that answers with it (torch; on the process's GPU when there is one)."""

    def __init__(self, loaded: Any) -> None:
        from step3vl.rl.rollout import TorchEngine

        self.loaded = loaded
        self.engine = TorchEngine(loaded.model, loaded.tokenizer, loaded.processor)

    def answer(self, conversation: Conversation, *, images: Sequence[Any] = (), mode: str = "sere",
               rounds: Sequence[int] = DEFAULT_ROUNDS, max_tokens: int | None = None, seed: int | None = None,
               image_dir: str | os.PathLike[str] = ".") -> Answer:
        """Answer one conversation: a question, or chat messages ending with a user turn whose ``<image>`` tags
        take ``images`` in order (PIL images, PNG/JPEG paths relative to ``image_dir``, or data URIs)."""
        return self.answer_many([conversation], images=[images], mode=mode, rounds=rounds, max_tokens=max_tokens,
                                seed=seed, image_dir=image_dir)[0]

    def answer_many(self, conversations: Sequence[Conversation], *, images: Sequence[Sequence[Any]] | None = None,
                    mode: str = "sere", rounds: Sequence[int] = DEFAULT_ROUNDS, max_tokens: int | None = None,
                    seed: int | None = None, image_dir: str | os.PathLike[str] = ".") -> list[Answer]:
        """Answer several conversations together (batched generation); ``images``: one list per conversation."""
        images = images if images is not None else [()] * len(conversations)
        if len(images) != len(conversations):
            raise Step3VLError(f"{len(conversations)} conversations but {len(images)} image lists")
        prompts = [_prompt(c, ims, image_dir) for c, ims in zip(conversations, images)]
        sp = sampling(mode, max_tokens=max_tokens, seed=seed)
        return answer_prompts(self.engine, prompts, mode, params=sp, rounds=rounds, pacore_seed=seed or 0)


def load(uri: str | Path, *, device: Any = None) -> Model:
    """The model at ``uri`` (a checkpoint path, ``s3://…``, ``models:/NAME@alias`` or ``models:/NAME/VERSION``),
    verified as it loads, on ``device`` (default: the process's GPU when there is one, else the CPU)."""
    from step3vl.devices import default_device
    from step3vl.model.loading import load_model

    loaded = load_model(str(uri), device=device if device is not None else default_device())
    loaded.model.eval()
    return Model(loaded)


__all__ = ["Answer", "DEFAULT_ROUNDS", "Model", "Vote", "answer_prompts", "load", "parse_mode", "sampling", "vote"]
