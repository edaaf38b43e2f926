"""PPO-family RL arithmetic on token sequences: advantages, losses, KL and entropy.

The RL loop (rollout → reward → advantage → update) calls these; nothing here knows about models,
tokenizers or workers. Every function is pure torch on a batch of ``B`` sequences × ``T`` response
tokens, with ``mask`` (B, T) = 1 on real response tokens and 0 on padding (bool or 0/1 float; any
nonzero counts as real). Padded positions never influence a result, whatever they hold (even
``nan``/``inf``), and never receive a non-zero gradient.

Advantage estimators are registered with ``@register_adv_est(name)`` in the style of verl's
``core_algos`` and share one keyword-only signature::

    fn(*, rewards, mask, group_ids=None, values=None, gamma=1.0, lam=1.0, eps=1e-6)
        -> (advantages (B, T), returns (B, T))

``rewards`` (B,) are outcome rewards, placed on each sequence's last real token. ``group_ids``
(B,) long says which samples answer the same prompt (any integer labels, in any order); the
critic-free estimators (``grpo``, ``reinforce``) need it, ``gae`` needs ``values`` instead.
Advantages and returns are 0 on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from step3vl.errors import Step3VLError

AdvEstimator = Callable[..., tuple[Tensor, Tensor]]
ADV_ESTIMATORS: dict[str, AdvEstimator] = {}

LOSS_AGGS = ("token-mean", "seq-mean-token-mean")
KL_KINDS = ("k1", "k2", "k3")

# exp(20) ≈ 4.9e8: a token whose log-ratio is this far off is already a broken rollout; the clamp
# keeps its loss large but finite instead of inf (verl clamps the same way).
_MAX_LOG_RATIO = 20.0


class AlgoError(Step3VLError, ValueError):
    """An RL algorithm was asked for something it cannot do (unknown option, missing input)."""


class UnknownAdvEstimatorError(Step3VLError, KeyError):
    """A config names an advantage estimator that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def register_adv_est(name: str) -> Callable[[AdvEstimator], AdvEstimator]:
    """Register an advantage estimator (the module docstring gives its signature) as ``name``."""

    def deco(fn: AdvEstimator) -> AdvEstimator:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADV_ESTIMATORS[name] = fn
        return fn

    return deco


def get_adv_est(name: str) -> AdvEstimator:
    """The advantage estimator registered as ``name``."""
    try:
        return ADV_ESTIMATORS[name]
    except (KeyError, TypeError):
        raise UnknownAdvEstimatorError(
            f"unknown advantage estimator {name!r}; registered: {sorted(ADV_ESTIMATORS)}"
        ) from None


# --------------------------------------------------------------------------- masked statistics


def _real(mask: Tensor) -> Tensor:
    return mask.bool() if mask.dtype != torch.bool else mask


def _zero_pad(x: Tensor, m: Tensor) -> Tensor:
    # where(), not x * mask: 0 * nan is nan, and a nan in the unused branch would still reach the
    # gradient of anything computed from x before the mask.
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over real positions (all of them, or along ``dim``); 0 where none is real."""
    m = _real(mask)
    num = _zero_pad(x, m)
    if dim is None:
        return num.sum() / m.sum().clamp_min(1)
    return num.sum(dim) / m.sum(dim).clamp_min(1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(x − mean) / sqrt(var + eps)`` over the real positions of the whole batch; 0 on padding.

    The variance is the population one (divide by the count, not count − 1), so the real entries
    come out with mean 0 and variance 1 exactly (up to ``eps``).
    """
    m = _real(mask)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    return _zero_pad((x - mean) * torch.rsqrt(var + eps), m)


# --------------------------------------------------------------------------- advantage estimators


def _broadcast(per_seq: Tensor, m: Tensor) -> Tensor:
    return _zero_pad(per_seq[:, None].expand(m.shape).to(torch.float32), m)


def _groups(rewards: Tensor, group_ids: Tensor | None) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """``(group_sum, count, r)``: ``group_sum(x)`` gives each sample the sum of ``x`` over its group,
    ``count`` each sample its group's size, ``r`` the rewards in float64."""
    if group_ids is None:
        raise AlgoError("this advantage estimator needs group_ids: which samples share a prompt")
    if group_ids.shape != rewards.shape:
        raise AlgoError(f"group_ids has shape {tuple(group_ids.shape)}, rewards {tuple(rewards.shape)}")
    labels, idx = torch.unique(group_ids, return_inverse=True)
    r = rewards.to(torch.float64)

    def group_sum(x: Tensor) -> Tensor:
        return torch.zeros(len(labels), dtype=x.dtype, device=x.device).index_add_(0, idx, x)[idx]

    return group_sum, group_sum(torch.ones_like(r)), r


