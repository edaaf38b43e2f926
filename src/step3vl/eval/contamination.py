"""Contamination check: held-out records whose content also occurs in a training set.

Uses the data gate's leakage hash (:func:`step3vl.data.gate.content_hash`: task, prompt turns and
image pixels). Data prep already keeps training sets clear of eval content, so the expected count is
0. The eval set's hashes are computed here from the records evaluated; each training set's are the
ones data prep's gate computed from the set as written (``hashes/<set>/part-*.txt``, sealed with the data
directory's sha256 manifest), so the check does not read the training corpus again: at the recipe's
scale that is terabytes.
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
    """Hash every record of ``eval_set``; look each training set's recorded hashes up among them."""
    from step3vl.data.gate import content_hash
    from step3vl.data.io import DataError, iter_records
    from step3vl.stages.data import DATA_MANIFEST, HASHES_DIR

    data_dir = Path(data_dir)
    manifest: dict[str, Any] = json.loads((data_dir / DATA_MANIFEST).read_text())
    ev_dir = data_dir / "raw" / eval_set
    ev: dict[str, str] = {}
    for raw in iter_records(ev_dir):
        if raw.record is not None:
            ev[content_hash(raw.record, ev_dir)] = str(raw.record.get("id"))
    train = sorted(n for n, s in manifest["sets"].items() if s.get("split") == "train")
    dup: dict[str, list[str]] = {}
    for name in train:
        files = sorted((data_dir / HASHES_DIR / name).glob("part-*.txt"))
        if not files:
            raise DataError(f"{data_dir / HASHES_DIR / name}: no content hashes of training set {name}; data prep "
                            "writes them for every training set, a file per part (this data directory comes from an "
                            "older or a different data prep)")
        for path in files:
            with path.open() as f:
                for line in f:
                    if (h := line.strip()) in ev and name not in dup.get(ev[h], []):
                        dup.setdefault(ev[h], []).append(name)
    return ContaminationReport(eval_set, len(ev), train, dup)
