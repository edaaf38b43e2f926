"""What a person sees of a local pipeline run: a live per-stage status and the summary table.

The board is fed by :class:`step3vl.pipeline.local.LogSink` (which reads the runner's log lines);
on a terminal it is a ``rich.live`` table, elsewhere one line per state change.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from step3vl.pipeline.local import RunResult

STYLE = {"pending": "dim", "running": "cyan", "done": "green", "cached": "green", "reused": "blue",
         "failed": "bold red", "not run": "dim"}


@dataclass
class StageState:
    status: str = "pending"  # pending | running | done | cached | reused | failed
    started: float | None = None
    ended: float | None = None
    detail: str = ""

    @property
    def seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.perf_counter()) - self.started


class StatusBoard:
    """Per-stage state of one run; a rich renderable. ``console=None`` keeps it silent."""

    def __init__(self, stages: list[str], console: Console | None = None, *, live: bool | None = None) -> None:
        self.stages = {s: StageState() for s in stages}
        self.console = console
        self.live = bool(console is not None and (console.is_terminal if live is None else live))
        self._live: Any = None
        self._spinner = Spinner("dots", text=Text("running", style="cyan"), style="cyan")
        self.log_path = ""

    def __enter__(self) -> StatusBoard:
        if self.live:
            from rich.live import Live

            self._live = Live(self, console=self.console, refresh_per_second=4, redirect_stdout=False,
                              redirect_stderr=True)
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    # ------------------------------------------------------------------ events

    def set(self, stage: str, status: str, detail: str = "") -> None:
        st = self.stages.setdefault(stage, StageState())
        now = time.perf_counter()
        if status == "running":
            st.started, st.ended = now, None
        elif status in ("cached", "reused"):
            st.started = st.ended = now
        elif st.started is not None:
            st.ended = now
        st.status = status
        st.detail = detail or (st.detail if status in ("done", "failed") else "")
        if self.console is not None and not self.live:
            secs = f" ({st.seconds:.1f}s)" if status in ("done", "failed") and st.seconds is not None else ""
            self.console.print(f"{time.strftime('%H:%M:%S')} {stage}: {status}{secs}"
                               + (f" — {detail}" if detail else ""), highlight=False, markup=False)

    def detail(self, stage: str, text: str) -> None:
        if stage in self.stages:
            self.stages[stage].detail = text

    def status(self, stage: str) -> str:
        return self.stages[stage].status if stage in self.stages else "pending"

    # ------------------------------------------------------------------ rendering

    def __rich__(self) -> Table:
        t = Table(title="step3vl pipeline", caption=f"task logs: {self.log_path}" if self.log_path else None,
                  caption_justify="left")
        for col in ("stage", "status", "time", "detail"):
            t.add_column(col, no_wrap=col != "detail", overflow="ellipsis")
        for name, st in self.stages.items():
            status: Any = Text(st.status, style=STYLE.get(st.status, ""))
            if st.status == "running":
                status = self._spinner
            secs = "" if st.seconds is None else f"{st.seconds:.1f}s"
            t.add_row(name, status, secs, Text(st.detail[-120:], style="dim"))
        return t


def summary_table(result: RunResult, key_metrics: dict[str, str] | None = None) -> Table:
    """Stage, status, cached?, duration, key metric and primary artifact URI of every stage."""
    key_metrics = key_metrics or {}
    t = Table(title=f"{result.run_name}: {result.status} in {result.seconds:.1f}s"
                    + (f" (MLflow run {result.mlflow_run_id})" if result.mlflow_run_id else ""))
    for col in ("stage", "status", "cached?", "duration", "key metric", "artifact"):
        t.add_column(col, overflow="fold")
    for s in result.stages:
        cached = {"cached": "yes", "reused": f"reused ({result.resumed_from})"}.get(s.status, "no" if s.ran else "")
        status = {"cached": "succeeded", "reused": "succeeded", "done": "succeeded"}.get(s.status, s.status)
        duration = "" if s.seconds is None else f"{s.seconds:.1f}s"
        if s.status in ("cached", "reused") and "stage_seconds" in s.metrics:
            duration += f" (ran {s.metrics['stage_seconds']:.1f}s)"
        metric = ""
        name = key_metrics.get(s.stage)
        if name and name in s.metrics:
            v = s.metrics[name]
            metric = f"{name} = {int(v):,}" if float(v).is_integer() else f"{name} = {v:.4g}"
        t.add_row(s.stage, Text(status, style=STYLE.get(s.status, "")), cached, duration, metric, s.primary_uri)
    return t