@register_adv_est("gae")
def gae(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    whiten: bool = False,
) -> tuple[Tensor, Tensor]:
    """Token-level GAE with a critic's ``values`` (B, T).

    The reward sits on the last real token; δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the last
    real token; A_t = Σ_k (γλ)^k δ_{t+k}; returns = A + V (the critic's targets, before any
    whitening). Padded positions are skipped, not treated as steps: a hole in the mask (e.g. tool
    output between two model turns) joins the real tokens on either side. With γ = λ = 1,
    A_t = R − V_t. ``whiten`` whitens the advantages over the batch (:func:`masked_whiten`).
    ``group_ids`` and ``eps`` are unused.
    """
    if values is None:
        raise AlgoError("advantage estimator 'gae' needs the critic's values (without a critic: 'grpo', 'reinforce')")
    m = _real(mask)
    v = _zero_pad(values.to(torch.float32), m)
    B, T = m.shape
    # reward on the last real token of each sequence (a sequence with none gets no reward)
    has_real = m.any(dim=1)
    last = T - 1 - m.flip(1).to(torch.int64).argmax(dim=1)
    r_tok = torch.zeros(B, T, dtype=torch.float32, device=v.device)
    r_tok[has_real, last[has_real]] = rewards.to(torch.float32)[has_real]

    adv = torch.zeros_like(v)
    next_value = torch.zeros(B, dtype=torch.float32, device=v.device)
    running = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = r_tok[:, t] + gamma * next_value - v[:, t]
        stepped = delta + gamma * lam * running
        real = m[:, t]
        running = torch.where(real, stepped, running)
        next_value = torch.where(real, v[:, t], next_value)
        adv[:, t] = torch.where(real, stepped, 0.0)
    returns = _zero_pad(adv + v, m)
    if whiten:
        adv = masked_whiten(adv, m)
    return adv, returns


@register_adv_est("grpo")
def grpo(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Group-normalised outcome advantage (GRPO): (R − mean_group) / (std_group + eps).

    Unlike verl (``torch.std``, Bessel-corrected), std is the population std (divide by the group
    size): it is defined for every group size and makes a group's advantages unit-variance. A group
    of one, or one whose rewards are all equal, gets advantage 0. The advantage is the same on
    every real token of a sequence; returns = advantages. ``values``, ``gamma``, ``lam`` are unused.
    """
    m = _real(mask)
    group_sum, count, r = _groups(rewards, group_ids)
    dev = r - group_sum(r) / count
    # from the deviations, not E[r²] − mean²: that cancels to a tiny non-zero for equal rewards
    std = (group_sum(dev * dev) / count).sqrt()
    adv = torch.where(count > 1, dev / (std + eps), 0.0)
    out = _broadcast(adv, m)
    return out, out.clone()


@register_adv_est("reinforce")
def reinforce(
    *,
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor | None = None,
    values: Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE with a leave-one-out baseline (RLOO): R_i − mean of the other samples' rewards.

    A group of one has baseline 0 (advantage = R). Same on every real token of a sequence;
    returns = advantages. ``values``, ``gamma``, ``lam``, ``eps`` are unused.
    """
    m = _real(mask)
    group_sum, count, r = _groups(rewards, group_ids)
    baseline = torch.where(count > 1, (group_sum(r) - r) / (count - 1).clamp_min(1), 0.0)
    out = _broadcast(r - baseline, m)
    return out, out.clone()


# --------------------------------------------------------------------------- losses


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate (B, T) of KL(π ‖ π_ref) from tokens sampled from π.

    With d = logp − ref_logp: ``k1`` = d (unbiased, can be negative), ``k2`` = ½d² (biased,
    ≥ 0), ``k3`` = exp(−d) + d − 1 (unbiased and ≥ 0; Schulman's estimator). Not masked.
    """
    d = logp.to(torch.float32) - ref_logp.to(torch.float32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(-d) + d
    raise AlgoError(f"unknown KL estimator {kind!r}; known: {list(KL_KINDS)}")


def _aggregate(per_token: Tensor, m: Tensor, agg: str) -> Tensor:
    if agg == "token-mean":
        return masked_mean(per_token, m)
    if agg == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, m, dim=1)
        return masked_mean(per_seq, m.any(dim=1))  # a sequence with no real token does not vote
    raise AlgoError(f"unknown loss aggregation {agg!r}; known: {list(LOSS_AGGS)}")


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate: per token −min(r·A, clip(r, 1 − ε, 1 + ε_high)·A), r = exp(logp − old).

    ``clip_eps_high`` (DAPO's clip-higher) defaults to ``clip_eps``. ``agg``: ``"token-mean"``
    averages over every real token of the batch (long answers weigh more); ``"seq-mean-token-mean"``
    averages within each sequence, then over sequences. Stats (detached scalars): ``clip_frac``,
    the share of real tokens where the clipped term is the active (larger) loss; ``approx_kl``,
    the k3 estimate of KL(π_old ‖ π) = mean(r − 1 − log r); ``ratio_mean``.
    """
    m = _real(mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = _zero_pad(logp.to(torch.float32) - old_logp.to(torch.float32), m)
    log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    a = _zero_pad(advantages.to(torch.float32), m)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = _aggregate(per_token, m, agg)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), m),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, per token ½·max((V − R)², (clip(V, V_old ± ε) − R)²), masked token mean.

    Stats (detached): ``clip_frac``, the share of real tokens where the clipped term is the larger.
    """
    m = _real(mask)
    v = _zero_pad(values.to(torch.float32), m)
    old = _zero_pad(old_values.to(torch.float32), m)
    ret = _zero_pad(returns.to(torch.float32), m)
    v_clipped = old + (v - old).clamp(-clip_eps, clip_eps)
    unclipped = (v - ret) ** 2
    clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), m)}
    return loss, stats


# --------------------------------------------------------------------------- logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy (B, T) of softmax(``logits`` (B, T, V)), in float32, in nats.

    Stable for large logits, and a ``-inf`` logit (a banned token) contributes 0, not nan.
    """
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    p_logp = torch.where(torch.isneginf(logp), 0.0, logp.exp() * logp)
    return -p_logp.sum(dim=-1)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π(token) (B, T) in float32 from ``logits`` (B, T, V) and ``tokens`` (B, T).

    Every entry of ``tokens`` must be a valid id, padding included (use the pad id, not -100).
    """
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return logp.gather(-1, tokens.to(torch.int64).unsqueeze(-1)).squeeze(-1)
