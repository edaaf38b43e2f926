"""Serving throughput and latency at 1 and 16 concurrent clients (``step3vl.serve.bench.measure``).

One in-process server (the FastAPI app of ``step3vl serve`` on a free port) over a random tiny
checkpoint; every round drives it at both concurrency levels back to back, so the 16-vs-1 ratio
pairs levels measured under the same load.
"""

from __future__ import annotations

from typing import Any

from bench.context import Context
from bench.machine import QUIET_SHARE, CpuSnapshot
from bench.registry import Result, benchmark
from bench.stats import interleave

LEVELS = (1, 16)
REQUESTS_PER_CLIENT = 4
MAX_TOKENS = 32
ROUNDS = 3
EXTRA_S = 30.0


@benchmark("serving", "Serving tokens/s and p50/p95 latency at 1 and 16 concurrent clients")
def serving(ctx: Context) -> Result:
    from step3vl.serve.app import create_app, load_served, start_in_thread
    from step3vl.serve.bench import measure
    from step3vl.serve.config import ServeConfig
    from step3vl.serve.tiny import random_checkpoint

    mcfg = ctx.pipeline.model
    ckpt = random_checkpoint(ctx.workdir / "serve-ckpt", mcfg, seed=0)
    served = load_served(ckpt)
    server = start_in_thread(create_app(served, ServeConfig(max_tokens=MAX_TOKENS, max_pending=256)))

    def level(c: int) -> Any:
        def run() -> dict[str, Any]:
            t0 = CpuSnapshot.take()
            out = measure(server.base_url, model_name=served.name, concurrency=(c,),
                          requests_per_client=REQUESTS_PER_CLIENT, max_tokens=MAX_TOKENS)["levels"][str(c)]
            out["others"] = CpuSnapshot.take().others_share_since(t0)
            return out
        return run

    try:
        rounds = interleave({str(c): level(c) for c in LEVELS}, rounds=ctx.rounds(ROUNDS, 1), warmup=1,
                            accept=lambda res: all(x["others"] < QUIET_SHARE and not x["errors"] for x in res.values()),
                            extra_s=ctx.rounds(EXTRA_S, 0))
    finally:
        server.stop()
    used = rounds.used
    r = Result()
    for c in LEVELS:
        xs = used[str(c)]
        who = f"{c} client{'s' if c > 1 else ''}"
        r.figure(f"c{c}_tokens_per_s", f"{who}: completion tokens/s", "tok/s", [x["tokens_per_s"] for x in xs])
        r.figure(f"c{c}_p50_s", f"{who}: p50 request latency", "s", [x["p50_latency_s"] for x in xs])
        r.figure(f"c{c}_p95_s", f"{who}: p95 request latency", "s", [x["p95_latency_s"] for x in xs])
        r.figure(f"c{c}_others_cpu", f"{who}: CPU share other processes took", "fraction", [x["others"] for x in xs])
    hi, lo = str(LEVELS[-1]), str(LEVELS[0])
    r.ratio("c16_over_c1_tokens", f"{hi} / {lo} client tokens/s (continuous batching gain)",
            [x["tokens_per_s"] for x in used[hi]], [x["tokens_per_s"] for x in used[lo]],
            rejected=rounds.rejected, contended=not rounds.clean)
    r.ratio("c16_over_c1_p50", f"{hi} / {lo} client p50 latency", [x["p50_latency_s"] for x in used[hi]],
            [x["p50_latency_s"] for x in used[lo]], rejected=rounds.rejected, contended=not rounds.clean)
    errors = sum(x["errors"] for xs in rounds.all.values() for x in xs)
    r.params = {"model": mcfg.name, "requests_per_client": REQUESTS_PER_CLIENT, "max_tokens": MAX_TOKENS,
                "temperature": 1.0, "errors": errors}
    r.method = (
        f"`step3vl.serve.bench.measure` against the `step3vl serve` app (FastAPI + the request batcher, "
        f"in-process on a free port) over a random {mcfg.name} checkpoint (`step3vl.serve.tiny.random_checkpoint`). "
        f"Each client sends {REQUESTS_PER_CLIENT} chat completions back to back on one keep-alive connection "
        f"(one short text prompt, max_tokens {MAX_TOKENS}, temperature 1); tokens/s = completion tokens all "
        f"clients received ÷ the level's wall time; latency = per-request wall time. A round runs both levels "
        f"(ABBA order across rounds); one warm-up round discarded; a round in which other processes took ≥ "
        f"{QUIET_SHARE:.0%} of the CPU (or a request failed) is re-run (for up to {EXTRA_S:.0f} s). The clients "
        "are threads of the same process, so they share its CPU with the server."
    )
    return r
