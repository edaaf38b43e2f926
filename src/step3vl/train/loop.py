"""The one training loop: pre-training and both SFT stages run here; configs differ, code does not.

A stage is a list of LR phases (each with its own packed dataset and LR decay range) on one
optimizer: AdamW, linear warm-up then cosine decay per phase, gradient accumulation over
micro-batches, gradient clipping, bf16 autocast where asked. The loss of a step is the sum of
token losses over the whole global batch divided by its loss-token count, so any split into
micro-batches or processes computes the same gradient.

Exact resume: a checkpoint holds model, optimizer, step, data position and RNG states; on start
the loop loads the latest valid checkpoint under ``ckpt_root`` and continues bit-identically. Under
ZeRO the optimizer state is gathered from the ranks' partitions into torch AdamW's own layout
(:mod:`step3vl.train.zero`), so a checkpoint resumes on any number of processes.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs through DeepSpeed with
the ZeRO stage from config; each rank takes an interleaved slice of every global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from step3vl.config import TrainConfig
from step3vl.data.pack import PackedBatch, PackedDataset
from step3vl.devices import default_device
from step3vl.train import zero

log = logging.getLogger(__name__)

MetricsFn = Callable[[dict[str, float], int], None]


# --------------------------------------------------------------------------- schedule


def lr_at(cfg: TrainConfig, step: int, phase_steps: list[int]) -> float:
    """LR for optimizer step ``step`` (0-based): warm-up to phase 0's start, then cosine per phase."""
    start = 0
    for i, (ph, n) in enumerate(zip(cfg.phases, phase_steps)):
        if step < start + n or i == len(phase_steps) - 1:
            t = min(max(step - start, 0), max(n - 1, 1)) / max(n - 1, 1)
            lr = ph.lr_end + 0.5 * (ph.lr_start - ph.lr_end) * (1 + math.cos(math.pi * t))
            if step < cfg.warmup_steps:
                lr = min(lr, cfg.phases[0].lr_start * (step + 1) / cfg.warmup_steps)
            return lr
        start += n
    raise ValueError("no phases")  # pragma: no cover


# --------------------------------------------------------------------------- data order


class RowSampler:
    """Deterministic epoch order over a packed dataset's rows; position (epoch, cursor) is resumable.

    The order of epoch e permutes shards, then rows within each shard, from ``seed``, so only the
    shard being read needs to be in memory.
    """

    def __init__(self, ds: PackedDataset, seed: int) -> None:
        self.ds, self.seed = ds, seed
        self.epoch, self.cursor = 0, 0
        self._order: list[tuple[int, int]] | None = None

    def _epoch_order(self) -> list[tuple[int, int]]:
        if self._order is None:
            g = np.random.default_rng([self.seed, self.epoch])
            order: list[tuple[int, int]] = []
            for s in g.permutation(self.ds.n_shards).tolist():
                order.extend((s, r) for r in g.permutation(self.ds.shard_rows[s]).tolist())
            self._order = order
        return self._order

    def take(self, n: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        while len(out) < n:
            order = self._epoch_order()
            k = min(n - len(out), len(order) - self.cursor)
            out.extend(order[self.cursor : self.cursor + k])
            self.cursor += k
            if self.cursor == len(order):
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.cursor, self._order = int(s["epoch"]), int(s["cursor"]), None


# --------------------------------------------------------------------------- loop


@dataclass
class TrainResult:
    step: int
    final_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    backend: str = "torch"  # or "deepspeed-zero<stage>"
    device: str = "cpu"  # where it trained: "cpu" or "cuda:<i>"


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), world_size()


def world_size() -> int:
    """Processes of this run (``torchrun`` sets ``WORLD_SIZE``); 1 when started plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def full_state_dict(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole state dict: a collective under ZeRO that every rank must call; the rank that saves it
    passes ``keep`` (the others take part and get an empty dict, holding no copy). Under ZeRO the trainable
    parameters are the optimizer's fp32 master weights, gathered from the ranks' partitions (the module holds them
    rounded to bf16, or only a ZeRO-3 placeholder); ZeRO-3's other partitioned parameters are gathered too.
    Otherwise it is ``model.state_dict()``."""
    if not zero.managed(list(model.parameters())):
        return model.state_dict() if keep else {}
    masters = zero.gather_master_weights(model, keep=keep)
    frozen = [p for p in zero.partitioned(model) if not p.requires_grad]
    with contextlib.ExitStack() as stack:
        if frozen:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(frozen, modifier_rank=None))
        if not keep:
            return {}
        return {k: masters[k] if k in masters else v.detach().clone() for k, v in model.state_dict().items()}


