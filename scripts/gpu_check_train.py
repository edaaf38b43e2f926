#!/usr/bin/env python
"""GPU check: training and RL run on the GPU, as they do on the CPU (not run by the tests).

    python scripts/gpu_check_train.py [--report report.json] [--keep DIR]

Needs one CUDA device. Prepares the micro pipeline's data (``tests/conf/micro.yaml``), then runs its
pre-training (4 steps, ``step3vl.stages.train.run_training``), then one RLVR iteration from its model
(``step3vl.stages.rl.run_rl``: PPO with a value head, KL and entropy terms), in fresh processes:

1. on the CPU (``CUDA_VISIBLE_DEVICES=""``), fp32: the reference;
2. on the GPU, fp32: must report a CUDA device, allocate GPU memory, and follow the reference's losses
   within 2% (cuDNN convolutions may use TF32);
3. on the GPU, bf16 autocast: losses within 5% of the reference;
4. on the GPU, fp32, stopped after step 2 and rerun: resumes at step 2 and ends with run 2's losses
   within 0.1% (CUDA kernels are not all deterministic, so not bit for bit);
5. RLVR on the CPU and on the GPU: the GPU run must report a CUDA device, and its rewards and losses follow
   the CPU's within 5%; the greedy answers of the two RL models to 2 eval prompts per family agree on >= 90%.

One GPU cannot run the distributed path (NCCL wants a GPU per rank): that needs a machine with two.
Exit codes: 0 pass, 1 a check failed, 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

WORKER = r"""
import json, os, sys
import torch
from step3vl import config
from step3vl.stages.train import run_training
data, out, precision = sys.argv[1], sys.argv[2], sys.argv[3]
stop = int(sys.argv[4]) if sys.argv[4] else None
cfg = config.load(config.PipelineConfig, os.path.join(sys.argv[5], "tests/conf/micro.yaml"), [
    "pretrain.batch_size=8", "pretrain.micro_batch_size=4", "pretrain.eval_data=", "pretrain.checkpoint_every=2",
    "pretrain.warmup_steps=0", f"pretrain.precision={precision}",
    "pretrain.phases=[{data: pretrain_broad, steps: 4, lr_start: 1.0e-3, lr_end: 1.0e-3}]",
])
res = run_training("pretrain", cfg, data, out, progress=False, stop_after_step=stop)
mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("RESULT " + json.dumps({"device": res.result.device, "losses": [h["loss"] for h in res.result.history],
                             "step": res.result.step, "resumed_from": res.result.resumed_from,
                             "gpu_bytes": mem, "seconds": res.result.seconds}))
"""


RL_WORKER = r"""
import json, os, sys
import torch
from step3vl import config
from step3vl.model.loading import load_model
from step3vl.rl.rollout import SamplingParams, TorchEngine
from step3vl.eval.suite import load_records, to_prompt
from step3vl.stages.rl import run_rl
data, out, init, root = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
cfg = config.load(config.PipelineConfig, os.path.join(root, "tests/conf/micro.yaml"), [
    "rlvr.iterations=1", "rlvr.algorithm=gae", "rlvr.kl_coef=0.05", "rlvr.entropy_coef=0.01", "rlvr.epochs=1"])
res = run_rl("rlvr", cfg, data, init, out, progress=False,
             reward_fn=lambda recs, comps: ([float(sum(c.token_ids) % 3) for c in comps], {}))
lm = load_model(res.model_uri, device="cuda" if torch.cuda.is_available() else "cpu")
ev = os.path.join(data, "raw", "eval")
prompts = [to_prompt(r, ev) for r in load_records(ev, per_family=2)]
greedy = TorchEngine(lm.model, lm.tokenizer, lm.processor).generate(prompts, 1, SamplingParams(temperature=0.0,
                                                                                             max_tokens=8))
mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print("RESULT " + json.dumps({"device": res.result.device, "history": res.result.history, "gpu_bytes": mem,
                             "greedy": [g[0].token_ids for g in greedy]}))
