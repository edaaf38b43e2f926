"""Evaluation stage: a model's per-family accuracy on the held-out set, greedy and at the recipe's T=1.

Writes ``metrics.json`` (flat ``mode/family/metric`` → value) and ``report.md`` under ``out_dir``;
every number comes from this run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step3vl.config import PipelineConfig


@dataclass
class EvalOutputs:
    metrics: dict[str, float]
    report: Path
    results: dict[str, Any]


def run(cfg: PipelineConfig, data_dir: str | Path, model_uri: str, out_dir: str | Path, *,
        dataset: str = "eval", per_family: int | None = None, progress: bool = True) -> EvalOutputs:
    import mlflow

    from step3vl.eval.suite import EVAL_SAMPLING, GREEDY, evaluate, load_records
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import TorchEngine

    data_dir, out = Path(data_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(model_uri)
    engine = TorchEngine(lm.model, lm.tokenizer, lm.processor)
    ds_dir = data_dir / "raw" / dataset
    records = load_records(ds_dir, per_family=per_family)
    results = {}
    metrics: dict[str, float] = {}
    for mode, params in (("greedy", GREEDY), ("sere", EVAL_SAMPLING)):
        params = type(params)(**{**params.__dict__, "seed": cfg.seed})
        res = evaluate(engine, records, ds_dir, params=params, progress=progress)
        results[mode] = res
        metrics.update(res.metrics(prefix=f"{mode}/"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    lines = [f"# Evaluation of `{model_uri}`", "", f"Held-out set `{dataset}`: {len(records)} verifiable records.", "",
             "| family | n | greedy acc | T=1 acc | T=1 mean reward | mean length |", "|---|---|---|---|---|---|"]
    for fam, g in results["greedy"].families.items():
        s = results["sere"].families[fam]
        lines.append(f"| {fam} | {g.n} | {g.accuracy:.3f} | {s.accuracy:.3f} | {s.reward_sum / max(s.n, 1):.3f} | "
                     f"{s.length_sum / max(s.n, 1):.1f} |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    if mlflow.active_run() is not None:
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
        mlflow.log_artifact(str(report))
    return EvalOutputs(metrics, report, results)
