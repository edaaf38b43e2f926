"""Optimizer state that does not depend on the world size: torch AdamW's own ``state_dict`` layout.

One process saves ``optimizer.state_dict()``. Under DeepSpeed ZeRO each rank holds only its partition
of the fp32 master weights and Adam moments, in DeepSpeed's flat buffers. This module gathers them per
parameter (DeepSpeed's tensor-fragment API, ``safe_get_full_optimizer_state``) into that same layout, and
puts them back after ``deepspeed.initialize``. A checkpoint taken on N ranks therefore resumes exactly on N
ranks, and on M ranks or in one process up to the order of floating-point reductions; it stays
safetensors, like every other step3vl checkpoint (DeepSpeed's own checkpoints are pickles).

Every function here is a collective under ZeRO: all ranks call it, in the same order. Gathering holds each
parameter's whole state on every rank, one parameter at a time; only the rank that saves (``keep``) copies
them out, so the whole optimizer state is held on that rank alone, not on every rank of a node.
"""

from __future__ import annotations

from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def managed(params: list[torch.nn.Parameter]) -> bool:
    """Whether DeepSpeed ZeRO holds these parameters' optimizer state in partitions (stages 1–3)."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in params)


def partitioned(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 has partitioned: each rank holds a shard, the module an empty placeholder."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _shape(p: torch.nn.Parameter) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_id") else p.shape  # ZeRO-3 leaves an empty placeholder in p


def _hyper(optimizer: torch.optim.Optimizer, groups: list[list[torch.nn.Parameter]]) -> list[dict[str, Any]]:
    """The torch optimizer's param groups (DeepSpeed swapped their ``params`` for its flat partitions)."""
    if len(optimizer.param_groups) != len(groups):
        raise ValueError(f"the optimizer has {len(optimizer.param_groups)} param groups, expected {len(groups)}")
    out, start = [], 0
    for g, params in zip(optimizer.param_groups, groups):
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + len(params)))})
        start += len(params)
    return out