"""


def run(data: Path, out: Path, precision: str, stop: int | None = None, cpu: bool = False,
        worker: str = WORKER, args: tuple[str, ...] | None = None) -> dict:
    """One pre-training (or ``worker``) run in a fresh process; its result, or ``{"error": ...}``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    args = [sys.executable, "-c", worker, *(args or (str(data), str(out), precision, str(stop or ""), str(ROOT)))]
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        return {"error": (p.stderr or p.stdout)[-3000:]}
    return json.loads(line[len("RESULT "):])


def close(a: list[float], b: list[float], rel: float) -> bool:
    return len(a) == len(b) > 0 and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--report", type=Path)
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary directory)")
    a = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    work = a.keep or Path(tempfile.mkdtemp(prefix="step3vl-gpu-train-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from step3vl import config
        from step3vl.stages import data

        cfg = config.load(config.PipelineConfig, ROOT / "tests" / "conf" / "micro.yaml")
        data_dir = data.run(cfg, work / "data", progress=False).out_dir
        runs = {
            "cpu_fp32": run(data_dir, work / "cpu", "fp32", cpu=True),
            "gpu_fp32": run(data_dir, work / "gpu", "fp32"),
            "gpu_bf16": run(data_dir, work / "bf16", "bf16"),
            "gpu_stopped": run(data_dir, work / "resume", "fp32", stop=2),
        }
        runs["gpu_resumed"] = run(data_dir, work / "resume", "fp32")
        init = str(work / "gpu" / "model")  # the pre-trained model starts RLVR
        for name, on_cpu in (("rl_cpu", True), ("rl_gpu", False)):
            runs[name] = run(data_dir, work / name, "fp32", cpu=on_cpu, worker=RL_WORKER,
                             args=(str(data_dir), str(work / name), init, str(ROOT)))
        ref, gpu = runs["cpu_fp32"].get("losses", []), runs["gpu_fp32"]
        rl_cpu, rl_gpu = runs["rl_cpu"].get("history", [{}])[0], runs["rl_gpu"].get("history", [{}])[0]
        same_greedy = [a == b for a, b in zip(runs["rl_cpu"].get("greedy", []), runs["rl_gpu"].get("greedy", []))]
        checks = {
            "every run finished": all("error" not in r for r in runs.values()),
            "reference trained on the CPU": runs["cpu_fp32"].get("device") == "cpu",
            "fp32 run trained on the GPU":
                str(gpu.get("device", "")).startswith("cuda") and gpu.get("gpu_bytes", 0) > 0,
            "fp32 GPU losses within 2% of the CPU's": close(gpu.get("losses", []), ref, 0.02),
            "bf16 GPU losses within 5% of the CPU's": close(runs["gpu_bf16"].get("losses", []), ref, 0.05),
            "stopped run resumed at step 2": runs["gpu_resumed"].get("resumed_from") == 2
            and runs["gpu_resumed"].get("step") == 4,
            "resumed losses within 0.1% of the uninterrupted GPU run's":
                close(runs["gpu_resumed"].get("losses", []), gpu.get("losses", []), 0.001),
            "RLVR iteration (rollouts, update, checkpoint) ran on the GPU":
                str(runs["rl_gpu"].get("device", "")).startswith("cuda") and runs["rl_gpu"].get("gpu_bytes", 0) > 0,
            "RLVR rewards and losses within 5% of the CPU's": all(
                k in rl_gpu and close([rl_gpu[k]], [rl_cpu.get(k, float("nan"))], 0.05)
                for k in ("reward_mean", "policy_loss", "value_loss", "kl", "entropy")),
            "greedy answers of the RL model on the GPU equal the CPU's for >= 90% of prompts":
                len(same_greedy) > 0 and sum(same_greedy) >= 0.9 * len(same_greedy),
        }
        report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": runs, "checks": checks,
                  "passed": all(checks.values())}
        text = json.dumps(report, indent=2)
        print(text)
        if a.report:
            a.report.write_text(text + "\n")
        return 0 if report["passed"] else 1
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
