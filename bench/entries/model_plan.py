"""The 10B plan on paper: FLOPs/token, per-GPU memory under ZeRO-3, projected training days.

Nothing here is measured: the numbers are ``step3vl model info`` (``step3vl.model.info.model_info``)
on ``conf/model/step3vl-10b.yaml`` at the sequence lengths of ``conf/pipeline/step3vl-10b.yaml``,
and the token budgets are that pipeline's phase budgets. The arithmetic lives in pure functions
(``train_days``, ``plan``) with hand-computed unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.context import ROOT
from bench.registry import Result, benchmark

GPUS = (8, 16, 64)
# H200 SXM dense bf16 tensor-core peak (NVIDIA's datasheet: 1,979 TFLOP/s with 2:4 sparsity, half dense)
PEAK_FLOPS = 989e12
HBM_GIB = 141e9 / 1024**3  # 141 GB per H200
MFU = 0.40  # assumed model FLOPs utilisation of a ZeRO-3 bf16 run at this size (stated, not measured)
SECONDS_PER_DAY = 86_400


def train_days(tokens: float, flops_per_token: float, gpus: int, peak_flops: float, mfu: float) -> float:
    """Wall days to train ``tokens``: tokens × FLOPs/token ÷ (GPUs × peak × MFU) ÷ 86,400."""
    if gpus < 1 or peak_flops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"need gpus >= 1, peak > 0 and 0 < mfu <= 1 (got {gpus}, {peak_flops}, {mfu})")
    return tokens * flops_per_token / (gpus * peak_flops * mfu) / SECONDS_PER_DAY


@dataclass(frozen=True)
class Phase:
    """One stage of the recipe as the plan sees it: its token budget and packed sequence length."""

    name: str
    tokens: float
    seq_len: int
    micro_batch: int


def plan(model_cfg: Any, phases: Sequence[Phase], *, gpus: Sequence[int] = GPUS, peak_flops: float = PEAK_FLOPS,
         mfu: float = MFU, info: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """One row per (phase, GPU count): FLOPs/token, memory per GPU, projected days.

    ``info`` is ``model_info`` (``cfg, gpus=, seq_len=, micro_batch=`` → an object with
    ``flops_per_token``, ``total_params`` and ``memory``); tests pass a stand-in.
    """
    if info is None:
        from step3vl.model.info import model_info as info
    rows = []
    for ph in phases:
        for g in gpus:
            mi = info(model_cfg, gpus=g, seq_len=ph.seq_len, micro_batch=ph.micro_batch)
            rows.append({
                "phase": ph.name, "tokens": ph.tokens, "seq_len": ph.seq_len, "gpus": g,
                "params": mi.total_params, "flops_per_token": mi.flops_per_token,
                "states_gib": mi.memory["model_states_gib_per_gpu"],
                "activations_gib": mi.memory["activations_gib_per_gpu"],
                "gathered_gib": mi.memory["gathered_params_gib_per_gpu"],
                "total_gib": mi.memory["total_gib_per_gpu"],
                "days": train_days(ph.tokens, mi.flops_per_token, g, peak_flops, mfu),
            })
    return rows


def recipe_phases(pipeline_cfg: Any) -> list[Phase]:
    """Pre-training and SFT of a pipeline config: budgets summed over their LR phases."""
    out = []
    for name in ("pretrain", "sft"):
        t = getattr(pipeline_cfg, name)
        tokens = sum(p.tokens or p.steps * t.batch_size * t.seq_len for p in t.phases)
        out.append(Phase(name, float(tokens), t.seq_len, t.micro_batch_size or 1))
    return out


@benchmark("model_plan", "The 10B plan on paper: FLOPs/token, ZeRO-3 memory, projected days")
def model_plan(ctx: Any) -> Result:
    from step3vl import config
    from step3vl.config import PipelineConfig

    cfg = config.load(PipelineConfig, ROOT / "conf" / "pipeline" / "step3vl-10b.yaml")
    phases = recipe_phases(cfg)
    rows = plan(cfg.model, phases)
    r = Result()
    first = rows[0]
    r.params = {
        "model": cfg.model.name, "params_total": first["params"], "peak_flops_per_gpu": PEAK_FLOPS, "mfu": MFU,
        "hbm_gib_per_gpu": round(HBM_GIB, 1),
        **{f"{p.name}.tokens": p.tokens for p in phases}, **{f"{p.name}.seq_len": p.seq_len for p in phases},
    }
    r.method = (
        "Not measured: `step3vl model info --config conf/model/step3vl-10b.yaml --gpus G --seq-len S --json` "
        "(`step3vl.model.info.model_info`) at each stage's packed length from `conf/pipeline/step3vl-10b.yaml` "
        f"(pre-training {phases[0].seq_len}, SFT {phases[1].seq_len}; micro-batch 1), token budgets summed over "
        "that config's LR phases.\n\n"
        "- FLOPs/token = **6·N_dec + 12·L·d_attn·seq** (N_dec: decoder weights used in a matmul, LM head "
        "included, embedding lookup not; attention over the whole packed row, no causal discount). Vision "
        "encoder FLOPs are not included (they add `vision_flops_per_image` per image).\n"
        "- Memory per GPU = **16·P/G** (ZeRO-3 model states: bf16 weights + grads, fp32 master, Adam m, v) "
        "+ activations with full checkpointing **L·b·s·h·2 + 34·b·s·h + 4·b·s·V** + 2 layers of gathered "
        "bf16 parameters.\n"
        f"- Days = **tokens × FLOPs/token ÷ (G × {PEAK_FLOPS / 1e12:.0f} TFLOP/s × MFU) ÷ 86,400**, with the "
        f"H200's dense bf16 peak and an assumed MFU of {MFU:.0%}; data loading, evaluation, checkpointing "
        "and restarts are not counted."
    )
    r.table(
        f"Per-GPU memory (GiB) and projected days at {MFU:.0%} MFU on H200s ({HBM_GIB:.0f} GiB each)",
        ["stage", "tokens", "seq", "GPUs", "FLOPs/token", "model states", "activations", "gathered params",
         "total / GPU", "fits", "days"],
        [[x["phase"], f"{x['tokens'] / 1e9:,.0f} B", x["seq_len"], x["gpus"], f"{x['flops_per_token']:.3e}",
          round(x["states_gib"], 1), round(x["activations_gib"], 1), round(x["gathered_gib"], 2),
          round(x["total_gib"], 1), "yes" if x["total_gib"] <= HBM_GIB else "**no**", round(x["days"], 1)]
         for x in rows],
    )
    total = {g: sum(x["days"] for x in rows if x["gpus"] == g) for g in GPUS}
    r.notes.append("Pre-training + SFT: " + ", ".join(f"{total[g]:,.1f} days on {g} GPUs" for g in GPUS)
                   + ". Days scale as 1/G and 1/MFU: at 30% MFU multiply by 4/3, at 50% by 0.8.")
    return r
