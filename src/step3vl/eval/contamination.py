"""Contamination check: held-out records whose content also occurs in a training set.

Uses the data gate's leakage hash (:func:`step3vl.data.gate.content_hash`: task, prompt turns and
image pixels). Data prep already keeps training sets clear of eval content, so the expected count is
0; the check reads what was actually written, which is what the evaluation has to trust.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ContaminationReport:
    eval_set: str
    n_eval: int
    train_sets: list[str]
    duplicates: dict[str, list[str]] = field(default_factory=dict)  # eval record id → training sets holding it

    @property
    def count(self) -> int:
        return len(self.duplicates)

    def to_markdown(self) -> str:
        lines = ["## Contamination check", "",
                 f"{self.count} of {self.n_eval} records of `{self.eval_set}` have their content hash in a training "
                 f"set ({', '.join(f'`{s}`' for s in self.train_sets) or 'none'})."]
        if self.duplicates:
            lines += ["", "| eval record | training sets |", "|---|---|"]
            lines += [f"| `{rid}` | {', '.join(sets)} |" for rid, sets in sorted(self.duplicates.items())[:50]]
            if self.count > 50:
                lines.append(f"| … {self.count - 50} more | |")
        return "\n".join(lines) + "\n"


def check(data_dir: str | Path, eval_set: str = "eval") -> ContaminationReport:
    """Hash every record of ``eval_set`` and every training set listed in the data manifest."""
    from step3vl.data.gate import content_hash, dataset_hashes
    from step3vl.data.io import iter_records

    data_dir = Path(data_dir)
    manifest: dict[str, Any] = json.loads((data_dir / "data_manifest.json").read_text())
    ev_dir = data_dir / "raw" / eval_set
    ev: dict[str, str] = {}
    for raw in iter_records(ev_dir):
        if raw.record is not None:
            ev[content_hash(raw.record, ev_dir)] = str(raw.record.get("id"))
    train = sorted(n for n, s in manifest["sets"].items() if s.get("split") == "train")
    dup: dict[str, list[str]] = {}
    for name in train:
        for h in dataset_hashes(data_dir / "raw" / name) & ev.keys():
            dup.setdefault(ev[h], []).append(name)
    return ContaminationReport(eval_set, len(ev), train, dup)
