"""RL stages on the one RL loop: RLVR (verifiable rewards) and RLHF (GenRM + behaviour regularisation).

Layout under the stage's output URI: ``checkpoints/`` (resumable), ``model/`` (final policy),
``rl_curves.png`` (reward and response length per task family per iteration).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3vl import tracking
from step3vl.config import PipelineConfig, RLConfig
from step3vl.rl.rollout import Completion


@dataclass
class RLStageOutputs:
    model_uri: str
    result: Any  # RLResult
    metrics: dict[str, float] = field(default_factory=dict)
    plot: Path | None = None


def verifiable_reward(format_weight: float = 0.0):
    """Each record's own verifier (its ``reward`` field), plus an optional format shaping term."""
    from step3vl.rl.rewards import format_reward, score

    def fn(recs: Sequence[dict[str, Any]], comps: Sequence[Completion]) -> tuple[list[float], dict[str, list[float]]]:
        ver = [score(c.text, r) for r, c in zip(recs, comps)]
        if not format_weight:
            return ver, {"verifier": ver}
        fmt = [format_reward(c.text, "", r) for r, c in zip(recs, comps)]
        return [v + format_weight * f for v, f in zip(ver, fmt)], {"verifier": ver, "format": fmt}

    return fn


def require_single_process(stage: str) -> None:
    """The RL stages (RLVR, RLHF, PaCoRe) are one process: rollouts, rewards and updates are not data-parallel.
    Started as several ranks (``torchrun``), each would run the whole stage and write the same checkpoints."""
    from step3vl.errors import Step3VLError
    from step3vl.train.loop import world_size

    world = world_size()
    if world > 1:
        raise Step3VLError(f"{stage}: started as {world} processes (WORLD_SIZE={world}), but the RL loop runs as one "
                           f"process; launch it once (a TrainJob of one node and one process per node)")


def require_fits(stage: str, model: Any, rl: RLConfig) -> None:
    """The RL stages train on one GPU, the model's: refuse at once, with the numbers, a policy whose training state
    cannot fit there beside what is already on it, rather than run out of memory at the first update, after the
    rollouts. Counts the fp32 gradients and AdamW moments (12 bytes per trainable parameter) and the frozen KL
    reference (4 more) against the GPU's free memory; activations come on top, so passing is necessary, not
    sufficient."""
    import torch

    from step3vl.devices import module_device

    device = module_device(model)
    if device.type != "cuda":
        return
    from step3vl.errors import Step3VLError

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ref = sum(p.numel() for p in model.parameters()) if rl.kl_coef > 0 else 0
    need = 12 * n + 4 * ref
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        gib = 1024**3
        raise Step3VLError(
            f"{stage}: the policy's training state needs at least {need / gib:.1f} GiB more on {device} ({n:,} "
            f"trainable parameters x 12 B for fp32 gradients and AdamW moments"
            + (f", + {ref:,} x 4 B for the frozen KL reference" if ref else "")
            + f"), which has {free / gib:.1f} GiB free of {total / gib:.1f} GiB; the RL stages run as one process on "
            "one GPU, so this model needs a GPU with more memory, or kl_coef 0")


def data_sets(cfg: PipelineConfig, stage: str) -> list[str]:
    """The sets of the data directory ``run_rl`` reads (``raw/<name>``) as ``stage``: its prompt set. From an
    ``s3://`` data directory the node copies these, not the whole directory (:func:`step3vl.stages.data.local_copy`)."""
    return [getattr(cfg, stage).data]


