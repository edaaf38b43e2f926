"""A second device with real values on a machine without a GPU: PyTorch's lazy tensor backend ("lazy", which
records ops and runs them as TorchScript on the CPU). An op that mixes its tensors with CPU tensors fails, as
one mixing CUDA and CPU tensors does, so code that runs here puts every tensor where its model is.

The backend is a test harness, not a product device, and has gaps; :func:`lazy_device` papers over the ones
step3vl's code reaches, with exact equivalents:
- multi-output view ops (``chunk``, ``split``, ``unbind``) give tensors the backend later refuses
  ("Input tensor is not a lazy tensor"): they are rebuilt from ``narrow``/``select``;
- ``masked_scatter`` has no lazy kernel (``as_strided``): it becomes an ``index_copy``;
- the backend grows one graph until told to cut it (``mark_step``), re-running the whole history at every
  value read; it is cut at each value read and after each optimizer step, as XLA users do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

LAZY = torch.device("lazy", 0)
_started: list[bool] = []  # the backend registers its kernels once per process


def _lazy(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "lazy"


@contextmanager
def lazy_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    """Make "lazy" the device every step3vl stage computes on (``step3vl.devices.default_device``), for the
    duration of the block."""
    import torch._lazy
    import torch._lazy.ts_backend
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from step3vl import devices
    from step3vl.train import loop

    if not _started:
        torch._lazy.ts_backend.init()
        _started.append(True)
    chunk, split, unbind = torch.Tensor.chunk, torch.Tensor.split, torch.Tensor.unbind
    masked_scatter = torch.Tensor.masked_scatter

    def lazy_chunk(x: torch.Tensor, chunks: int, dim: int = 0) -> tuple[torch.Tensor, ...]:
        if not _lazy(x):
            return chunk(x, chunks, dim)
        n = x.shape[dim]
        size = -(-n // chunks)
        return tuple(x.narrow(dim, s, min(size, n - s)) for s in range(0, n, size))

    def lazy_split(x: torch.Tensor, sizes: int | list[int], dim: int = 0) -> tuple[torch.Tensor, ...]:
        if not _lazy(x):
            return split(x, sizes, dim)
        n = x.shape[dim]
        each = [sizes] * -(-n // sizes) if isinstance(sizes, int) else list(sizes)
        out, s = [], 0
        for k in each:
            out.append(x.narrow(dim, s, min(k, n - s)))
            s += out[-1].shape[dim]
        return tuple(out)

    def lazy_unbind(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
        if not _lazy(x):
            return unbind(x, dim)
        return tuple(x.select(dim, i) for i in range(x.shape[dim]))

    def lazy_masked_scatter(x: torch.Tensor, mask: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if not _lazy(x):
            return masked_scatter(x, mask, source)
        idx = mask.expand_as(x).reshape(-1).nonzero().squeeze(-1)
        return x.reshape(-1).index_copy(0, idx, source.reshape(-1)[: idx.numel()]).view(x.shape)

    for owner in (torch.Tensor, torch):
        monkeypatch.setattr(owner, "chunk", lazy_chunk)
        monkeypatch.setattr(owner, "split", lazy_split)
        monkeypatch.setattr(owner, "unbind", lazy_unbind)
    monkeypatch.setattr(torch.Tensor, "masked_scatter", lazy_masked_scatter)
    for name in ("tolist", "item", "__int__", "__float__", "__bool__"):
        read = getattr(torch.Tensor, name)

        def cut_then_read(x: torch.Tensor, *a: object, _read: object = read, **k: object) -> object:
            if _lazy(x):
                torch._lazy.mark_step()
            return _read(x, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(torch.Tensor, name, cut_then_read)
    hook = register_optimizer_step_post_hook(lambda *a, **k: torch._lazy.mark_step())
    monkeypatch.setattr(devices, "default_device", lambda: LAZY)
    monkeypatch.setattr(loop, "default_device", lambda: LAZY)
    try:
        yield LAZY
    finally:
        hook.remove()
        torch._lazy.mark_step()
        torch._C._lazy._clear_ir_cache()
