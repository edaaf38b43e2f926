"""Records what the reliability suite measured, for ``scripts/reliability_report.py``.

A test calls ``reliability.record(case, outcome=..., data_lost=...)`` with what it observed. At the
end of any session that collected this directory, every catalogued test's status and duration (run
in this session, wherever it lives) plus those records are merged into
``.pytest_cache/step3vl/reliability.json`` (``$STEP3VL_RELIABILITY_JSON`` overrides the path);
tests not run this session keep their previous entry.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from reliability_cases import CASES, all_node_ids

_RECORDS: dict[str, list[dict[str, Any]]] = {}


def results_path(rootpath: Path) -> Path:
    return Path(os.environ.get("STEP3VL_RELIABILITY_JSON") or rootpath / ".pytest_cache" / "step3vl" /
                "reliability.json")


class Recorder:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid

    def record(self, case: str, *, outcome: str, data_lost: str = "none", **measured: Any) -> None:
        """What this test observed for ``case`` (a catalogue id): one line of outcome, data lost, numbers."""
        if case not in {c.id for c in CASES}:
            raise KeyError(f"{case!r} is not a case of tests/reliability/reliability_cases.py")
        _RECORDS.setdefault(self.nodeid, []).append(
            {"case": case, "outcome": outcome, "data_lost": data_lost, "measured": measured})


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.node.nodeid)


def _base(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    wanted = set(all_node_ids())
    seen: dict[str, dict[str, Any]] = {}
    for status in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(status, []):
            nodeid = getattr(rep, "nodeid", "")
            base = _base(nodeid)
            if base not in wanted:
                continue
            entry = seen.setdefault(base, {"status": "passed", "seconds": 0.0, "params": 0, "detail": ""})
            entry["seconds"] += float(getattr(rep, "duration", 0.0) or 0.0)
            if rep.when == "call" or status in ("skipped", "error"):
                entry["params"] += rep.when == "call"
                if status != "passed":
                    entry["status"] = status
                    if status == "skipped" and isinstance(rep.longrepr, tuple):
                        entry["detail"] = str(rep.longrepr[2])
    if not seen:
        return
    path = results_path(config.rootpath)
    data: dict[str, Any] = {"format": "step3vl-reliability/1", "tests": {}}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError:
            pass
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for base, entry in seen.items():
        records = [r for nodeid, rs in _RECORDS.items() if _base(nodeid) == base for r in rs]
        data["tests"][base] = {**entry, "seconds": round(entry["seconds"], 1), "records": records, "at": now}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    terminalreporter.write_line(f"reliability: {len(seen)} catalogued test(s) recorded in {path}")