def _step(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """AdamW's step count, one for every flat partition (the loop steps them together); None before a step."""
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    if not steps:
        return None
    if len(steps) != 1:
        raise ValueError(f"DeepSpeed's partitions are at different optimizer steps {sorted(steps)}")
    return torch.tensor(steps.pop(), dtype=torch.float32)


def _relink(zero_optimizer: Any) -> None:
    """Point every ZeRO-1/2 parameter's fragment at its group's AdamW state.

    DeepSpeed links them once, right after stepping the *first* param group (``_optimizer_step``), when the
    later groups have no state yet; their fragments stay empty, and ``safe_get_full_optimizer_state`` fails
    for every parameter outside group 0 (here: the norms and biases, without weight decay). Linking again
    once all groups have state is what that call meant to do. ZeRO-3 reads the state directly."""
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def gather_optimizer_state(engine: Any, groups: list[list[torch.nn.Parameter]], keep: bool = True
                           ) -> dict[str, Any]:
    """The ZeRO-partitioned AdamW state as ``torch.optim.AdamW(groups).state_dict()`` would hold it (CPU tensors).

    ``groups`` are the parameter groups the torch optimizer had before ``deepspeed.initialize``. A collective:
    every rank calls it; a rank with ``keep`` False takes part but keeps no tensor (its ``state`` is empty)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = engine.optimizer.optimizer  # the torch AdamW, stepping DeepSpeed's flat partitions
    step = _step(optimizer)
    if step is not None:
        _relink(engine.optimizer)
    state: dict[int, dict[str, torch.Tensor]] = {}
    if step is not None:
        i = 0
        for params in groups:
            for p in params:
                entry = {"step": step.clone()}
                for key in MOMENTS:
                    full = safe_get_full_optimizer_state(p, key)
                    if full is None:
                        raise ValueError(f"parameter #{i} {tuple(_shape(p))} has no ZeRO partition of {key}")
                    if keep:
                        entry[key] = full.detach().reshape(_shape(p)).to("cpu", copy=True)
                    del full
                if keep:
                    state[i] = entry
                i += 1
    return {"state": state, "param_groups": _hyper(optimizer, groups)}


def gather_master_weights(model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The fp32 master weights of the trainable parameters, by state-dict name (tied names included): the values
    the optimizer updates, which the module holds only rounded (bf16) or partitioned (ZeRO-3). A collective; a
    rank with ``keep`` False takes part and gets an empty dict."""
    from deepspeed.utils import safe_get_full_fp32_param

    by_param: dict[int, torch.Tensor | None] = {}  # one gather per parameter, however many names it has
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            continue
        if id(p) not in by_param:
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise ValueError(f"{name} has no ZeRO fp32 master partition")
            by_param[id(p)] = full.detach().reshape(_shape(p)).to("cpu", copy=True) if keep else None
            del full
        if keep:
            out[name] = by_param[id(p)]
    return out


def _set_full(engine_optimizer: Any, p: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id"):
        # ZeRO-3: DeepSpeed's setter narrows the whole value at rank × partition size, which runs past the end
        # on the last rank when the parameter's size is not a multiple of the world size (its partition is
        # padded); copy this rank's slice, padded alike
        part, _ = engine_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
        rank = engine_optimizer._get_param_partition_rank(p)
        flat = value.reshape(-1).to(part.device, part.dtype)
        lo = min(rank * part.numel(), flat.numel())
        hi = min(lo + part.numel(), flat.numel())
        part.data.zero_()
        part.data[: hi - lo].copy_(flat[lo:hi])
    elif key is None:
        safe_set_full_fp32_param(p, value.to(p.device))
    else:
        safe_set_full_optimizer_state(p, value.to(p.device), key)


def _flat_partitions(zero_optimizer: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 partitions, the tensors AdamW steps (its state is keyed by them). ZeRO-3 puts one
    sub-group at a time into the torch optimizer's param groups while stepping, so they are not found there."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(zero_optimizer.fp32_partitioned_groups_flat)
    return [flat for g in zero_optimizer.optimizer.param_groups for flat in g["params"]]


def load_optimizer_state(engine: Any, groups: list[list[torch.nn.Parameter]], saved: dict[str, Any],
                         master_weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Put a :func:`gather_optimizer_state` (or single-process ``optimizer.state_dict()``) state back into a fresh
    DeepSpeed engine's partitions, with the fp32 master weights from the checkpoint. A collective."""
    opt = engine.optimizer  # DeepSpeed's ZeRO optimizer
    base = opt.optimizer  # the torch AdamW, now stepping DeepSpeed's flat partitions
    want = _hyper(base, groups)
    got = saved.get("param_groups", [])
    if [len(g["params"]) for g in got] != [len(g["params"]) for g in want]:
        raise ValueError(f"the checkpoint's optimizer has param groups of {[len(g['params']) for g in got]} "
                         f"parameters, this model {[len(g['params']) for g in want]}")
    for g_base, g_saved in zip(base.param_groups, got):
        g_base.update({k: v for k, v in g_saved.items() if k != "params"})

    names = {id(p): n for n, p in model.named_parameters()}
    for params in groups:
        for p in params:
            _set_full(opt, p, master_weights[names[id(p)]], None)
    entries = saved.get("state", {})
    if not entries:
        return  # saved before the first optimizer step: nothing to restore
    steps = {float(e["step"]) for e in entries.values()}
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's parameters are at different optimizer steps {sorted(steps)}")
    step = steps.pop()
    # AdamW creates its state lazily at the first step; create it now, as AdamW would, then fill it
    for flat in _flat_partitions(opt):
        base.state[flat] = {"step": torch.tensor(step, dtype=torch.float32),
                            **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in MOMENTS}}
    _relink(opt)  # ZeRO-1/2: point each parameter's fragment at the new state
    i = 0
    for params in groups:
        for p in params:
            entry = entries.get(i)
            if entry is None:
                raise ValueError(f"the checkpoint's optimizer state has no entry for parameter #{i}")
            for key in MOMENTS:
                v = entry[key]
                if tuple(v.shape) != tuple(_shape(p)):
                    raise ValueError(f"the checkpoint's {key} of parameter #{i} ({names[id(p)]}) is "
                                     f"{tuple(v.shape)}, the model's {tuple(_shape(p))}")
                _set_full(opt, p, v, key)
            i += 1
