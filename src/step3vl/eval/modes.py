"""Evaluation modes: how a model answers each held-out record before its verifier scores it.

- ``greedy``: one temperature-0 answer.
- ``sere``: one sample at the recipe's evaluation setting (T=1, top-p 1), seeded.
- ``majority@K``: K samples at T=1, the most common final answer is scored (hook:
  ``step3vl.eval.suite.evaluate_majority``).
- ``pacore``: parallel coordinated reasoning rounds (hook: ``step3vl.eval.suite.evaluate_pacore``,
  over ``step3vl.pacore.inference.pacore_generate``).

The two hooks are looked up by name when such a mode is asked for; until they exist the mode fails
with a message saying so (never a silent substitute).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from step3vl.errors import Step3VLError

BASIC_MODES = ("greedy", "sere")
_MAJORITY = re.compile(r"^majority@(\d+)$")


def check_mode(mode: str) -> str:
    """``mode`` if it names a mode, else a :class:`Step3VLError` listing the modes."""
    if mode in BASIC_MODES or mode == "pacore" or _MAJORITY.match(mode):
        return mode
    raise Step3VLError(f"unknown evaluation mode {mode!r}: greedy, sere, majority@K or pacore")


def _hook(name: str, mode: str) -> Any:
    from step3vl.eval import suite

    fn = getattr(suite, name, None)
    if fn is None:
        raise Step3VLError(f"evaluation mode {mode} needs step3vl.eval.suite.{name}, which this build does not have "
                           "yet (it lands with step3vl.pacore)")
    return fn


def run_mode(mode: str, engine: Any, records: list[dict[str, Any]], dataset_dir: str | Path, *, seed: int,
             batch_size: int = 128, progress: bool = False, pacore_rounds: tuple[int, ...] | None = None) -> Any:
    """Score ``records`` in ``mode``; returns a :class:`step3vl.eval.suite.EvalResult`.

    ``pacore_rounds``: the parallel responses per PaCoRe round (default: the suite's own).
    """
    from step3vl.eval.suite import EVAL_SAMPLING, GREEDY, evaluate

    check_mode(mode)
    if mode == "greedy":
        return evaluate(engine, records, dataset_dir, params=replace(GREEDY, seed=seed), batch_size=batch_size,
                        progress=progress)
    if mode == "sere":
        return evaluate(engine, records, dataset_dir, params=replace(EVAL_SAMPLING, seed=seed),
                        batch_size=batch_size, progress=progress)
    if m := _MAJORITY.match(mode):
        return _hook("evaluate_majority", mode)(engine, records, dataset_dir, k=int(m[1]),
                                                params=replace(EVAL_SAMPLING, seed=seed), batch_size=batch_size,
                                                progress=progress)
    extra = {"rounds": tuple(pacore_rounds)} if pacore_rounds else {}
    return _hook("evaluate_pacore", mode)(engine, records, dataset_dir, params=replace(EVAL_SAMPLING, seed=seed),
                                          seed=seed, batch_size=batch_size, progress=progress, **extra)
