"""The RL loop shared by RLVR, RLHF and PaCoRe training.

One iteration: sample prompts (every family mixed) → ``rollouts`` completions each from the rollout
engine → rewards (a ``RewardFn`` over records and completions) → advantages (a registered
estimator) → ``epochs`` passes of minibatch PPO updates (clipped policy loss, value loss for GAE,
optional KL to the frozen starting policy, entropy bonus). Old log-probs are recomputed by the
trainer before the update, so the ratio is exact whatever the engine's numerics.

Checkpoints at iteration boundaries hold the policy, the value head, the optimizer, the prompt
sampler and RNG states: a killed run resumes bit-identically (sampling is seeded per iteration).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from step3vl.config import RLConfig
from step3vl.devices import module_device, to_device
from step3vl.rl.rollout import Completion, Prompt, SamplingParams, merge_images

log = logging.getLogger(__name__)

# (records, completions, prompts) → rewards (B,) and per-sample extra metrics
RewardFn = Callable[[Sequence[dict[str, Any]], Sequence[Completion]], tuple[list[float], dict[str, list[float]]]]
MetricsFn = Callable[[dict[str, float], int], None]


class ValueHead(nn.Module):
    """The critic for GAE: a linear map of the policy's last hidden state to a scalar value."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h.float()).squeeze(-1)


class PromptSampler:
    """Deterministic epochs over prompt records; resumable by (epoch, cursor)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()
            m = min(k - len(out), self.n - self.cursor)
            out.extend(order[self.cursor : self.cursor + m])
            self.cursor += m
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.cursor = int(s["epoch"]), int(s["cursor"])


@dataclass
class RolloutBatch:
    """Prompt + response token sequences, right-padded, with their images and response mask."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, L): 1 on response tokens (the positions whose token is predicted)
    images: Any
    prompt_index: list[int]  # per sequence, index of its prompt in the iteration

    def select(self, idx: list[int], processed: list[Any], vision: Any) -> RolloutBatch:
        """The sequences ``idx``, with their prompts' images (``processed``, one per prompt) on the batch's device."""
        images = merge_images([processed[self.prompt_index[i]] for i in idx], vision)
        return RolloutBatch(self.input_ids[idx], self.attention_mask[idx], self.response_mask[idx],
                            to_device(images, self.input_ids.device), [self.prompt_index[i] for i in idx])

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch with its tensors and images on ``device``."""
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                            to_device(self.images, device), self.prompt_index)


def build_batch(enc: list[tuple[list[int], Any]], completions: list[list[Completion]], pad_id: int, eos_id: int,
                vision: Any) -> RolloutBatch:
    seqs, resp, pidx = [], [], []
    for pi, ((ids, _), group) in enumerate(zip(enc, completions)):
        for c in group:
            toks = list(c.token_ids) + ([eos_id] if c.finish_reason == "stop" else [])
            seqs.append(ids + toks)
            resp.append((len(ids), len(toks)))
            pidx.append(pi)
    L = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    rmask = torch.zeros((B, L), dtype=torch.float32)
    for b, (s, (start, n)) in enumerate(zip(seqs, resp)):
        input_ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
        rmask[b, start : start + n] = 1.0
    images = merge_images([enc[i][1] for i in pidx], vision)
    return RolloutBatch(input_ids, attn, rmask, images, pidx)


def sequence_logprobs(model: nn.Module, batch: RolloutBatch, value_head: ValueHead | None = None,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-position log-prob of each token given its prefix (aligned with ``response_mask``)."""
    from step3vl.rl.algos import entropy_from_logits, token_logprobs

    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(batch.input_ids, images=batch.images, attention_mask=batch.attention_mask, position_ids=pos,
                return_logits=True)
    logits = out.logits[:, :-1].float()
    tgt = batch.input_ids[:, 1:]
    lp = torch.zeros_like(batch.response_mask)
    lp[:, 1:] = token_logprobs(logits, tgt)
    ent = None
    if with_entropy:
        ent = torch.zeros_like(batch.response_mask)
        ent[:, 1:] = entropy_from_logits(logits)
    values = None
    if value_head is not None:
        values = torch.zeros_like(batch.response_mask)
        values[:, 1:] = value_head(out.hidden_states[:, :-1])  # the state before each response token
    return lp, values, ent


@dataclass
class RLResult:
    iteration: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"  # where rollouts and updates ran: the model's device