def forward_loss_sum(model: torch.nn.Module, batch: PackedBatch, precision: str) -> torch.Tensor:
    """Sum (not mean) of token losses of one micro-batch under the packed block-diagonal mask."""
    # autocast on the batch's device: CUDA, or the CPU (which also stands in for devices without autocast, e.g. meta)
    on = "cuda" if batch.input_ids.device.type == "cuda" else "cpu"
    with torch.autocast(on, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(
            batch.input_ids,
            images=batch if batch.has_images else None,
            attention_mask=batch.attention_mask(),
            position_ids=batch.position_ids,
            labels=batch.labels,
            return_logits=False,
        )
    return out.loss.float() * out.n_loss_tokens


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, ds: PackedDataset, *, max_rows: int, micro: int, precision: str,
                  device: torch.device | str = "cpu") -> float:
    """Mean token loss over the first ``max_rows`` rows of a packed held-out set (fixed, so comparable), its batches
    on ``device`` (the model's)."""
    was = model.training
    model.eval()
    refs = [(s, r) for s in range(ds.n_shards) for r in range(ds.shard_rows[s])][:max_rows]
    total, n = 0.0, 0
    for i in range(0, len(refs), micro):
        b = ds.batch(refs[i : i + micro])
        total += float(forward_loss_sum(model, b.to(device), precision))
        n += b.n_loss_tokens
    model.train(was)
    return total / max(n, 1)


