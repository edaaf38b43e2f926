"""Pre-training and SFT stages: both are ``run_training`` with a different ``TrainConfig``.

Layout under the stage's output URI::

    checkpoints/step-000050/ …   resumable training checkpoints
    model/                       the final model (weights, config, tokenizer; no optimizer state)
    loss_curve.png               training and held-out loss
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from step3vl import tracking
from step3vl.config import PipelineConfig, TrainConfig

log = logging.getLogger(__name__)
Stage = Literal["pretrain", "sft"]


@dataclass
class TrainStageOutputs:
    model_uri: str
    result: Any  # TrainResult
    metrics: dict[str, float] = field(default_factory=dict)
    plot: Path | None = None


def run_training(
    stage: Stage,
    cfg: PipelineConfig,
    data_dir: str | Path,
    out_uri: str,
    *,
    init_uri: str | None = None,
    ckpt_uri: str | None = None,
    progress: bool = True,
    stop_after_step: int | None = None,
    register: bool = False,
) -> TrainStageOutputs:
    """Train ``stage`` on the packed sets in ``data_dir`` (data prep output), from ``init_uri`` if given.

    ``data_dir`` is a local folder, or the ``s3://`` URI of one (a TrainJob): its tokenizer is then fetched and
    its packed shards stream into the node's cache as they are read (:class:`step3vl.storage.RemoteFiles`).

    Checkpoints go to ``ckpt_uri`` (default ``<out_uri>/checkpoints``); a run finding valid checkpoints
    there resumes from the latest. Orchestrators pass a location that outlives one task attempt.
    ``register`` also registers the model as a version of ``tracking.registered_model`` (needs an active
    MLflow run); off by default, because a pipeline run registers exactly one version, its final model
    with its eval metrics (the ``register`` stage).
    """
    import mlflow

    from step3vl.checkpoint import load_checkpoint, save_checkpoint
    from step3vl.data.pack import PackedDataset
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.storage import RemoteFiles, is_s3_uri, join_uri
    from step3vl.train.loop import full_state_dict, seed_everything, train

    tcfg: TrainConfig = getattr(cfg, stage)
    processor = ImageProcessor(cfg.model.vision)
    if is_s3_uri(str(data_dir)):
        # a TrainJob: the tokenizer is fetched, the packed shards stream into the node's cache as they are read
        files = RemoteFiles(str(data_dir))
        tok_dir = files.files("tokenizer")

        def packed(name: str) -> PackedDataset:
            return PackedDataset(f"packed/{name}", processor, files=files)
    else:
        tok_dir = Path(data_dir) / "tokenizer"

        def packed(name: str) -> PackedDataset:
            return PackedDataset(Path(data_dir) / "packed" / name, processor)
    tok = load_tokenizer(tok_dir)
    seed_everything(cfg.seed)
    model = new_model(cfg.model, tok, cfg.seed)
    if init_uri:
        ck = load_checkpoint(init_uri)
        model.load_state_dict(ck.model_state, strict=False)
    datasets = [packed(ph.data) for ph in tcfg.phases]
    for ph, ds in zip(tcfg.phases, datasets):
        if ds.seq_len != tcfg.seq_len:
            raise ValueError(f"{stage}: packed set {ph.data} has seq_len {ds.seq_len}, config says {tcfg.seq_len}")
    eval_ds = None
    if tcfg.eval_data:
        suffix = "all" if tcfg.loss_on == "all" else "assistant"
        eval_ds = packed(f"{tcfg.eval_data}-{suffix}")
    ckpt_config = checkpoint_config(cfg.model, tok, stage=stage)

    def on_metrics(m: dict[str, float], step: int) -> None:
        tracking.log_metrics({f"{stage}/{k}": v for k, v in m.items()}, step=step)

    result = train(
        model, tcfg, datasets,
        ckpt_root=ckpt_uri or join_uri(out_uri, "checkpoints"),
        seed=cfg.seed,
        save_extra=lambda: {"config": ckpt_config, "tokenizer_dir": str(tok_dir)},
        eval_ds=eval_ds,
        on_metrics=on_metrics,
        progress=progress,
        stop_after_step=stop_after_step,
    )
    out = TrainStageOutputs(model_uri=join_uri(out_uri, "model"), result=result)
    if stop_after_step is not None and result.step < sum(tcfg.steps_for(p) for p in tcfg.phases):
        return out  # interrupted on purpose: no final model
    rank0 = int(os.environ.get("RANK", "0")) == 0
    state = full_state_dict(model, keep=rank0)  # every rank: under ZeRO the weights are gathered from all of them
    if not rank0:
        return out  # under torchrun only rank 0 publishes
    save_checkpoint(out.model_uri, model_state=state, config=ckpt_config,
                    tokenizer_dir=str(tok_dir), extra_meta={"stage": stage, "step": result.step}, overwrite=True)
    ev = [e["eval_loss"] for e in result.eval_history]
    out.metrics = {"final_loss": result.final_loss, "steps": float(result.step),
                   "tokens_per_second": result.tokens_per_second}
    if ev:
        out.metrics.update(eval_loss_start=ev[0], eval_loss_end=ev[-1])
    out.plot = plot_loss(result, Path(_local(out_uri)) / "loss_curve.png" if _is_local(out_uri) else None, stage)
    tracking.log_metrics({f"{stage}/{k}": v for k, v in out.metrics.items()})
    if out.plot:
        tracking.log_artifact(str(out.plot))
    if register:
        from step3vl.config import config_hash
        from step3vl.registry import register_checkpoint

        if mlflow.active_run() is None:
            raise ValueError(f"{stage}: register=True needs an active MLflow run")
        mv = register_checkpoint(cfg.tracking.registered_model, out.model_uri, run_id=mlflow.active_run().info.run_id,
                                 tags={"step3vl.stage": stage, "step3vl.config_hash": config_hash(cfg),
                                       **{f"metric.{k}": f"{v:.6g}" for k, v in out.metrics.items()}})
        out.metrics["registered_version"] = float(mv.version)
    return out


def _is_local(uri: str) -> bool:
    return not uri.startswith("s3://")


def _local(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def plot_loss(result: Any, path: Path | None, title: str) -> Path | None:
    """Training loss per step and held-out loss at its evaluation steps, one PNG."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if path is None:
        path = Path(tempfile.mkdtemp()) / "loss_curve.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    h = result.history
    ax.plot([r["step"] for r in h], [r["loss"] for r in h], label="train loss", lw=1)
    if result.eval_history:
        ax.plot([r["step"] for r in result.eval_history], [r["eval_loss"] for r in result.eval_history],
                "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
