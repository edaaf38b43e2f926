#!/usr/bin/env python
"""GPU benchmarks, for when a CUDA machine is lent (not run by ``make bench``; a few minutes).

    python bench/gpu.py [--out bench/gpu-results.json] [--vllm-python /path/to/vllm-env/bin/python]

1. **Training MFU**: a ~1B-parameter STEP3-VL decoder (``CONFIG_1B``), bf16 autocast, AdamW, packed
   text rows of ``SEQ_LEN`` tokens: FLOPs/token from ``step3vl.model.info.model_info`` (6·N + 12·L·d·s)
   × tokens/s ÷ the GPU's bf16 dense peak (``--peak-tflops``, default the H200's 989), and ÷ a
   bf16 GEMM measured on the same GPU in the same run. The step is the training loop's computation
   (``Step3VL.forward(labels=…)``, backward, clip, AdamW) written out, so that it times steps alone;
   ``scripts/gpu_check_train.py`` checks the loop itself (``step3vl.train.loop.train``) on the GPU.
2. **Rollout throughput**, the same decoder and prompts: ``TorchEngine`` (the project's torch backend),
   ``transformers`` ``generate`` on the same modules, and vLLM (``StepVLForConditionalGeneration``
   on the ``step3vl export`` of the same weights) in its own environment (``--vllm-python``: vLLM
   wants another torch). An arm that cannot run says why in the report; none is replaced by another.

Exit codes: 0 done (an arm may report an error), 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

SEQ_LEN = 2048
MICRO_BATCH = 8
TRAIN_STEPS = 12
WARMUP = 3
PROMPTS = 64
ROLLOUTS = 8
MAX_TOKENS = 256
H200_BF16_TFLOPS = 989.0

VLLM_SCRIPT = r"""
import json, sys, time
import vllm
a = json.loads(sys.argv[1])
llm = vllm.LLM(model=a["model"], trust_remote_code=True, dtype="bfloat16", max_model_len=a["max_len"],
               gpu_memory_utilization=0.5, seed=0)
sp = vllm.SamplingParams(n=a["n"], temperature=1.0, top_p=1.0, max_tokens=a["max_tokens"], ignore_eos=False,
                         stop_token_ids=a["eos"], allowed_token_ids=a["allowed"], seed=0)
reqs = [{"prompt_token_ids": ids} for ids in a["prompts"]]
llm.generate(reqs[:2], sp)  # warm-up: CUDA graphs, allocator
out = []
for _ in range(a["rounds"]):
    t0 = time.perf_counter()
    res = llm.generate(reqs, sp)
    dt = time.perf_counter() - t0
    out.append({"seconds": dt, "tokens": sum(len(o.token_ids) for r in res for o in r.outputs)})
