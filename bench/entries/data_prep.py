"""Data prep throughput: samples/s of the real data prep stage (generate + validate + pack).

A mixture of image and text families like the tiny pipeline's pre-training set, at a size that
takes seconds: the stage runs end to end (eval set first, train set generated around its content
hashes, tokenizer, Great Expectations gate on every set, packing) in a fresh directory each round.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

from bench.context import MICRO, Context
from bench.registry import Result, benchmark

FAMILIES = {"caption": 300, "text": 300, "ocr": 300, "perception_count": 300, "text_math": 500, "mm_math": 300}
EVAL = {"text_math": 50, "mm_math": 50}


@benchmark("data_prep", "Data prep samples/s (generate + validate + pack)")
def run(ctx: Context) -> Result:
    from step3vl import config
    from step3vl.config import DatasetSpec, FamilySpec, PipelineConfig
    from step3vl.stages import data

    base = config.load(PipelineConfig, MICRO)
    sets = {
        "pretrain_broad": DatasetSpec(purpose="pretrain", families={f: FamilySpec(n=n) for f, n in FAMILIES.items()}),
        "eval": DatasetSpec(purpose="eval", split="eval", families={f: FamilySpec(n=n) for f, n in EVAL.items()}),
    }
    cfg = dataclasses.replace(
        base, data=dataclasses.replace(base.data, sets=sets, shard_size=1000),
        pretrain=dataclasses.replace(base.pretrain, phases=base.pretrain.phases[:1]),
        sft=dataclasses.replace(base.sft, phases=(), eval_data=""),
        rlvr=dataclasses.replace(base.rlvr, data=""), rlhf=dataclasses.replace(base.rlhf, data=""),
        pacore=dataclasses.replace(base.pacore, data=""),
    )
    n = sum(FAMILIES.values()) + sum(EVAL.values())
    res = Result(method=(
        f"`step3vl.stages.data.run` on {n} records ({', '.join(f'{f} {k}' for f, k in FAMILIES.items())}; "
        f"eval {sum(EVAL.values())}), 64 px images, in a fresh directory per round: synthetic generation, "
        "tokenizer training, the Great Expectations gate on both sets, packing into 128-token rows "
        "(the eval set is packed twice, as the stage does). samples/s = records / stage wall time."),
        params={"records": n})
    rounds = ctx.rounds(3, 1)
    walls, gen = [], []
    for i in range(rounds + 1):  # the first round warms imports and font caches
        out = ctx.workdir / f"data-prep-{i}"
        t0 = time.perf_counter()
        data.run(cfg, out, progress=False)
        dt = time.perf_counter() - t0
        if i:
            walls.append(n / dt)
            # generation seconds live in timings.json (the manifest is kept free of timings)
            gen_s = sum(v or 0.0 for v in json.loads((out / "timings.json").read_text())["generate"].values())
            if gen_s <= 0:
                raise RuntimeError(f"{out}/timings.json records no generation time")
            gen.append(n / gen_s)
        shutil.rmtree(out, ignore_errors=True)
    res.figure("samples_per_s", "generate + validate + pack", "samples/s", walls)
    res.figure("generate_samples_per_s", "generation alone", "samples/s", gen)
    return res