def run_rl(
    stage: str,
    cfg: PipelineConfig,
    data_dir: str | Path,
    init_uri: str,
    out_uri: str,
    *,
    reward_fn: Any = None,
    rl_cfg: RLConfig | None = None,
    records: list[dict[str, Any]] | None = None,
    records_dir: str | Path | None = None,
    ckpt_uri: str | None = None,
    progress: bool = True,
    stop_after_iteration: int | None = None,
) -> RLStageOutputs:
    """Run an RL stage from ``init_uri`` on the prompt set named by its config (or ``records``)."""
    from step3vl.checkpoint import save_checkpoint
    from step3vl.eval.suite import load_records, to_prompt
    from step3vl.devices import default_device
    from step3vl.model.loading import checkpoint_config, load_model
    from step3vl.rl.loop import rl_train
    from step3vl.rl.rollout import make_engine
    from step3vl.stages.data import local_copy
    from step3vl.storage import join_uri
    from step3vl.train.loop import seed_everything

    require_single_process(stage)
    rl: RLConfig = rl_cfg or getattr(cfg, stage)
    data_dir = local_copy(data_dir, data_sets(cfg, stage))
    seed_everything(cfg.seed)
    lm = load_model(init_uri, device=default_device())
    model = lm.model
    require_fits(stage, model, rl)
    model.train()
    ds_dir = Path(records_dir) if records_dir else data_dir / "raw" / rl.data
    if records is None:
        records = load_records(ds_dir)
    engine = make_engine(rl.backend, model, lm.tokenizer, lm.processor)
    tok_dir = lm.tokenizer_dir
    ckpt_config = checkpoint_config(lm.cfg, lm.tokenizer, stage=stage)

    def on_metrics(m: dict[str, float], it: int) -> None:
        tracking.log_metrics({f"{stage}/{k}": v for k, v in m.items()}, step=it)

    res = rl_train(
        model, engine, lm.tokenizer, lm.processor, rl, records,
        lambda r: to_prompt(r, ds_dir),
        reward_fn or verifiable_reward(rl.format_weight),
        ckpt_root=ckpt_uri or join_uri(out_uri, "checkpoints"),
        seed=cfg.seed,
        save_extra=lambda: {"config": ckpt_config, "tokenizer_dir": str(tok_dir) if tok_dir else None},
        on_metrics=on_metrics,
        progress=progress,
        stop_after_iteration=stop_after_iteration,
    )
    out = RLStageOutputs(model_uri=join_uri(out_uri, "model"), result=res)
    if res.iteration < rl.iterations or int(os.environ.get("RANK", "0")) != 0:
        return out
    save_checkpoint(out.model_uri, model_state=model.state_dict(), config=ckpt_config,
                    tokenizer_dir=str(tok_dir) if tok_dir else None,
                    extra_meta={"stage": stage, "iteration": res.iteration}, overwrite=True)
    total = sum(res.timing.values()) or 1.0
    out.metrics = {"iterations": float(res.iteration), "seconds": res.seconds,
                   **{f"time_share/{k}": v / total for k, v in res.timing.items()}}
    if res.history:
        out.metrics.update(reward_first=res.history[0]["reward_mean"], reward_last=res.history[-1]["reward_mean"])
    # beside the model when it is local; else in a folder of its own, for MLflow (sent after this returns)
    where = Path(out_uri) if not out_uri.startswith("s3://") else Path(tempfile.mkdtemp(prefix="step3vl-rl-plot-"))
    out.plot = plot_rl(res.history, where / "rl_curves.png", stage)
    tracking.log_metrics({f"{stage}/{k}": v for k, v in out.metrics.items()})
    if out.plot:
        tracking.log_artifact(str(out.plot))
    return out


def plot_rl(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """Reward and response length per task family over iterations (the paper's length dynamics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fams = sorted({k.split("/")[0] for h in history for k in h if k.endswith("/reward_mean")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = [h["iteration"] for h in history]
    for f in fams:
        axes[0].plot(xs, [h.get(f"{f}/reward_mean", float("nan")) for h in history], label=f)
        axes[1].plot(xs, [h.get(f"{f}/response_length", float("nan")) for h in history], label=f)
    axes[0].set_title(f"{title}: reward per family")
    axes[1].set_title(f"{title}: response length (tokens)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
