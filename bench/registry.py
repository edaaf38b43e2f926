"""The benchmark registry: ``@benchmark(name, title)`` on a function ``fn(ctx) -> Result``.

Every module under ``bench/entries/`` is imported by :func:`discover`, so adding a benchmark is
adding one file there; ``bench/run.py`` runs them in file-name order and ``bench/render.py`` turns
their results into ``BENCHMARKS.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import stats


@dataclass
class Result:
    """What an entry measured. Figures are repeated measurements (their median is the figure);
    ratios pair two series measured in the same rounds (see ``stats.interleave``)."""

    method: str = ""  # markdown: what was measured and how, stated so a reader can redo it
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # sizes, formulas' inputs: constants, not timings
    notes: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)  # computed, not measured (see ``table``)

    def figure(self, key: str, label: str, unit: str, samples: Sequence[float]) -> dict[str, Any]:
        samples = [float(x) for x in samples]
        self.figures[key] = {"label": label, "unit": unit, **stats.summarize(samples), "samples": samples}
        return self.figures[key]

    def ratio(self, key: str, label: str, num: Sequence[float], den: Sequence[float], *,
              target: float | None = None, ceiling: bool = False, percent: bool = False, rejected: int = 0,
              contended: bool = False, by_rounds: bool = False) -> dict[str, Any]:
        """``num[i] / den[i]`` per round; ``target`` is a floor the value should reach (higher is
        better), or with ``ceiling`` a bound it should stay under (a cost ratio: lower is better).

        ``rejected``: rounds dropped because other processes took the CPU; ``contended``: too few
        clean rounds were left, so these pairs include contended ones (the report says so). ``by_rounds``
        (two or more interleaved rounds of minutes-long arms): a target is met or missed only when every
        round's ratio falls on the same side of it, else it is reported as not decided.
        """
        r = stats.paired_ratio([float(x) for x in num], [float(x) for x in den])

        def meets(x: float) -> bool:
            return x <= target if ceiling else x >= target  # type: ignore[operator]

        met = None if target is None else meets(r["value"])
        if by_rounds and r["n"] < 2:
            raise ValueError(f"ratio '{key}': by_rounds needs at least two rounds, got {r['n']}")
        undecided = target is not None and by_rounds and len({meets(x) for x in r["pairs"]}) > 1
        self.ratios[key] = {"label": label, **r, "target": target, "ceiling": ceiling, "percent": percent,
                            "met": None if undecided else met, "rejected": rejected, "contended": contended,
                            "undecided": undecided, "by_rounds": by_rounds}
        return self.ratios[key]

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A computed table (a plan on paper, not a measurement), rendered as is; cells are strings
        or numbers."""
        self.tables.append({"title": title, "columns": list(columns), "rows": [list(r) for r in rows]})

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "figures": self.figures, "ratios": self.ratios,
                "tables": self.tables, "notes": self.notes}


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    fn: Callable[[Any], Result]
    opt_in: bool = False  # too long for `make bench`: run with `--only NAME`; a full run keeps its last result


ENTRIES: dict[str, Entry] = {}


def benchmark(name: str, title: str, *, opt_in: bool = False) -> Callable[[Callable[[Any], Result]], Callable[[Any], Result]]:
    """Register ``fn(ctx) -> Result`` under ``name`` (the key in results.json); ``opt_in`` entries run
    only when named with ``--only``."""

    def deco(fn: Callable[[Any], Result]) -> Callable[[Any], Result]:
        if name in ENTRIES and ENTRIES[name].fn is not fn:
            raise ValueError(f"benchmark '{name}' registered twice ({ENTRIES[name].fn.__module__}, {fn.__module__})")
        ENTRIES[name] = Entry(name, title, fn, opt_in)
        return fn

    return deco


def discover() -> dict[str, Entry]:
    """Import every module of ``bench.entries`` (file-name order) and return the registry."""
    import bench.entries as pkg

    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return ENTRIES
