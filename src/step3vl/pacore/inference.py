"""PaCoRe inference: rounds of parallel rollouts, compacted and synthesised by the same model.

``rounds`` is a list of widths (``[16]``, ``[32, 4]``); a final round of width 1 is always appended.
Round r samples its width for every prompt **as one batch** (``engine.generate(prompts, width)``),
keeps only each response's conclusion (the text after its last ``</think>``), shuffles the
conclusions with a seeded RNG and renders them with the controller template
(``conf/pacore/controller.jinja``) into a prompt that replaces the last user turn for the next
round. The last round's single answer is the output. Images stay attached: the controller prompt
keeps the problem's ``<image>`` markers and the prompt keeps its images.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from step3vl.errors import Step3VLError
from step3vl.rl.rollout import Completion, Prompt, SamplingParams

TEMPLATE = "pacore/controller.jinja"
MAX_WIDTH = 256


class PaCoReError(Step3VLError):
    """Bad PaCoRe settings (rounds, template)."""


@dataclass
class PaCoReResult:
    """One prompt's PaCoRe answer with its bookkeeping (per round, the final round last)."""

    completion: Completion  # the final round's single answer
    round_tokens: list[int] = field(default_factory=list)  # generated tokens per round (all its samples)
    prompt_tokens: list[int] = field(default_factory=list)  # prompt tokens per round (one prompt)
    conclusions: list[list[str]] = field(default_factory=list)  # per non-final round, as shown (shuffled)

    @property
    def total_tokens(self) -> int:
        return sum(self.round_tokens)


def validate_rounds(rounds: Sequence[int]) -> list[int]:
    """The widths with the final round of 1 appended; refuses empty, non-integer or out-of-range widths."""
    ws = list(rounds)
    if not ws:
        raise PaCoReError("PaCoRe rounds must list at least one width, e.g. [16]")
    for i, w in enumerate(ws):
        if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= MAX_WIDTH:
            raise PaCoReError(f"PaCoRe rounds[{i}] = {w!r}: each width must be an integer in 1..{MAX_WIDTH}")
    return ws + [1]


def compact(text: str) -> str:
    """A response's conclusion: the text after its last ``</think>`` (all of it without one), stripped.

    An unclosed ``<think>`` (a response cut off while reasoning) has no conclusion: ``""``.
    """
    from step3vl.rl.rewards import extract_final

    return extract_final(text).strip()


@lru_cache(maxsize=8)
def _template(path: str | None) -> Any:
    import jinja2

    from step3vl.config import conf_dir

    p = Path(path) if path else conf_dir() / TEMPLATE
    if not p.is_file():
        raise PaCoReError(f"PaCoRe controller template not found: {p}")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
    return env.from_string(p.read_text())


def render_controller(problem: str, responses: Sequence[str], template: str | None = None) -> str:
    """The controller prompt for ``problem`` with the (already shuffled) ``responses``."""
    return _template(template).render(problem=problem, responses=list(responses)).strip()


def shuffled(conclusions: Sequence[str], seed: int, prompt_index: int, round_index: int) -> list[str]:
    """The conclusions in a seeded random order (no position bias; the same seed gives the same order)."""
    out = list(conclusions)
    random.Random(f"pacore/{seed}/{prompt_index}/{round_index}").shuffle(out)
    return out


def controller_prompt(prompt: Prompt, conclusions: Sequence[str], template: str | None = None) -> Prompt:
    """``prompt`` with its last user turn replaced by the controller prompt over ``conclusions``."""
    last = max((i for i, m in enumerate(prompt.messages) if m["role"] == "user"), default=None)
    if last is None:
        raise PaCoReError("a PaCoRe prompt needs a user turn")
    msgs = [dict(m) for m in prompt.messages[: last + 1]]
    msgs[last]["content"] = render_controller(prompt.messages[last]["content"], conclusions, template)
    return Prompt(msgs, list(prompt.images))


def pacore_generate(engine: Any, prompts: Sequence[Prompt], rounds: Sequence[int], params: SamplingParams, *,
                    seed: int = 0, template: str | None = None) -> list[PaCoReResult]:
    """PaCoRe over ``prompts``: every round one batched ``generate`` call, the last round of width 1."""
    widths = validate_rounds(rounds)
    results = [PaCoReResult(completion=Completion("", [], [], "length", 0)) for _ in prompts]
    current = list(prompts)
    for r, width in enumerate(widths):
        # per-round seeds stay in the 64-bit range a generator takes (the API allows seeds up to 2**63 - 1)
        sp = replace(params, seed=None if params.seed is None else (params.seed * 1009 + r) % 2**63)
        groups = engine.generate(current, width, sp)
        for i, (res, group) in enumerate(zip(results, groups)):
            res.round_tokens.append(sum(len(c.token_ids) for c in group))
            res.prompt_tokens.append(group[0].prompt_tokens if group else 0)
        if r == len(widths) - 1:
            for res, group in zip(results, groups):
                res.completion = group[0]
            break
        nxt = []
        for i, (p, group) in enumerate(zip(prompts, groups)):
            concl = shuffled([compact(c.text) for c in group], seed, i, r)
            results[i].conclusions.append(concl)
            nxt.append(controller_prompt(p, concl, template))
        current = nxt
    return results


def majority_vote(texts: Sequence[str]) -> int:
    """Index of a response whose conclusion is the most common (ties: the earliest); empty ones never win."""
    concl = [compact(t) for t in texts]
    counts = Counter(c for c in concl if c)
    if not counts:
        return 0
    best = max(counts.values())
    return next(i for i, c in enumerate(concl) if c and counts[c] == best)