def train(
    model: torch.nn.Module,
    cfg: TrainConfig,
    datasets: list[PackedDataset],
    *,
    ckpt_root: str,
    seed: int,
    save_extra: Callable[[], dict[str, Any]],
    eval_ds: PackedDataset | None = None,
    on_metrics: MetricsFn | None = None,
    progress: bool = True,
    stop_after_step: int | None = None,
) -> TrainResult:
    """Run every phase of ``cfg`` on ``model``; checkpoints under ``ckpt_root``; resumes from it.

    ``save_extra()`` returns what a checkpoint carries besides weights and state
    (``config`` dict, ``tokenizer_dir``). ``stop_after_step`` ends early (tests, fault injection).
    """
    from step3vl.checkpoint import (
        capture_rng_state,
        checkpoint_uri,
        load_latest_checkpoint,
        restore_rng_state,
        save_checkpoint,
    )

    if len(datasets) != len(cfg.phases):
        raise ValueError(f"{len(cfg.phases)} phases but {len(datasets)} datasets")
    rank, world = _dist()
    dev = default_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # DeepSpeed and NCCL take the current device
    phase_steps = [cfg.steps_for(p) for p in cfg.phases]
    total_steps = sum(phase_steps)
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size % (micro * world):
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro} x world {world}")
    samplers = [RowSampler(ds, seed * 1000 + i) for i, ds in enumerate(datasets)]

    step, history, eval_history, resumed_from = 0, [], [], None
    # every rank loads it: on S3 from the node's one copy (downloaded once, verified as it arrives)
    ck, st, fresh_optimizer = load_latest_checkpoint(ckpt_root), {}, False
    if ck is not None:
        st = ck.train_state or {}
        if "optimizer" not in st:
            raise ValueError(f"{ck.uri} has no optimizer state: not a training checkpoint")
        if st["optimizer"] is None:
            # distributed checkpoints of earlier step3vl versions carried weights, step, data position and RNG only
            if not cfg.resume_fresh_optimizer:
                raise ValueError(
                    f"{ck.uri} holds no optimizer state (a distributed checkpoint of an earlier step3vl), so it "
                    "cannot resume exactly; start a new run from its weights with --init, or set "
                    "resume_fresh_optimizer: true to resume its weights, step, data position and RNG with fresh "
                    "optimizer moments")
            fresh_optimizer = True
        # before DeepSpeed wraps the model: ZeRO takes its fp32 master copy of the weights from here
        model.load_state_dict(ck.model_state)
    model.to(dev)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.phases[0].lr_start, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
    )
    engine = None
    if world > 1:
        engine = _deepspeed_engine(model, optimizer, cfg, micro, world)
    # ZeRO keeps the fp32 master weights and AdamW moments in per-rank partitions; checkpoints hold them
    # gathered, in torch AdamW's layout, so they resume on any world size (step3vl.train.zero)
    partitioned = engine is not None and zero.managed(params)

    if ck is not None:
        if fresh_optimizer:
            log.warning("resuming %s with fresh optimizer moments (resume_fresh_optimizer): not an exact resume",
                        ck.uri)
        elif partitioned:
            zero.load_optimizer_state(engine, [decay, no_decay], st["optimizer"], ck.model_state, model)
        else:
            optimizer.load_state_dict(st["optimizer"])
        for s, d in zip(samplers, st["samplers"]):
            s.load_state_dict(d)
        restore_rng_state(st["rng"])
        step, history, eval_history = int(st["step"]), list(st["history"]), list(st["eval_history"])
        resumed_from = step
        log.warning("resuming from %s at step %d", ck.uri, step)

    def save(at: int) -> None:
        # every rank: gathering ZeRO's partitions is a collective
        state = full_state_dict(model, keep=rank == 0)
        if partitioned:
            opt_state = zero.gather_optimizer_state(engine, [decay, no_decay], keep=rank == 0)
        if rank != 0:
            return
        if not partitioned:
            opt_state = optimizer.state_dict()
        extra = save_extra()
        save_checkpoint(
            checkpoint_uri(ckpt_root, at),
            model_state=state,
            config=extra["config"],
            tokenizer_dir=extra.get("tokenizer_dir"),
            train_state={
                "step": at, "optimizer": opt_state, "samplers": [s.state_dict() for s in samplers],
                "rng": capture_rng_state(), "history": history, "eval_history": eval_history,
            },
            extra_meta={"stage_step": at},
            overwrite=True,
        )

    zero3 = bool(zero.partitioned(model))

    def do_eval(at: int) -> None:
        # rank 0 evaluates; under ZeRO-3 every rank runs the same forward (it gathers shards collectively)
        if eval_ds is None or (rank != 0 and not zero3):
            return
        loss = evaluate_loss(model, eval_ds, max_rows=128, micro=micro, precision=cfg.precision, device=dev)
        if rank != 0:
            return
        eval_history.append({"step": at, "eval_loss": loss})
        if on_metrics:
            on_metrics({"eval_loss": loss}, at)

    model.train()
    if step == 0 and eval_ds is not None and not eval_history:
        do_eval(0)
    bar = _bar(total_steps, step, progress and rank == 0)
    # a run resumed at its last step reports the loss it ended with
    t_start, tokens_done, loss = time.perf_counter(), 0, (history[-1]["loss"] if history else float("nan"))
    window_t, window_tokens, window_samples = time.perf_counter(), 0, 0
    while step < total_steps:
        phase = _phase_of(step, phase_steps)
        lr = lr_at(cfg, step, phase_steps)
        for g in (engine.optimizer if engine is not None else optimizer).param_groups:
            g["lr"] = lr
        refs = samplers[phase].take(cfg.batch_size)
        ds = datasets[phase]
        # the global batch's loss-token count normalises every micro-batch on every rank alike
        n_loss = sum(int(ds.shard(s)["loss_mask"][r, 1:].sum()) for s, r in refs)
        mine = refs[rank::world]
        loss_sum = 0.0
        step_tokens, step_samples = 0, 0
        for i in range(0, len(mine), micro):
            b = ds.batch(mine[i : i + micro])  # on the CPU: its counts below need no device sync
            ls = forward_loss_sum(engine or model, b.to(dev), cfg.precision)
            scaled = ls / max(n_loss, 1)
            if engine is not None:
                # DeepSpeed divides by grad-accumulation steps and averages over ranks: undo both
                engine.backward(scaled * engine.gradient_accumulation_steps() * world)
                engine.step()
            else:
                scaled.backward()
            loss_sum += float(ls.detach())
            step_tokens += b.n_tokens
            step_samples += int(b.segment_ids.max(dim=1).values.sum())
        if engine is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
            loss_sum = _all_reduce_sum(loss_sum, dev)
            step_tokens = int(_all_reduce_sum(step_tokens, dev))
            step_samples = int(_all_reduce_sum(step_samples, dev))
        step += 1
        loss = loss_sum / max(n_loss, 1)
        tokens_done += step_tokens
        window_tokens += step_tokens
        window_samples += step_samples
        history.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", phase=phase + 1, refresh=False)
        if step % cfg.log_every == 0 or step == total_steps:
            dt = max(time.perf_counter() - window_t, 1e-9)
            m = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": window_tokens / dt,
                 "samples_per_s": window_samples / dt, "phase": float(phase + 1)}
            window_t, window_tokens, window_samples = time.perf_counter(), 0, 0
            if on_metrics and rank == 0:
                on_metrics(m, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
            do_eval(step)
        if step == total_steps:
            do_eval(step)
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            save(step)
        if stop_after_step is not None and step >= stop_after_step:
            break
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    return TrainResult(step=step, final_loss=loss, history=history, eval_history=eval_history,
                       resumed_from=resumed_from, seconds=elapsed, tokens_per_second=tokens_done / max(elapsed, 1e-9),
                       backend=f"deepspeed-zero{engine.zero_optimization_stage()}" if engine is not None else "torch",
                       device=str(dev))


def _phase_of(step: int, phase_steps: list[int]) -> int:
    acc = 0
    for i, n in enumerate(phase_steps):
        acc += n
        if step < acc:
            return i
    return len(phase_steps) - 1


def _bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", leave=False, mininterval=1.0)


def _all_reduce_sum(x: float, dev: torch.device) -> float:
    """Sum over the ranks; the tensor goes on this rank's device (NCCL reduces GPU tensors only, gloo CPU ones)."""
    import torch.distributed as dist

    t = torch.tensor([float(x)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t.item())


def _deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, micro: int,
                      world: int):
    """Wrap model + torch AdamW in a DeepSpeed engine (ZeRO stage from config; gloo on CPU)."""
    import deepspeed

    gas = cfg.batch_size // (micro * world)
    ds_config = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == "bf16" and torch.cuda.is_available()},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