def rl_train(
    model: nn.Module,
    engine: Any,
    tokenizer: Any,
    processor: Any,
    cfg: RLConfig,
    records: Sequence[dict[str, Any]],
    to_prompt: Callable[[dict[str, Any]], Prompt],
    reward_fn: RewardFn,
    *,
    ckpt_root: str,
    seed: int,
    save_extra: Callable[[], dict[str, Any]],
    on_metrics: MetricsFn | None = None,
    progress: bool = True,
    stop_after_iteration: int | None = None,
) -> RLResult:
    """Run ``cfg.iterations`` RL iterations on ``model`` (resuming from ``ckpt_root`` if it holds one)."""
    from step3vl.checkpoint import (
        capture_rng_state,
        checkpoint_uri,
        load_latest_checkpoint,
        restore_rng_state,
        save_checkpoint,
    )
    from step3vl.rl.algos import get_adv_est, kl_penalty, masked_mean, policy_loss, value_loss
    from step3vl.rl.rollout import encode_prompt

    if not records:
        raise ValueError("RL needs at least one prompt record")
    estimator = get_adv_est(cfg.algorithm)
    dev = module_device(model)  # rollouts, old log-probs and updates all run where the model is
    value_head = ValueHead(model.cfg.text.hidden_size).to(dev) if cfg.algorithm == "gae" else None
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.lr}]
    if value_head is not None:
        groups.append({"params": list(value_head.parameters()), "lr": cfg.value_lr})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    sampler = PromptSampler(len(records), seed)
    pad_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    eos_id = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    it, history, resumed_from = 0, [], None

    ck = load_latest_checkpoint(ckpt_root)
    if ck is not None:
        st = ck.train_state or {}
        model.load_state_dict(ck.model_state, strict=False)
        optimizer.load_state_dict(st["optimizer"])
        if value_head is not None:
            value_head.load_state_dict(st["value_head"])
        if ref_model is not None:
            ref_model.load_state_dict(st["ref_model"])
        sampler.load_state_dict(st["sampler"])
        restore_rng_state(st["rng"])
        it, history, resumed_from = int(st["iteration"]), list(st["history"]), int(st["iteration"])
        log.warning("resuming from %s at iteration %d", ck.uri, it)

    def save(at: int) -> None:
        extra = save_extra()
        state: dict[str, Any] = {"iteration": at, "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
                                 "rng": capture_rng_state(), "history": history}
        if value_head is not None:
            state["value_head"] = value_head.state_dict()
        if ref_model is not None:
            state["ref_model"] = ref_model.state_dict()
        save_checkpoint(checkpoint_uri(ckpt_root, at), model_state=model.state_dict(), config=extra["config"],
                        tokenizer_dir=extra.get("tokenizer_dir"), train_state=state, overwrite=True)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=it, desc="rl", unit="it", leave=False)
    timing = {"rollout": 0.0, "reward": 0.0, "update": 0.0}
    t_start = time.perf_counter()
    while it < cfg.iterations:
        n_sampled = max(cfg.prompts_per_iteration, round(cfg.prompts_per_iteration * cfg.oversample))
        idx = sampler.take(n_sampled)
        recs = [records[i] for i in idx]
        prompts = [to_prompt(r) for r in recs]
        t0 = time.perf_counter()
        sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens,
                            seed=seed * 100_003 + it)
        completions = engine.generate(prompts, cfg.rollouts, sp)
        t1 = time.perf_counter()
        flat = [c for g in completions for c in g]
        flat_recs = [r for r in recs for _ in range(cfg.rollouts)]
        rewards, extras = reward_fn(flat_recs, flat)
        t2 = time.perf_counter()
        informative = _informative_groups(rewards, cfg.rollouts)
        if cfg.filter_groups:
            keep = _keep_groups(informative, cfg.prompts_per_iteration)
            recs, prompts, completions = [recs[g] for g in keep], [prompts[g] for g in keep], [completions[g] for g in keep]
            rows = [g * cfg.rollouts + j for g in keep for j in range(cfg.rollouts)]
            flat, flat_recs, rewards = [flat[i] for i in rows], [flat_recs[i] for i in rows], [rewards[i] for i in rows]
            extras = {k: [v[i] for i in rows] for k, v in extras.items()}

        enc = [encode_prompt(p, tokenizer, processor) for p in prompts]
        batch = build_batch(enc, completions, pad_id, eos_id, processor.vision).to(dev)
        processed = [e[1] for e in enc]
        group_ids = torch.tensor(batch.prompt_index, device=dev)
        r = torch.tensor(rewards, dtype=torch.float32, device=dev)
        with torch.no_grad():
            old_lp, old_v, _ = sequence_logprobs(model, batch, value_head)
            ref_lp = sequence_logprobs(ref_model, batch)[0] if ref_model is not None else None
        adv, returns = estimator(rewards=r, mask=batch.response_mask, group_ids=group_ids, values=old_v,
                                 gamma=cfg.gamma, lam=cfg.lam)
        stats: dict[str, list[float]] = {}
        B = batch.input_ids.shape[0]
        mb = min(cfg.minibatch_size, B)
        order_rng = np.random.default_rng([seed, it])
        model.train()
        for _epoch in range(cfg.epochs):
            perm = order_rng.permutation(B).tolist()
            for s in range(0, B, mb):
                sel = perm[s : s + mb]
                sub = batch.select(sel, processed, processor.vision)
                lp, v, ent = sequence_logprobs(model, sub, value_head, with_entropy=cfg.entropy_coef > 0)
                m = sub.response_mask
                pl, pst = policy_loss(lp, old_lp[sel], adv[sel], m, clip_eps=cfg.clip_eps)
                loss = pl
                if value_head is not None:
                    vl, _ = value_loss(v, old_v[sel], returns[sel], m, clip_eps=cfg.clip_eps)
                    loss = loss + cfg.value_coef * vl
                    stats.setdefault("value_loss", []).append(float(vl.detach()))
                if ref_lp is not None:
                    kl = masked_mean(kl_penalty(lp, ref_lp[sel], kind="k3"), m)
                    loss = loss + cfg.kl_coef * kl
                    stats.setdefault("kl", []).append(float(kl.detach()))
                if ent is not None:
                    e = masked_mean(ent, m)
                    loss = loss - cfg.entropy_coef * e
                    stats.setdefault("entropy", []).append(float(e.detach()))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                stats.setdefault("policy_loss", []).append(float(pl.detach()))
                stats.setdefault("clip_frac", []).append(float(pst["clip_frac"]))
                stats.setdefault("approx_kl", []).append(float(pst["approx_kl"]))
        t3 = time.perf_counter()
        timing["rollout"] += t1 - t0
        timing["reward"] += t2 - t1
        timing["update"] += t3 - t2
        it += 1
        row = _iteration_metrics(flat_recs, flat, rewards, extras, stats)
        row.update(iteration=float(it), rollout_s=t1 - t0, reward_s=t2 - t1, update_s=t3 - t2,
                   informative_groups=float(np.mean(informative)), prompts_trained=float(len(recs)))
        history.append(row)
        if on_metrics:
            on_metrics(row, it)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", refresh=False)
        if it % cfg.checkpoint_every == 0 or it == cfg.iterations:
            save(it)
        if stop_after_iteration is not None and it >= stop_after_iteration:
            break
    if bar is not None:
        bar.close()
    return RLResult(iteration=it, history=history, resumed_from=resumed_from,
                    seconds=time.perf_counter() - t_start, timing=timing, device=str(dev))


