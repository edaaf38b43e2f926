"""Run a few pre-training steps of the micro pipeline and print the per-step losses as JSON (rank 0).

Launched by tests/test_deepspeed.py on the same global batch under torchrun with 2 or 3 processes (DeepSpeed ZeRO-2
or ZeRO-3 on gloo); the single-process runs it compares with call :func:`run` in the test's own process. Args:
data_dir out_dir [zero_stage]; $DS_OVERRIDES (a JSON list) adds config overrides, $DS_STOP_AFTER stops after that
step; $DS_GATHER_PROBE has every rank print how many tensors it kept of each gather.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run(data_dir: str, out_dir: str, zero_stage: str = "2", overrides: list[str] | None = None,
        stop: int | None = None) -> str:
    """Pre-train on the micro config; what rank 0 reports (``KEY=value`` lines), empty on other ranks."""
    from step3vl import config
    from step3vl.stages.train import run_training

    cfg = config.load(config.PipelineConfig, ROOT / "conf/micro.yaml", [
        "pretrain.batch_size=8", "pretrain.micro_batch_size=2", f"pretrain.zero_stage={zero_stage}",
        "pretrain.eval_data=", "pretrain.checkpoint_every=1000", "pretrain.warmup_steps=0",
        "pretrain.phases=[{data: pretrain_broad, steps: 4, lr_start: 1.0e-3, lr_end: 1.0e-3}]", *(overrides or []),
    ])
    res = run_training("pretrain", cfg, data_dir, out_dir, progress=False, stop_after_step=stop)
    if os.environ.get("RANK", "0") != "0":
        return ""
    return "\n".join([
        "BACKEND=" + res.result.backend,
        "LOSSES=" + json.dumps([h["loss"] for h in res.result.history]),
        "MODEL=" + res.model_uri,
        f"STEP={res.result.step} RESUMED_FROM={res.result.resumed_from}",
        "EVAL=" + json.dumps([e["eval_loss"] for e in res.result.eval_history]),
    ]) + "\n"


def _probe_gathers() -> None:
    """Every rank prints how much of each gather it kept."""
    from step3vl.train import loop, zero

    rank = os.environ.get("RANK", "0")
    full_state_dict, gather_optimizer_state = loop.full_state_dict, zero.gather_optimizer_state

    def probe_model(model, keep=True):
        out = full_state_dict(model, keep=keep)
        print(f"GATHERED rank={rank} model={len(out)}", flush=True)
        return out

    def probe_optimizer(engine, groups, keep=True):
        out = gather_optimizer_state(engine, groups, keep=keep)
        print(f"GATHERED rank={rank} optimizer={len(out['state'])}", flush=True)
        return out

    loop.full_state_dict, zero.gather_optimizer_state = probe_model, probe_optimizer


if __name__ == "__main__":
    from step3vl.pipeline import trainjob

    if os.environ.get("DS_GATHER_PROBE"):
        _probe_gathers()
    report = run(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "2",
                 json.loads(os.environ.get("DS_OVERRIDES", "[]")),
                 int(os.environ["DS_STOP_AFTER"]) if os.environ.get("DS_STOP_AFTER") else None)
    print(f"WORKER rank={os.environ.get('RANK', '0')} stage done", file=sys.stderr, flush=True)
    print(report, end="")
    trainjob.leave_rank()  # as `step3vl stage exec` does after the stage
