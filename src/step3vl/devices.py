"""Where this process computes: its GPU when CUDA is available (``LOCAL_RANK``'s under torchrun), else the CPU.

Training, RL updates, rollouts, evaluation and serving all place their models here, so the same stage code
runs on a laptop's CPU and on a GPU pod unchanged."""

from __future__ import annotations

import os
from typing import Any

import torch


def default_device() -> torch.device:
    """This process's GPU when CUDA is available (``cuda:$LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def describe() -> str:
    """What this process computes on, for people (an MLflow tag): ``cpu``, or ``cuda: 8 x NVIDIA H200``."""
    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    return f"cuda: {n} x {torch.cuda.get_device_name(0)}"


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded RNG for sampling on ``device``: a CUDA generator there (a CPU one cannot drive CUDA sampling), else
    a CPU one; :func:`sample_on` draws where the generator is."""
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)


def sample_on(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``probs``, drawn with ``gen`` on its device, returned on ``probs``'s."""
    if probs.device == gen.device:
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return torch.multinomial(probs.to(gen.device), 1, generator=gen).squeeze(-1).to(probs.device)


def to_device(x: Any, device: torch.device) -> Any:
    """``x.to(device)`` for tensors and objects with a ``to`` (batches), None passed through."""
    return None if x is None else x.to(device)