print("RESULT " + json.dumps({"vllm": vllm.__version__, "rounds": out}))
"""


def config_1b() -> Any:
    """~1B parameters: a Qwen3-style decoder of 18 layers × 2048, GQA 16/8, and a small vision tower with
    vLLM's step3_vl image geometry (so the export loads in vLLM)."""
    from step3vl import config

    small = config.load(config.ModelConfig, ROOT / "conf" / "model" / "small.yaml")
    text = dataclasses.replace(small.text, hidden_size=2048, intermediate_size=6144, num_hidden_layers=18,
                               num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                               max_position_embeddings=4096, vocab_size=32768)
    vision = dataclasses.replace(small.vision, image_size=728, crop_size=504, patch_size=14, max_crops=0,
                                 width=64, layers=1, heads=2)
    return dataclasses.replace(small, name="step3vl-1b-bench", text=text, vision=vision)


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def gemm_tflops(torch: Any, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def train_mfu(torch: Any, cfg: Any, tok: Any, peak_tflops: float) -> dict[str, Any]:
    from step3vl.model.info import model_info
    from step3vl.model.loading import new_model

    info = model_info(cfg, gpus=1, seq_len=SEQ_LEN, micro_batch=MICRO_BATCH)
    model = new_model(cfg, tok, 0).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for step in range(WARMUP + TRAIN_STEPS):
        ids = torch.randint(0, 4000, (MICRO_BATCH, SEQ_LEN), device="cuda", generator=g)  # text tokens only
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= WARMUP:
            times.append(time.perf_counter() - t0)
    tps = MICRO_BATCH * SEQ_LEN / median(times)
    achieved = info.flops_per_token * tps / 1e12
    measured_peak = gemm_tflops(torch)
    peak_mem = torch.cuda.max_memory_allocated() / 1024**3
    del model, opt
    torch.cuda.empty_cache()
    return {"params": info.total_params, "flops_per_token": info.flops_per_token, "seq_len": SEQ_LEN,
            "micro_batch": MICRO_BATCH, "steps": TRAIN_STEPS, "step_s_median": median(times), "tokens_per_s": tps,
            "achieved_tflops": achieved, "peak_tflops_datasheet": peak_tflops, "mfu_datasheet": achieved / peak_tflops,
            "gemm_tflops_measured": measured_peak, "fraction_of_measured_gemm": achieved / measured_peak,
            "peak_memory_gib": peak_mem}


def _arm(fn: Any, rounds: int = 3) -> dict[str, Any]:
    """tokens/s of ``fn() -> generated tokens``: one warm-up call, then the median of ``rounds``."""
    try:
        import torch

        fn()
        tps = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            n = fn()
            torch.cuda.synchronize()
            tps.append(n / (time.perf_counter() - t0))
        return {"tokens_per_s": median(tps), "rounds": tps}
    except Exception as e:  # reported, never replaced by another arm
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def rollouts(torch: Any, cfg: Any, work: Path, vllm_python: str | None, *, skip_vllm: bool = False) -> dict[str, Any]:
    from bench.entries.rl import HFGenerate
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import Prompt, SamplingParams, TorchEngine, encode_prompt
    from step3vl.serve.export import export_hf
    from step3vl.serve.tiny import random_checkpoint

    ckpt = random_checkpoint(work / "ckpt", cfg, seed=0)
    lm = load_model(ckpt)
    model = lm.model.to("cuda", torch.bfloat16).eval()
    prompts = [Prompt([{"role": "user", "content": f"Question {i}: what is {i} + {2 * i}? Think step by step."}])
               for i in range(PROMPTS)]
    engine = TorchEngine(model, lm.tokenizer, lm.processor)
    out: dict[str, Any] = {"prompts": PROMPTS, "samples_per_prompt": ROLLOUTS, "max_tokens": MAX_TOKENS,
                           "dtype": "bfloat16"}
    seed = iter(range(1, 10**6))

    def torch_engine() -> int:  # the engine puts its batches on the model's device
        res = engine.generate(prompts, ROLLOUTS, SamplingParams(max_tokens=MAX_TOKENS, seed=next(seed)))
        return sum(len(c.token_ids) for g in res for c in g)

    hf = HFGenerate(model, engine)

    def hf_generate() -> int:
        with torch.device("cuda"):
            return hf.generate(prompts, ROLLOUTS, MAX_TOKENS, next(seed))

    out["torch_engine"] = _arm(torch_engine)
    out["transformers_generate"] = _arm(hf_generate)
    vllm_args = {"max_len": 2048, "n": ROLLOUTS, "max_tokens": MAX_TOKENS, "rounds": 3, "eos": sorted(engine.eos_ids),
                 "prompts": [encode_prompt(p, lm.tokenizer, lm.processor)[0] for p in prompts],
                 "allowed": [i for i in range(cfg.text.vocab_size) if i not in set(engine.banned.tolist())]}
    del model, lm, engine, hf
    torch.cuda.empty_cache()

    py = vllm_python or os.environ.get("VLLM_PYTHON") or sys.executable
    if skip_vllm:
        out["vllm"] = {"skipped": "--skip-vllm"}
        return out
    try:
        export = export_hf(ckpt, work / "hf", dtype="bfloat16", overwrite=True)
        vllm_args["model"] = str(export.out_dir)
        p = subprocess.run([py, "-c", VLLM_SCRIPT, json.dumps(vllm_args)], capture_output=True, text=True,
                           timeout=420)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            out["vllm"] = {"error": f"{py} exited {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"}
        else:
            res = json.loads(line[len("RESULT "):])
            tps = [r["tokens"] / r["seconds"] for r in res["rounds"]]
            out["vllm"] = {"tokens_per_s": median(tps), "rounds": tps, "version": res["vllm"], "python": py}
    except Exception as e:
        out["vllm"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    base = out["torch_engine"].get("tokens_per_s")
    if base and "tokens_per_s" in out["vllm"]:
        out["vllm_over_torch_engine"] = out["vllm"]["tokens_per_s"] / base
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu-results.json")
    ap.add_argument("--vllm-python", default=None, help="python of an environment with vLLM (default: $VLLM_PYTHON, "
                                                         "else this one)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="the GPU's dense bf16 peak")
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench/gpu.py: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device and found none: run it on a GPU machine "
              "(the CPU benchmarks are `make bench`)", file=sys.stderr)
        return 2
    from step3vl.model.tokenizer import build_tokenizer

    t_all = time.perf_counter()
    cfg = config_1b()
    tok = build_tokenizer(cfg.tokenizer)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": cfg.name}
    print(f"== training MFU ({cfg.name}, bf16, seq {SEQ_LEN} x {MICRO_BATCH})", flush=True)
    res["train"] = train_mfu(torch, cfg, tok, args.peak_tflops)
    print(json.dumps(res["train"], indent=1), flush=True)
    print(f"== rollouts ({PROMPTS} prompts x {ROLLOUTS}, {MAX_TOKENS} tokens)", flush=True)
    with tempfile.TemporaryDirectory(prefix="step3vl-gpu-bench-") as tmp:
        res["rollout"] = rollouts(torch, cfg, Path(tmp), args.vllm_python, skip_vllm=args.skip_vllm)
    print(json.dumps(res["rollout"], indent=1), flush=True)
    res["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.out} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
