"""Evaluation stage: per-family accuracy of one or more models on the held-out set, in each mode.

The pipeline evaluates every stage's model (pretrain as the base, sft, rlvr, rlhf, pacore) in the
modes of ``cfg.eval.modes`` (greedy and SeRe at T=1 by default) and reports the stage x family x
mode table with a stage-progression plot; ``step3vl eval`` evaluates one model the same way.

Layout under ``out_dir``::

    metrics.json           flat metrics of every model: ``<stage>/<mode>/<family>/<metric>``
                           (one model: ``<mode>/<family>/<metric>``), plus ``contamination/*``
    <stage>/metrics.json   one model's metrics as ``<mode>/<family>/<metric>`` (what the registry reads)
    report.md, report.html the table, the contamination check, the plot (embedded in the HTML)
    progression.png        accuracy per family across the stages, one panel per mode

Every number comes from this run.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from step3vl import tracking
from step3vl.config import PipelineConfig

log = logging.getLogger(__name__)


@dataclass
class EvalOutputs:
    metrics: dict[str, float]
    report: Path
    results: dict[str, dict[str, Any]]  # model label → mode → EvalResult
    html: Path | None = None
    plot: Path | None = None
    contamination: Any = None  # ContaminationReport
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)  # label → <mode>/<family>/<metric>


def run(cfg: PipelineConfig, data_dir: str | Path, model_uri: str, out_dir: str | Path, *,
        modes: tuple[str, ...] | None = None, per_family: int | None = None, dataset: str = "eval",
        progress: bool = True) -> EvalOutputs:
    """Evaluate one model (a path, ``s3://`` or ``models:/NAME@alias``); metrics keyed ``<mode>/<family>/…``."""
    return evaluate_models(cfg, data_dir, {"model": model_uri}, out_dir, modes=modes, per_family=per_family,
                           dataset=dataset, progress=progress)


def evaluate_models(cfg: PipelineConfig, data_dir: str | Path, models: dict[str, str], out_dir: str | Path, *,
                    modes: tuple[str, ...] | None = None, per_family: int | None = None, dataset: str = "eval",
                    progress: bool = True) -> EvalOutputs:
    """Evaluate each model of ``models`` (label → URI, in stage order) on ``dataset`` of ``data_dir``.

    ``modes`` and ``per_family`` default to ``cfg.eval``; a single model's metrics carry no label prefix.
    """
    from step3vl.eval import contamination
    from step3vl.eval.modes import check_mode, run_mode
    from step3vl.eval.suite import load_records
    from step3vl.devices import default_device
    from step3vl.model.loading import load_model
    from step3vl.progress import track
    from step3vl.rl.rollout import TorchEngine

    from step3vl.stages.data import DATA_MANIFEST, HASHES_DIR, local_copy
    from step3vl.storage import RemoteFiles, is_s3_uri

    modes = tuple(check_mode(m) for m in (modes or cfg.eval.modes))
    per_family = cfg.eval.per_family if per_family is None else per_family
    # what this stage reads of the data: its eval set, and for the contamination check the training sets' hashes
    extra = (DATA_MANIFEST, HASHES_DIR) if cfg.eval.contamination_check else ()
    data_dir, out = local_copy(data_dir, [dataset], extra), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_dir = data_dir / "raw" / dataset
    records = load_records(ds_dir, per_family=per_family or None)
    single = len(models) == 1
    results: dict[str, dict[str, Any]] = {}
    per_model: dict[str, dict[str, float]] = {}
    metrics: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for label, uri in models.items():
        t0 = time.perf_counter()
        lm = load_model(uri, device=default_device())
        engine = TorchEngine(lm.model, lm.tokenizer, lm.processor)
        results[label] = {}
        mine: dict[str, float] = {}
        for mode in track(modes, f"eval {label}", enabled=progress, unit=" mode"):
            res = run_mode(mode, engine, records, ds_dir, seed=cfg.seed, batch_size=cfg.eval.batch_size,
                           progress=progress, pacore_rounds=getattr(cfg.pacore, "rounds", None))
            results[label][mode] = res
            mine.update(res.metrics(prefix=f"{mode}/"))
        seconds[label] = time.perf_counter() - t0
        log.info("evaluated %s (%s) in %.1fs: %s", label, uri, seconds[label],
                 ", ".join(f"{m} {mine.get(f'{m}/mean_accuracy', 0.0):.3f}" for m in modes))
        per_model[label] = mine
        metrics.update(mine if single else {f"{label}/{k}": v for k, v in mine.items()})
        (out / label).mkdir(exist_ok=True)
        (out / label / "metrics.json").write_text(json.dumps(mine, indent=1, sort_keys=True))
        del engine, lm  # let go of this model before the next one loads: one at a time on the GPU
        if is_s3_uri(uri):  # and on the pod's disk (at 10B, 38 GiB each)
            RemoteFiles(uri).drop()

    cont = None
    if cfg.eval.contamination_check:
        cont = contamination.check(data_dir, dataset)
        metrics.update({"contamination/duplicates": float(cont.count), "contamination/eval_records": float(cont.n_eval)})
        if cont.count:
            log.warning("contamination: %d eval record(s) also occur in training data", cont.count)
    metrics["eval_records"] = float(len(records))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    plot = plot_progression(results, modes, out / "progression.png") if len(models) > 1 else None
    md = report_markdown(models, results, modes, dataset, len(records), seconds, cont)
    report = out / "report.md"
    report.write_text(md)
    html_path = out / "report.html"
    html_path.write_text(report_html(md, plot))
    tracking.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
    for p in (report, html_path, plot):
        if p is not None:
            tracking.log_artifact(str(p))
    return EvalOutputs(metrics, report, results, html_path, plot, cont, per_model)


# --------------------------------------------------------------------------- report


def report_markdown(models: dict[str, str], results: dict[str, dict[str, Any]], modes: tuple[str, ...],
                    dataset: str, n: int, seconds: dict[str, float], cont: Any) -> str:
    """The stage x family table per mode (accuracy), the models evaluated, the contamination check."""
    labels = list(models)
    fams = sorted({f for r in results.values() for res in r.values() for f in res.families})
    lines = [f"# Evaluation on `{dataset}`", "", f"{n} verifiable records, {len(fams)} task families, "
             f"modes: {', '.join(modes)}. Accuracy per family (share of records whose verifier passes).", ""]
    for mode in modes:
        lines += [f"## {mode}", "", "| family | n | " + " | ".join(labels) + " |",
                  "|---|---:|" + "---:|" * len(labels)]
        for fam in fams:
            nfam = next((r[mode].families[fam].n for r in results.values() if fam in r[mode].families), 0)
            cells = [f"{r[mode].families[fam].accuracy:.3f}" if fam in r[mode].families else "–"
                     for r in (results[label] for label in labels)]
            lines.append(f"| {fam} | {nfam} | " + " | ".join(cells) + " |")
        means = [f"**{results[label][mode].metrics().get('mean_accuracy', 0.0):.3f}**" for label in labels]
        lines += ["| **mean** | | " + " | ".join(means) + " |", ""]
    lines += ["## Models", "", "| label | checkpoint | eval time |", "|---|---|---:|"]
    lines += [f"| {label} | `{uri}` | {seconds.get(label, 0.0):.1f}s |" for label, uri in models.items()]
    lines.append("")
    if cont is not None:
        lines.append(cont.to_markdown())
    return "\n".join(lines) + "\n"


def report_html(markdown: str, plot: Path | None) -> str:
    """The Markdown report as an HTML page (headings, tables, paragraphs) with the progression plot embedded."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-:") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if m := re.match(r"^(#+) (.*)", line):
            out.append(f"<h{len(m[1])}>{inline(m[2])}</h{len(m[1])}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    body = "\n".join(out)
    if plot is not None and plot.is_file():
        png = base64.b64encode(plot.read_bytes()).decode()
        body += f'\n<h2>Stage progression</h2><img alt="accuracy per stage" src="data:image/png;base64,{png}"/>'
    return ("<html><head><meta charset='utf-8'><title>step3vl evaluation</title>"
            "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
            f"</head><body>\n{body}\n</body></html>\n")


def plot_progression(results: dict[str, dict[str, Any]], modes: tuple[str, ...], path: Path) -> Path:
    """Accuracy per family (and the mean) across the models in stage order, one panel per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fams = sorted({f for r in results.values() for res in r.values() for f in res.families})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for fam in fams:
            ys = [results[s][mode].families[fam].accuracy if fam in results[s][mode].families else float("nan")
                  for s in labels]
            ax.plot(labels, ys, "o-", lw=1, ms=3, label=fam)
        ax.plot(labels, [results[s][mode].metrics().get("mean_accuracy", float("nan")) for s in labels], "k-",
                lw=2.5, label="mean")
        ax.set_title(f"{mode}: accuracy per stage")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
