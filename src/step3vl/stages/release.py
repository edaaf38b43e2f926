"""Release stage: register a pipeline run's final model, then run the promotion gate.

The one place a pipeline run touches the model registry: the final model (PaCoRe's) becomes a new
version with its lineage (KFP run, MLflow parent run, git commit, config hash, every dataset's
content hash, where the data is) and the eval metrics of that model as tags, alias ``candidate``; then
:func:`step3vl.registry.promote` gates it against the current ``champion`` (``cfg.promotion``) and
moves ``champion`` only on a pass. A refused promotion is a result, not a failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step3vl.config import PipelineConfig


@dataclass
class ReleaseOutputs:
    name: str
    version: str
    model_uri: str
    promotion: Any  # registry.PromotionResult
    metrics: dict[str, float]
    report: str  # Markdown


def data_location(data_dir: str | Path) -> str:
    """Where a data directory is, as a version records it: an ``s3://`` URI as it is, a local folder absolute."""
    from step3vl.storage import is_s3_uri

    return str(data_dir) if is_s3_uri(str(data_dir)) else str(Path(data_dir).resolve())


def run(cfg: PipelineConfig, data_dir: str | Path, model_uri: str, eval_dir: str | Path, *, stage: str,
        kfp_run_id: str = "", parent_run_id: str = "", run_id: str | None = None) -> ReleaseOutputs:
    """Register ``model_uri`` (from ``stage``) with the eval metrics ``eval_dir/<stage>/metrics.json`` and the data
    in ``data_dir`` (its sets' content hashes and its location); promote."""
    from step3vl import registry
    from step3vl.config import config_hash
    from step3vl.stages.data import read_data_manifest

    eval_metrics = json.loads(Path(eval_dir, stage, "metrics.json").read_text())
    hashes = registry.data_hashes(read_data_manifest(data_dir))
    name = cfg.tracking.registered_model
    mv = registry.register_final(name, model_uri, metrics=eval_metrics, stage=stage, config_hash=config_hash(cfg),
                                 data_manifest_hashes=hashes, data_uri=data_location(data_dir), kfp_run_id=kfp_run_id,
                                 parent_run_id=parent_run_id, run_id=run_id, tracking=cfg.tracking)
    actor = f"kfp:{kfp_run_id}" if kfp_run_id else None
    res = registry.promote(name, mv.version, registry.CHAMPION, policy=cfg.promotion, actor=actor,
                           tracking=cfg.tracking)
    dec = res.decision
    headline = registry.family_accuracies(eval_metrics, cfg.promotion.mode).get(cfg.promotion.headline, float("nan"))
    metrics = {"version": float(mv.version), "promoted": float(res.promoted), "gate_passed": float(dec.passed),
               "failing_families": float(len(dec.failing_families)), "headline_accuracy": headline}
    verdict = (f"promoted to `{registry.CHAMPION}`" if res.promoted
               else f"not promoted: `{registry.CHAMPION}` stays at version {res.previous or 'none'}")
    lines = [f"# Release of {name} version {mv.version}", "",
             f"Registered `{model_uri}` (stage {stage}) as version {mv.version}, alias `{registry.CANDIDATE}`.", "",
             f"Gate ({cfg.promotion.mode} accuracies; compared to version {res.previous or 'none'}): "
             f"**{'passed' if dec.passed else 'failed'}**, {verdict}.", "", "| reason |", "|---|",
             *[f"| {r} |" for r in dec.reasons], "",
             f"Lineage: KFP run `{kfp_run_id or 'none'}`, MLflow parent run `{parent_run_id or 'none'}`, "
             f"config `{config_hash(cfg)}`, git `{mv.tags.get('step3vl.git_commit', '?')}`, "
             f"{len(hashes)} dataset hashes."]
    return ReleaseOutputs(name, str(mv.version), model_uri, res, metrics, "\n".join(lines) + "\n")
