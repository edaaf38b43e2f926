"""One RL iteration split into rollout / reward / update, and rollout tokens/s against plain
``transformers`` ``generate`` on the same prompts and weights.

The RL loop (``step3vl.rl.loop.rl_train``) times its own phases per iteration (``rollout_s``,
``reward_s``, ``update_s`` in each history row); the entry runs one iteration per call so that
every call is a paired, re-runnable sample. The rollout comparison wraps the very same decoder
modules (``model.model``, ``model.lm_head``: Qwen3-shaped) in a ``Qwen3ForCausalLM`` and samples
with ``generate``: same prompts, samples per prompt, length cap, temperature and banned tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from bench.context import Context
from bench.machine import QUIET_SHARE, CpuSnapshot, Timed, quiet, timed
from bench.registry import Result, benchmark
from bench.stats import interleave

PROMPTS = 8  # per RL iteration and per rollout call
ROLLOUTS = 8  # samples per prompt
MAX_TOKENS = 24  # the tiny pipeline's max_response_tokens
ROUNDS = 4
EXTRA_S = 30.0


class HFGenerate:
    """``Qwen3ForCausalLM.generate`` over the decoder of a Step3VL model (shared modules, no copy):
    text-only prompts, left-padded, ``num_return_sequences`` samples each."""

    def __init__(self, model: Any, engine: Any) -> None:
        from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

        from step3vl.model.vlm import qwen3_config

        with torch.device("meta"):  # the decoder's own weights are used; build nothing else
            lm = Qwen3ForCausalLM(qwen3_config(model.cfg.text))
        lm.model, lm.lm_head = model.model, model.lm_head
        self.lm, self.engine = lm.eval(), engine

    @torch.no_grad()
    def generate(self, prompts: list[Any], n: int, max_tokens: int, seed: int) -> int:
        """Sample ``n`` completions per prompt; returns the generated tokens (up to each sample's end)."""
        from step3vl.rl.rollout import encode_prompt

        e = self.engine
        ids = [encode_prompt(p, e.tokenizer, e.processor)[0] for p in prompts]
        L = max(map(len, ids))
        inp = torch.full((len(ids), L), e.pad_id, dtype=torch.long)
        mask = torch.zeros_like(inp)
        for r, t in enumerate(ids):
            inp[r, L - len(t):], mask[r, L - len(t):] = torch.tensor(t), 1
        torch.manual_seed(seed)
        out = self.lm.generate(input_ids=inp, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, max_new_tokens=max_tokens, num_return_sequences=n,
                               pad_token_id=e.pad_id, eos_token_id=sorted(e.eos_ids),
                               suppress_tokens=e.banned.tolist())
        gen = out[:, L:].tolist()
        return sum(len(list(itertools.takewhile(lambda t: t not in e.eos_ids, g))) for g in gen)


def _rl_iteration(ctx: Context, model: Any, engine: Any, records: list[dict[str, Any]], cfg: Any,
                  calls: itertools.count) -> dict[str, float]:
    """One ``rl_train`` iteration (fresh checkpoint directory); its history row plus others' CPU share."""
    from step3vl.eval.suite import to_prompt
    from step3vl.rl.loop import rl_train
    from step3vl.stages.rl import verifiable_reward

    raw = ctx.data.raw("rl")
    t0 = CpuSnapshot.take()
    res = rl_train(model, engine, ctx.tokenizer, ctx.processor, cfg, records, lambda r: to_prompt(r, raw),
                   verifiable_reward(), ckpt_root=str(ctx.workdir / "rl-bench" / str(next(calls))), seed=0,
                   save_extra=lambda: {"config": {}}, progress=False, stop_after_iteration=1)
    row = dict(res.history[0])
    row["others"] = CpuSnapshot.take().others_share_since(t0)
    return row


@benchmark("rl", "RL iteration: rollout / reward / update, and rollout tokens/s vs transformers generate")
def rl(ctx: Context) -> Result:
    from step3vl.model.loading import new_model
    from step3vl.rl.rollout import SamplingParams, TorchEngine

    pcfg = ctx.pipeline
    model = new_model(pcfg.model, ctx.tokenizer, 0)
    engine = TorchEngine(model, ctx.tokenizer, ctx.processor)
    r = Result()

    # ---- one RL iteration, split
    records, _ = ctx.prompts(40)
    # checkpoint only after the timed iteration (outside its split): rl_train saves at the last one
    cfg = dataclasses.replace(pcfg.rlvr, iterations=1, prompts_per_iteration=PROMPTS, rollouts=ROLLOUTS,
                              max_response_tokens=MAX_TOKENS, checkpoint_every=10**9)
    calls = itertools.count()
    its = interleave({"rl": lambda: _rl_iteration(ctx, model, engine, records, cfg, calls)},
                     rounds=ctx.rounds(ROUNDS, 1), warmup=1, accept=lambda x: x["rl"]["others"] < QUIET_SHARE,
                     extra_s=ctx.rounds(EXTRA_S, 0))
    rows = its.used["rl"]
    for part in ("rollout", "reward", "update"):
        r.figure(f"{part}_s", f"RL iteration: {part}", "s", [x[f"{part}_s"] for x in rows])
    for part in ("rollout", "reward", "update"):
        r.figure(f"{part}_share", f"RL iteration: {part} share of the iteration", "fraction",
                 [x[f"{part}_s"] / (x["rollout_s"] + x["reward_s"] + x["update_s"]) for x in rows])
    r.figure("rl_others_cpu", "RL iterations: CPU share other processes took", "fraction", [x["others"] for x in rows])

    # ---- rollout: TorchEngine vs transformers generate, text-only prompts
    _, prompts = ctx.prompts(PROMPTS, families={"text_math"})
    hf = HFGenerate(model, engine)
    model.eval()
    seeds = itertools.count(1)

    def ours() -> Timed:
        sp = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, seed=next(seeds))
        t = timed(lambda: engine.generate(prompts, ROLLOUTS, sp))
        return dataclasses.replace(t, value=sum(len(c.token_ids) for g in t.value for c in g))

    def theirs() -> Timed:
        t = timed(lambda: hf.generate(prompts, ROLLOUTS, MAX_TOKENS, next(seeds)))
        return t

    gen = interleave({"engine": ours, "hf": theirs}, rounds=ctx.rounds(ROUNDS + 1, 1), warmup=1, accept=quiet,
                     extra_s=ctx.rounds(EXTRA_S, 0))
    tps = {arm: [t.value / t.seconds for t in ts] for arm, ts in gen.used.items()}
    r.figure("engine_tokens_per_s", "rollout: TorchEngine generated tokens/s", "tok/s", tps["engine"])
    r.figure("hf_tokens_per_s", "rollout: transformers generate tokens/s", "tok/s", tps["hf"])
    r.figure("rollout_others_cpu", "rollout rounds: CPU share other processes took", "fraction",
             [t.others for ts in gen.used.values() for t in ts])
    r.ratio("engine_over_hf", "TorchEngine / transformers generate tokens/s", tps["engine"], tps["hf"],
            rejected=gen.rejected, contended=not gen.clean)
    r.params = {"model": pcfg.model.name, "algorithm": cfg.algorithm, "prompts_per_iteration": PROMPTS,
                "rollouts_per_prompt": ROLLOUTS, "max_response_tokens": MAX_TOKENS, "epochs": cfg.epochs,
                "minibatch_size": cfg.minibatch_size, "reward": "each record's verifier"}
    r.method = (
        f"**RL iteration**: `step3vl.rl.loop.rl_train` with the micro RLVR settings ({cfg.algorithm}, "
        f"{cfg.epochs} update epochs) at {PROMPTS} prompts × {ROLLOUTS} rollouts of up to {MAX_TOKENS} tokens, "
        f"on the {pcfg.model.name} model (random init) and the micro RL set (text and image prompts), `TorchEngine` "
        "rollouts; one iteration per call, split by the loop's own clocks (rollout = `engine.generate`, "
        "reward = the records' verifiers, update = old log-probs + advantages + PPO minibatch steps). "
        "One warm-up iteration discarded. **Rollout throughput**: "
        f"{PROMPTS} text-only `text_math` prompts × {ROLLOUTS} samples, up to {MAX_TOKENS} new tokens, "
        "temperature 1, through `TorchEngine.generate` (each prompt prefilled once, its KV cache shared by its "
        "samples) and through `transformers` `Qwen3ForCausalLM.generate` on the same decoder modules "
        "(left-padded batch, `num_return_sequences`, `do_sample`, the engine's banned tokens suppressed, the same "
        "stop tokens); tokens/s = generated tokens (up to each sample's stop) ÷ call wall time. Arms alternate, "
        f"one warm-up round discarded; rounds in which other processes took ≥ {QUIET_SHARE:.0%} of the CPU are "
        f"re-run (for up to {EXTRA_S:.0f} s)."
    )
    return r
