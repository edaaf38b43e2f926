"""RELIABILITY.md cannot go stale silently: it lists every case of the catalogue with the catalogue's
text, every catalogued test exists, and every test of this suite is catalogued."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from reliability_cases import CASES, SAFEGUARDS, all_node_ids

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _report_module():
    spec = importlib.util.spec_from_file_location("reliability_report", ROOT / "scripts" / "reliability_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _table(text: str, heading: str) -> list[list[str]]:
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[1:]]  # header off; |---| is not "| "


def test_every_catalogued_test_exists():
    missing = []
    for nodeid in all_node_ids():
        path, _, name = nodeid.partition("::")
        if not (ROOT / path).is_file() or name not in _test_functions(ROOT / path):
            missing.append(nodeid)
    assert not missing, missing


def test_every_test_of_the_suite_is_catalogued():
    named = set(all_node_ids())
    here = {f"tests/reliability/{p.name}::{name}" for p in HERE.glob("test_reliability_*.py") if p != Path(__file__)
            for name in _test_functions(p)}
    assert here - named == set(), f"not in reliability_cases.py: {sorted(here - named)}"


def test_reliability_md_lists_every_case_with_the_catalogue_text():
    report = _report_module()
    text = (ROOT / "RELIABILITY.md").read_text()
    rows = _table(text, "Cases")
    want = [[f"`{c.id}`", report.cell(c.fault), report.cell(c.injection)] for c in CASES]
    assert [r[:3] for r in rows] == want, "RELIABILITY.md is stale: run `make reliability`"
    assert all(len(r) == 6 and r[3] and r[4] for r in rows)
    safeguards = _table(text, "Safeguards")
    assert [r[0] for r in safeguards] == [report.cell(s) for s in SAFEGUARDS], "stale safeguards: `make reliability`"


def test_render_shows_measured_outcomes_and_what_did_not_run():
    report = _report_module()
    cat = report.load_catalogue()
    first, second = cat.CASES[0], cat.CASES[1]
    results = {"tests": {
        first.tests[0]: {"status": "passed", "seconds": 3.0, "records": []},
        second.tests[0]: {"status": "passed", "seconds": 9.0, "records": [
            {"case": second.id, "outcome": "killed at step 4; bit-identical", "data_lost": "none"}]},
    }}
    text = report.render(cat, results)
    rows = {r[0]: r for r in _table(text, "Cases")}
    assert rows[f"`{first.id}`"][3].startswith("as expected:") and rows[f"`{first.id}`"][4] == "none (asserted)"
    assert rows[f"`{second.id}`"][3] == "killed at step 4; bit-identical"
    assert rows[f"`{cat.CASES[2].id}`"][3].startswith("**NOT RUN**")
    assert f"2 of {len(cat.CASES)} cases passed" in text
