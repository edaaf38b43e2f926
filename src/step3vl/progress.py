"""Progress bars for long work (tqdm; off in tests and inside pipeline components)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], desc: str, *, enabled: bool = True, unit: str = "it") -> Iterable[T]:
    """``items`` wrapped in a transient tqdm bar when ``enabled``; unchanged otherwise."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False, mininterval=1.0)
