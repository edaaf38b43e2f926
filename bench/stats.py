"""Statistics for benchmarks: medians of repeated runs and ratios of interleaved pairs.

Every comparison in ``bench/`` is measured side by side: the two arms run alternately in the same
process (A B B A A B …, so a slow drift on a shared machine hits both arms alike), and a ratio is
the median of the per-round ratios, which cancels load that changes between rounds. Load that
comes and goes within a round does not cancel, so rounds can be rejected (``accept``) and re-run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), ``0 <= q <= 1``."""
    if not xs:
        raise ValueError("quantile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, extremes and count of repeated measurements."""
    if not xs:
        raise ValueError("summarize of no values")
    return {
        "median": statistics.median(xs),
        "p25": quantile(xs, 0.25),
        "p75": quantile(xs, 0.75),
        "min": min(xs),
        "max": max(xs),
        "n": len(xs),
    }


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Ratio of two arms measured in the same rounds: ``value`` is the median of ``num[i] / den[i]``.

    ``of_medians`` (median(num) / median(den)) is kept beside it; the two differ when the load on
    the machine changed between rounds, which is why the paired value is the one reported.
    """
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty series ({len(num)} vs {len(den)})")
    if any(d == 0 for d in den):
        raise ValueError("paired_ratio: a denominator is zero")
    pairs = [a / b for a, b in zip(num, den)]
    return {
        "value": statistics.median(pairs),
        "of_medians": statistics.median(num) / statistics.median(den),
        "min": min(pairs),
        "max": max(pairs),
        "n": len(pairs),
        "pairs": pairs,
    }


@dataclass
class Rounds(Generic[T]):
    """Results of interleaved rounds: ``kept`` passed ``accept``; ``all`` is every timed round."""

    kept: dict[str, list[T]]
    all: dict[str, list[T]]
    wanted: int

    @property
    def clean(self) -> bool:
        """Whether ``wanted`` rounds passed ``accept`` (say, no other process took the CPU)."""
        return len(next(iter(self.kept.values()))) >= self.wanted

    @property
    def rejected(self) -> int:
        return len(next(iter(self.all.values()))) - len(next(iter(self.kept.values())))

    @property
    def used(self) -> dict[str, list[T]]:
        """``kept`` when clean; otherwise every round, and the caller must say the figures are contended."""
        return self.kept if self.clean else self.all


def interleave(arms: Mapping[str, Callable[[], T]], *, rounds: int, warmup: int = 1,
               accept: Callable[[dict[str, T]], bool] | None = None, extra_s: float = 0.0,
               clock: Callable[[], float] = time.monotonic) -> Rounds[T]:
    """Call every arm once per round, reversing the order every other round (ABBA…).

    ``warmup`` rounds run first and are discarded (allocator, kernel selection, caches). A timed
    round that ``accept`` rejects is replaced by another while the rounds run past the first
    ``rounds`` take less than ``extra_s`` seconds in all. Results come back in round order, so
    ``paired_ratio`` can pair them up.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds}, {warmup}")
    names = list(arms)
    kept: dict[str, list[T]] = {n: [] for n in names}
    every: dict[str, list[T]] = {n: [] for n in names}
    r, t_extra = 0, None
    while True:
        timed = r - warmup
        if timed >= rounds:
            if len(kept[names[0]]) >= rounds:
                break
            t_extra = clock() if t_extra is None else t_extra
            if clock() - t_extra >= extra_s:
                break
        order = names if r % 2 == 0 else names[::-1]
        res = {n: arms[n]() for n in order}
        if timed >= 0:
            for n in names:
                every[n].append(res[n])
            if accept is None or accept(res):
                for n in names:
                    kept[n].append(res[n])
        r += 1
    return Rounds(kept, every, rounds)


def drift(speeds: Sequence[float]) -> float:
    """How much a speed measured repeatedly across an entry changed: max/min − 1."""
    return max(speeds) / min(speeds) - 1.0
