"""PaCoRe([16]) per-prompt wall time against one answer, and against a naive sequential PaCoRe.

The library's ``pacore_generate`` samples each round's width for every prompt as one batched
``generate`` call (each prompt's prefill shared by its samples). The naive baseline here is what a
first implementation does: per prompt, every parallel sample is its own ``generate`` call with
``n=1``, then one call for the synthesis, with the same compaction, shuffle and controller prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from bench.context import Context
from bench.machine import QUIET_SHARE, quiet, timed
from bench.registry import Result, benchmark
from bench.stats import interleave

WIDTH = 16
PROMPTS = 2
MAX_TOKENS = 24  # the tiny pipeline's pacore.max_response_tokens
ROUNDS = 3
EXTRA_S = 30.0
MIN_S = 0.3  # the single-answer arm repeats its call for at least this long per round


def naive_pacore(engine: Any, prompts: Sequence[Any], width: int, params: Any, *, seed: int = 0,
                 template: str | None = None) -> list[Any]:
    """Sequential PaCoRe with one round of ``width``: ``len(prompts) * (width + 1)`` generate calls
    of one prompt and ``n=1`` each. Returns each prompt's final completion."""
    from step3vl.pacore.inference import compact, controller_prompt, shuffled

    def sp(k: int) -> Any:
        return params if params.seed is None else replace(params, seed=params.seed * 1_000_003 + k)

    out = []
    for i, p in enumerate(prompts):
        base = i * (width + 1)
        group = [engine.generate([p], 1, sp(base + j))[0][0] for j in range(width)]
        concl = shuffled([compact(c.text) for c in group], seed, i, 0)
        out.append(engine.generate([controller_prompt(p, concl, template)], 1, sp(base + width))[0][0])
    return out


@benchmark("pacore", "PaCoRe([16]) per-prompt time vs one answer and vs naive sequential PaCoRe")
def pacore(ctx: Context) -> Result:
    from step3vl.model.loading import new_model
    from step3vl.pacore.inference import pacore_generate
    from step3vl.rl.rollout import SamplingParams, TorchEngine

    cfg = ctx.pipeline
    _, prompts = ctx.prompts(PROMPTS, families={"text_math"})
    model = new_model(cfg.model, ctx.tokenizer, 0).eval()
    engine = TorchEngine(model, ctx.tokenizer, ctx.processor)
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=1)
    tokens: dict[str, list[int]] = {"single": [], "pacore": [], "naive": []}

    def single() -> Any:
        t = timed(lambda: engine.generate(prompts, 1, params), min_s=MIN_S)
        tokens["single"].append(sum(len(g[0].token_ids) for g in t.value))
        return t

    def batched() -> Any:
        t = timed(lambda: pacore_generate(engine, prompts, [WIDTH], params, seed=0))
        tokens["pacore"].append(sum(x.total_tokens for x in t.value))
        return t

    def naive() -> Any:
        n0 = engine.stats["generated_tokens"]
        t = timed(lambda: naive_pacore(engine, prompts, WIDTH, params, seed=0))
        tokens["naive"].append(int(engine.stats["generated_tokens"] - n0))
        return t

    rounds = interleave({"single": single, "pacore": batched, "naive": naive}, rounds=ctx.rounds(ROUNDS, 1),
                        warmup=1, accept=quiet, extra_s=ctx.rounds(EXTRA_S, 0))
    used = rounds.used

    def per_prompt(arm: str) -> list[float]:
        return [t.seconds / len(prompts) for t in used[arm]]

    r = Result()
    r.params = {"model": cfg.model.name, "prompts": len(prompts), "width": WIDTH, "max_tokens": MAX_TOKENS,
                "sampling": "temperature 1.0, top_p 1.0, seeded", "generate_calls_naive": len(prompts) * (WIDTH + 1),
                "generate_calls_pacore": 2, "generated_tokens_pacore": tokens["pacore"][-1],
                "generated_tokens_naive": tokens["naive"][-1], "generated_tokens_single": tokens["single"][-1]}
    r.method = (
        f"{len(prompts)} text-only `text_math` prompts of the micro RL set, the {cfg.model.name} model "
        f"(random init: speed does not depend on the weights), `TorchEngine`, up to {MAX_TOKENS} new tokens "
        f"per response, fixed seeds (the same work every round). **Single**: one batched "
        f"`engine.generate(prompts, 1)` call (repeated for ≥ {MIN_S} s per round, time per call). "
        f"**PaCoRe**: `pacore_generate(engine, prompts, [{WIDTH}])`: one batched call of width {WIDTH} for all "
        f"prompts, then one synthesis call over the compacted, shuffled conclusions. **Naive**: per prompt, "
        f"{WIDTH} calls `generate([prompt], 1)` one after another, then one synthesis call "
        f"({len(prompts) * (WIDTH + 1)} calls in all; `bench/entries/pacore.py: naive_pacore`). Per-prompt "
        f"time = call time ÷ {len(prompts)}. The arms alternate, one warm-up round discarded; a round in which "
        f"other processes took ≥ {QUIET_SHARE:.0%} of the CPU is re-run (for up to {EXTRA_S:.0f} s)."
    )
    r.figure("single_s_per_prompt", "single answer: seconds per prompt", "s", per_prompt("single"))
    r.figure("pacore_s_per_prompt", f"PaCoRe([{WIDTH}]), batched rounds: seconds per prompt", "s",
             per_prompt("pacore"))
    r.figure("naive_s_per_prompt", f"PaCoRe([{WIDTH}]), naive sequential: seconds per prompt", "s",
             per_prompt("naive"))
    r.figure("others_cpu", "CPU share other processes took (all arms)", "fraction",
             [t.others for arm in used.values() for t in arm])
    common = {"rejected": rounds.rejected, "contended": not rounds.clean}
    r.ratio("pacore_over_single", f"PaCoRe([{WIDTH}]) / single-answer time per prompt", per_prompt("pacore"),
            per_prompt("single"), target=4.0, ceiling=True, **common)
    r.ratio("naive_over_pacore", "naive sequential / batched PaCoRe time (speed-up of batching)",
            per_prompt("naive"), per_prompt("pacore"), **common)
    r.notes.append(
        f"PaCoRe generates about {tokens['pacore'][-1] / max(tokens['single'][-1], 1):.0f}× the tokens of one answer "
        f"({WIDTH} parallel responses + the synthesis, whose prompt carries {WIDTH} conclusions); the time ratio "
        f"stays far below that because the {WIDTH} samples of a prompt decode as one batch.")
    return r