def _informative_groups(rewards: Sequence[float], rollouts: int) -> list[bool]:
    """Per prompt: do its rollouts' rewards differ? A group whose rewards are all equal has zero
    group-normalised advantage and teaches nothing (DAPO's dynamic-sampling criterion)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, rollouts)
    return (r.max(axis=1) - r.min(axis=1) > 1e-9).tolist()


def _keep_groups(informative: Sequence[bool], k: int) -> list[int]:
    """The first ``k`` informative groups in sampling order; topped up with uninformative ones (also in
    order) when fewer than ``k`` are informative, so every iteration trains on ``k`` prompts."""
    good = [g for g, ok in enumerate(informative) if ok]
    rest = [g for g, ok in enumerate(informative) if not ok]
    return sorted((good + rest)[:k])


def _iteration_metrics(recs: Sequence[dict[str, Any]], comps: Sequence[Completion], rewards: list[float],
                       extras: dict[str, list[float]], stats: dict[str, list[float]]) -> dict[str, float]:
    """Reward mean/std, accuracy, response length and clip ratio (the share of responses cut at
    ``max_response_tokens``, whose answers a verifier cannot see) per task family, plus the update's statistics."""
    from step3vl.eval.suite import is_correct

    lengths = np.array([len(c.token_ids) for c in comps])
    cut = np.array([c.finish_reason == "length" for c in comps])
    row: dict[str, float] = {"reward_mean": float(np.mean(rewards)), "reward_std": float(np.std(rewards)),
                             "response_length": float(lengths.mean()), "clip_ratio": float(cut.mean())}
    fams: dict[str, list[int]] = {}
    for i, r in enumerate(recs):
        fams.setdefault(r["task"], []).append(i)
    for fam, ids in fams.items():
        rw = [rewards[i] for i in ids]
        row[f"{fam}/reward_mean"] = float(np.mean(rw))
        row[f"{fam}/reward_std"] = float(np.std(rw))
        row[f"{fam}/response_length"] = float(lengths[ids].mean())
        row[f"{fam}/clip_ratio"] = float(cut[ids].mean())
        if "verifier" in extras:
            row[f"{fam}/accuracy"] = float(np.mean([is_correct(recs[i], extras["verifier"][i]) for i in ids]))
    for k, v in extras.items():
        row[f"{k}_mean"] = float(np.mean(v))
    for k, v in stats.items():
        row[k] = float(np.mean(v))
    return row
