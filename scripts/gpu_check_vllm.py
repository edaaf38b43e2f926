#!/usr/bin/env python
"""GPU check: vLLM's built-in step_vl loads an exported checkpoint and decodes like the torch backend.

    python scripts/gpu_check_vllm.py [--report report.json] [--keep DIR]

Needs a CUDA machine with the ``vllm`` extra (its own environment: vLLM wants another torch).
Builds a random tiny checkpoint whose image geometry is the one vLLM's step3_vl processor
hard-codes (728 px global view, 504 px crops, patch 14), exports it with ``step3vl.serve.export``,
loads it with ``vllm.LLM(..., trust_remote_code=True)`` (no plugins) and compares greedy outputs
with ``TorchEngine`` on the same prompts: three text prompts and one 728x728 image (no crops on
either side). Prompt token ids must match exactly (so the chat template and the image placeholder
expansion agree); generated tokens must match, except that a divergence at a near-tie of the torch
logits (top-2 gap < 1e-3, float rounding between kernels) is reported, not failed.

Exit codes: 0 pass, 1 mismatch, 2 vLLM or CUDA unavailable. Not run by the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

TEXT_PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count from one to five."]
IMAGE_QUESTION = "What colour is the shape?"
MAX_TOKENS = 16
NEAR_TIE = 1e-3


def tiny_vllm_geometry_config():
    from step3vl import config

    tiny = config.load(config.ModelConfig, ROOT / "conf" / "model" / "tiny.yaml")
    vision = dataclasses.replace(tiny.vision, image_size=728, crop_size=504, patch_size=14, max_crops=0,
                                 width=32, layers=1, heads=2)
    return dataclasses.replace(tiny, name="step3vl-tiny-vllm-geometry", vision=vision)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, default=None, help="write the comparison as JSON here")
    ap.add_argument("--keep", type=Path, default=None, help="build the checkpoints here instead of a temp dir")
    args = ap.parse_args()
    try:
        import torch
        import vllm
    except ImportError as e:
        print(f"SKIP: vLLM is not installed here ({e}); install the step3vl[vllm] extra in its own environment")
        return 2
    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 2

    import numpy as np
    from PIL import Image

    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import Prompt, SamplingParams, TorchEngine, encode_prompt
    from step3vl.serve.export import export_hf
    from step3vl.serve.tiny import random_checkpoint

    work = args.keep or Path(tempfile.mkdtemp(prefix="step3vl-gpu-check-"))
    ckpt = random_checkpoint(work / "ckpt", tiny_vllm_geometry_config(), seed=0)
    res = export_hf(ckpt, work / "hf", overwrite=True)
    assert res.vllm_images, "the check model must have vLLM's image geometry"

    ref = load_model(ckpt)
    engine = TorchEngine(ref.model, ref.tokenizer, ref.processor)
    yy, xx = np.mgrid[0:728, 0:728]
    image = Image.fromarray(np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8))
    prompts = [Prompt([{"role": "user", "content": t}]) for t in TEXT_PROMPTS]
    prompts.append(Prompt([{"role": "user", "content": f"<image>\n{IMAGE_QUESTION}"}], [image]))
    torch_out = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))

    llm = vllm.LLM(model=str(res.out_dir), trust_remote_code=True, dtype="float32", max_model_len=1024,
                   enforce_eager=True, gpu_memory_utilization=0.3, limit_mm_per_prompt={"image": 1}, seed=0)
    tok = ref.tokenizer
    eos = sorted(engine.eos_ids)
    allowed = [i for i in range(ref.cfg.text.vocab_size) if i not in set(engine.banned.tolist())]
    sp = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=eos, allowed_token_ids=allowed,
                             skip_special_tokens=True)
    requests = []
    for p in prompts:
        if p.images:
            text = tok.apply_chat_template([{"role": "user", "content": f"<im_patch>\n{IMAGE_QUESTION}"}],
                                           tokenize=False, add_generation_prompt=True)
            requests.append({"prompt": text, "multi_modal_data": {"image": p.images[0]}})
        else:
            requests.append({"prompt_token_ids": encode_prompt(p, tok, ref.processor)[0]})
    vllm_out = llm.generate(requests, sp)

    report, ok = [], True
    for p, mine, theirs in zip(prompts, torch_out, vllm_out):
        ids, _ = encode_prompt(p, tok, ref.processor)
        a = mine[0].token_ids
        b = [t for t in theirs.outputs[0].token_ids if t not in eos]
        entry = {"prompt": p.messages[-1]["content"][:40], "images": len(p.images),
                 "prompt_ids_match": list(theirs.prompt_token_ids) == ids, "torch": a, "vllm": b}
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            with torch.no_grad():
                from step3vl.rl.rollout import merge_images

                images = merge_images([encode_prompt(p, tok, ref.processor)[1]], ref.processor.vision)
                logits = ref.model(torch.tensor([ids + a[:k]]), images).logits[0, -1].float()
            logits[engine.banned] = float("-inf")
            top2 = torch.topk(logits, 2).values
            entry.update(diverges_at=k, torch_top2_gap=float(top2[0] - top2[1]))
            entry["near_tie"] = entry["torch_top2_gap"] < NEAR_TIE
        entry["pass"] = entry["prompt_ids_match"] and (a == b or entry.get("near_tie", False))
        ok &= entry["pass"]
        report.append(entry)
        print(json.dumps(entry))
    summary = {"pass": ok, "vllm_version": vllm.__version__, "export": str(res.out_dir), "results": report}
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2) + "\n")
    print("PASS" if ok else "FAIL", f"(vLLM {vllm.__version__})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
