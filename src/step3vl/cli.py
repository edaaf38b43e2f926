"""The ``step3vl`` command line (Typer + rich). Thin: every command calls into the library.

User errors (``Step3VLError``: bad config, bad data, missing/corrupt artifacts) print one line and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from step3vl.errors import Step3VLError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="step3vl",
    help="The STEP3-VL-10B recipe as a Kubeflow-orchestrated platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Model family: sizes, FLOPs, memory.", no_args_is_help=True)
app.add_typer(model_app, name="model")
data_app = typer.Typer(help="Datasets: generate the synthetic sets, validate any dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")
stage_app = typer.Typer(help="Run one stage directly, outside any pipeline.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file (conf/model/*.yaml or conf/pipeline/*.yaml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: key=value (repeatable).")]


def _model_config(path: Path, overrides: list[str] | None):
    from step3vl import config

    cfg = config.load_any(path, overrides or [])
    return cfg.model if isinstance(cfg, config.PipelineConfig) else cfg


@model_app.command("info")
def model_info_cmd(
    config_path: ConfigOpt,
    overrides: SetOpt = None,
    gpus: Annotated[int, typer.Option(help="GPUs for the ZeRO-3 memory estimate.", min=1)] = 8,
    seq_len: Annotated[int, typer.Option(help="Sequence length for FLOPs and activations.", min=1)] = 4096,
    micro_batch: Annotated[int, typer.Option(help="Sequences per GPU per step.", min=1)] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Build the model on the meta device (no memory) and report parameters, FLOPs/token and memory."""
    from step3vl.model.info import model_info

    info = model_info(_model_config(config_path, overrides), gpus=gpus, seq_len=seq_len, micro_batch=micro_batch)
    if as_json:
        sys.stdout.write(json.dumps(info.to_dict(), indent=2) + "\n")
        return
    t = Table(title=f"{info.name}", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k in ("total_params", "vision_params", "projector_params", "decoder_params"):
        t.add_row(k, f"{getattr(info, k):,} ({getattr(info, k) / 1e9:.3f} B)")
    t.add_row("flops_per_token (train)", f"{info.flops_per_token:.4g}")
    t.add_row("vision_flops_per_image (train)", f"{info.vision_flops_per_image:.4g}")
    t.add_row("image_tokens_per_image", str(info.image_tokens_per_image))
    for k, v in info.memory.items():
        t.add_row(f"{k} (ZeRO-3, {info.gpus} GPUs)", f"{v:.2f}")
    for k, v in info.storage.items():
        t.add_row(f"{k} (on disk)", f"{v:.2f}")
    console.print(t)


def _pipeline_config(path: Path, overrides: list[str] | None):
    from step3vl import config

    return config.load(config.PipelineConfig, path, overrides or [])


def _default_out(cfg, what: str) -> Path:
    from step3vl.tracking import home

    return home() / what / cfg.name


@data_app.command("generate")
def data_generate_cmd(
    config_path: ConfigOpt,
    overrides: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default .step3vl/data/<name>).")] = None,
) -> None:
    """Write every synthetic dataset of a pipeline config (eval sets first, train sets avoiding them)."""
    import time

    from step3vl.stages import data

    cfg = _pipeline_config(config_path, overrides)
    out = out or _default_out(cfg, "data")
    t0 = time.perf_counter()
    summaries = data.generate(cfg, out)
    t = Table(title=f"synthetic datasets → {out / 'raw'}")
    for col in ("set", "records", "images", "skipped (eval dup.)", "seconds", "sha256"):
        t.add_column(col)
    for name, s in summaries.items():
        t.add_row(name, str(s["n_records"]), str(s["n_images"]), str(s.get("skipped_eval_duplicates", 0)),
                  f"{s['seconds']:.1f}", s["sha256"][:16])
    console.print(t)
    console.print(f"generated {sum(s['n_records'] for s in summaries.values())} records in "
                  f"{time.perf_counter() - t0:.1f}s")


@data_app.command("validate")
def data_validate_cmd(
    path: Annotated[Path, typer.Argument(help="Dataset directory (*.jsonl shards + optional images/).")],
    require_answer: Annotated[bool, typer.Option(help="Every record needs an answer (RL and eval sets).")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the report (Markdown) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the Great Expectations data gate on a dataset; exit 1 if any check fails."""
    from step3vl.data.gate import validate_dataset

    rep = validate_dataset(path, require_answer=require_answer)
    if report:
        report.write_text(rep.to_markdown())
    if as_json:
        sys.stdout.write(rep.to_json() + "\n")
    else:
        console.print(rep.to_markdown(), markup=False, highlight=False)
    if not rep.passed:
        err_console.print(f"[bold red]data gate failed:[/] {', '.join(c.name for c in rep.failed_checks)}")
        raise typer.Exit(1)


@stage_app.command("data")
def stage_data_cmd(
    config_path: ConfigOpt,
    overrides: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default .step3vl/data/<name>).")] = None,
) -> None:
    """Data prep: generate/fetch every set, train the tokenizer, gate every set, pack the training sets."""
    from step3vl.stages import data

    cfg = _pipeline_config(config_path, overrides)
    res = data.run(cfg, out or _default_out(cfg, "data"))
    t = Table(title=f"data prep → {res.out_dir}")
    for col in ("set", "purpose", "records", "gate", "packed rows", "padding"):
        t.add_column(col)
    for name, info in res.manifest["sets"].items():
        packed = info.get("packed", {})
        rows = ", ".join(f"{k}: {v['rows']}" for k, v in packed.items())
        pad = ", ".join(f"{v['padding_fraction']:.0%}" for v in packed.values())
        t.add_row(name, info["purpose"], str(info["n_records"]), "pass" if info["gate"]["passed"] else "FAIL", rows, pad)
    console.print(t)
    timings = json.loads((res.out_dir / "timings.json").read_text())
    console.print(f"data prep took {timings['total']:.1f}s")


def _train_stage(stage: str, config_path: Path, overrides, data: Path | None, out: str | None, init: str | None,
                 tracking: bool) -> None:
    import contextlib

    from step3vl import tracking as trk
    from step3vl.stages.train import run_training

    cfg = _pipeline_config(config_path, overrides)
    data = data or _default_out(cfg, "data")
    out = out or str(_default_out(cfg, "runs") / stage)
    if init is None and stage == "sft":
        init = str(_default_out(cfg, "runs") / "pretrain" / "model")
    ctx = trk.stage_run(stage, cfg.tracking, config=cfg) if tracking else contextlib.nullcontext()
    with ctx:
        res = run_training(stage, cfg, data, out, init_uri=init)
    t = Table(title=f"{stage} → {res.model_uri}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    if res.result.resumed_from is not None:
        t.add_row("resumed from step", str(res.result.resumed_from))
    for k, v in res.metrics.items():
        t.add_row(k, f"{v:.4g}")
    console.print(t)


DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Data prep output (default .step3vl/data/<name>).")]
# a URI, not a Path: pathlib would fold s3://bucket/key into the local folder s3:/bucket/key
OutOpt = Annotated[Optional[str], typer.Option("--out", help="Stage output: a directory or s3://bucket/prefix (default .step3vl/runs/<name>/<stage>).")]
TrackOpt = Annotated[bool, typer.Option("--tracking/--no-tracking", help="Log to MLflow.")]


@stage_app.command("pretrain")
def stage_pretrain_cmd(config_path: ConfigOpt, overrides: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
                       init: Annotated[Optional[str], typer.Option(help="Start from this checkpoint.")] = None,
                       tracking: TrackOpt = True) -> None:
    """Unified pre-training (two LR phases, everything unfrozen); resumes from its last checkpoint."""
    _train_stage("pretrain", config_path, overrides, data, out, init, tracking)


@stage_app.command("sft")
def stage_sft_cmd(config_path: ConfigOpt, overrides: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
                  init: Annotated[Optional[str], typer.Option(help="Start from this checkpoint (default: the pretrain stage's model).")] = None,
                  tracking: TrackOpt = True) -> None:
    """Two-stage SFT (9:1 then 1:1 text:multimodal, assistant-token loss); resumes from its last checkpoint."""
    _train_stage("sft", config_path, overrides, data, out, init, tracking)


def _rl_stage(stage: str, config_path: Path, overrides, data: Path | None, out: str | None, init: str | None,
              tracking: bool, message_cache: str | None = None) -> None:
    import contextlib

    from step3vl import tracking as trk

    cfg = _pipeline_config(config_path, overrides)
    data = data or _default_out(cfg, "data")
    out = out or str(_default_out(cfg, "runs") / stage)
    previous = {"rlvr": "sft", "rlhf": "rlvr", "pacore": "rlhf"}[stage]
    init = init or str(_default_out(cfg, "runs") / previous / "model")
    ctx = trk.stage_run(stage, cfg.tracking, config=cfg) if tracking else contextlib.nullcontext()
    with ctx:
        if stage == "rlvr":
            from step3vl.stages.rl import run_rl

            res = run_rl("rlvr", cfg, data, init, out)
            metrics, uri = res.metrics, res.model_uri
            resumed = res.result.resumed_from
        elif stage == "rlhf":
            from step3vl.stages import rlhf

            res = rlhf.run(cfg, data, init, out)
            metrics, uri, resumed = res.metrics, res.model_uri, res.rl.result.resumed_from
        else:
            from step3vl.stages import pacore

            res = pacore.run(cfg, data, init, out, message_cache=message_cache)
            metrics, uri, resumed = res.metrics, res.model_uri, None
    t = Table(title=f"{stage} → {uri}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    if resumed is not None:
        t.add_row("resumed from iteration", str(resumed))
    for k, v in metrics.items():
        t.add_row(k, f"{v:.4g}")
    console.print(t)


InitOpt = Annotated[Optional[str], typer.Option(help="Start from this checkpoint (default: the previous stage's model under .step3vl/runs).")]


@stage_app.command("rlvr")
def stage_rlvr_cmd(config_path: ConfigOpt, overrides: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
                   init: InitOpt = None, tracking: TrackOpt = True) -> None:
    """RLVR: rollouts → verifiable rewards → advantages → PPO updates; resumes from its last checkpoint."""
    _rl_stage("rlvr", config_path, overrides, data, out, init, tracking)


@stage_app.command("rlhf")
def stage_rlhf_cmd(config_path: ConfigOpt, overrides: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
                   init: InitOpt = None, tracking: TrackOpt = True) -> None:
    """RLHF: train the GenRM judge, then RL on its preferences + behaviour regularisation."""
    _rl_stage("rlhf", config_path, overrides, data, out, init, tracking)


@stage_app.command("pacore")
def stage_pacore_cmd(config_path: ConfigOpt, overrides: SetOpt = None, data: DataOpt = None, out: OutOpt = None,
                     init: InitOpt = None, tracking: TrackOpt = True,
                     message_cache: Annotated[Optional[str], typer.Option(help="Reuse and store each step's message sets here (a folder or s3://…), keyed by policy, data and settings; the pipeline uses <storage.root>/pacore-message-cache.")] = None) -> None:
    """PaCoRe training: on-policy message sets, synthesis warm-up, outcome RL (a curriculum of steps)."""
    _rl_stage("pacore", config_path, overrides, data, out, init, tracking, message_cache)


@stage_app.command("exec", hidden=True)
def stage_exec_cmd(stage: Annotated[str, typer.Argument(help="The stage the call belongs to.")]) -> None:
    """Run the stage call a Kubeflow Trainer TrainJob carries in $STEP3VL_CALL (torchrun: on every rank)."""
    import os

    from step3vl.pipeline import trainjob

    spec = json.loads(os.environ[trainjob.CALL_ENV])
    res = trainjob.exec_call(spec)
    console.print(f"{stage}: {res['model_uri']} after {res['step']} steps", highlight=False)
    trainjob.leave_rank()  # a torchrun rank leaves without finalisation (see leave_rank)


def _eval_data(cfg, model: str) -> str | Path:
    """The data ``step3vl eval`` reads when no ``--data`` is given: a registered version's own data (the location
    its lineage records, checked against its eval set's content hash), else ``.step3vl/data/<name>``."""
    from step3vl.stages.data import DATA_MANIFEST, read_data_manifest

    if model.startswith("models:/"):
        from step3vl import registry

        lineage = registry.registered_data(model, cfg.tracking)
        if lineage.uri:
            try:
                sets = read_data_manifest(lineage.uri).get("sets", {})
            except (Step3VLError, OSError, ValueError) as e:  # gone, unreadable or corrupt: say where and what next
                raise Step3VLError(f"{model} records its data at {lineage.uri}, which cannot be read ({e}); "
                                   "pass --data DIR to evaluate on another data prep output") from None
            got, want = sets.get("eval", {}).get("content_hash"), lineage.hashes.get("eval")
            if want and got != want:
                raise Step3VLError(f"the eval set at {lineage.uri} (content hash {got}) is not the one {model} was "
                                   f"registered with ({want}); pass --data DIR to evaluate on other data")
            console.print(f"data: {lineage.uri} (from {model}'s lineage)", highlight=False, soft_wrap=True)
            return lineage.uri
    default = _default_out(cfg, "data")
    if not (default / DATA_MANIFEST).is_file():
        where = "its version records no data location, and " if model.startswith("models:/") else ""
        raise Step3VLError(f"no data to evaluate on: {where}there is no data prep output at {default}; pass "
                           f"--data DIR, or run `step3vl stage data` first")
    return default


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint path, s3://…, models:/NAME@alias or models:/NAME/V.")],
    config_path: Annotated[Optional[Path], typer.Option("--config", "-c", help="Pipeline config (default conf/pipeline/tiny.yaml).")] = None,
    overrides: SetOpt = None,
    mode: Annotated[Optional[list[str]], typer.Option("--mode", help="greedy | sere | majority@K | pacore (repeatable; default: eval.modes).")] = None,
    data: DataOpt = None,
    per_family: Annotated[Optional[int], typer.Option(help="Records per task family (default eval.per_family; 0 = all).", min=0)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where metrics.json and the reports go (default .step3vl/eval/<name>/<time>).")] = None,
) -> None:
    """Evaluate one model on the held-out set: per-family accuracy per mode, metrics.json + report.

    Logs to MLflow when a run is active (``MLFLOW_RUN_ID`` set, e.g. inside a pipeline step)."""
    import contextlib
    import datetime as dt
    import os

    from step3vl.config import PACKAGE_DIR
    from step3vl.stages.evaluate import run as evaluate_run

    cfg = _pipeline_config(config_path or PACKAGE_DIR.parent.parent / "conf" / "pipeline" / "tiny.yaml", overrides)
    data = data or _eval_data(cfg, model)
    out = out or _default_out(cfg, "eval") / f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    ctx: Any = contextlib.nullcontext()
    if os.environ.get("MLFLOW_RUN_ID"):
        import mlflow

        from step3vl import tracking

        tracking.setup(cfg.tracking)
        ctx = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"])
    with ctx:
        res = evaluate_run(cfg, data, model, out, modes=tuple(mode) if mode else None, per_family=per_family)
    modes = list(next(iter(res.results.values())))
    t = Table(title=f"{model} on {res.metrics['eval_records']:.0f} records")
    t.add_column("family")
    for m in modes:
        t.add_column(m, justify="right")
    first = res.results["model"][modes[0]]
    for fam in first.families:
        t.add_row(fam, *[f"{res.results['model'][m].families[fam].accuracy:.3f}" for m in modes])
    t.add_row("mean", *[f"{res.metrics.get(f'{m}/mean_accuracy', 0.0):.3f}" for m in modes])
    console.print(t)
    if res.contamination is not None:
        console.print(f"contamination: {res.contamination.count} of {res.contamination.n_eval} eval records also "
                      "in training data", highlight=False)
    console.print(f"metrics: {out / 'metrics.json'}  report: {res.report}", highlight=False)


# --------------------------------------------------------------------------- the pipeline (KFP)


@app.command("run")
def run_cmd(
    config_path: ConfigOpt,
    overrides: SetOpt = None,
    run_name: Annotated[Optional[str], typer.Option(help="MLflow parent run name (default <config name>-<time>).")] = None,
    from_stage: Annotated[Optional[str], typer.Option(help="Start at this stage, reusing the earlier stages of --resume-from.")] = None,
    resume_from: Annotated[Optional[str], typer.Option(help="An earlier run (MLflow run id or name) whose outputs --from-stage reuses.")] = None,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Reuse outputs of identical earlier tasks.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="No live status; print the run's outputs as one JSON object.")] = False,
    warm_tasks: Annotated[Optional[bool], typer.Option(
        "--warm-tasks/--cold-tasks",
        help="Fork each task from a process that imported the stack once, or start a fresh interpreter per task "
             "(default: $STEP3VL_WARM_TASKS, on).")] = None,
) -> None:
    """Run the whole pipeline on the KFP local runner (embedded mode), tracked in MLflow."""
    from step3vl.pipeline import local, status
    from step3vl.pipeline.dag import pipeline_module

    cfg = _pipeline_config(config_path, overrides)
    module = pipeline_module()
    board = status.StatusBoard(list(module.STAGES), None if as_json else Console(file=sys.stdout))
    failure = None
    with board:
        try:
            res = local.run_local(cfg, run_name=run_name, from_stage=from_stage, resume_from=resume_from, cache=cache,
                                  board=board, warm_tasks=warm_tasks)
        except local.PipelineFailed as e:
            res, failure = e.result, e
    if as_json:
        sys.stdout.write(json.dumps(res.to_dict(), indent=1, sort_keys=True) + "\n")
    else:
        out = console if console.is_terminal else Console(width=max(console.width, 200))  # keep URIs whole in logs
        if failure is not None and failure.tail:
            out.print("\n".join(failure.tail), markup=False, highlight=False)
        out.print(status.summary_table(res, module.KEY_METRICS))
        out.print(f"task logs: {res.log_path}", highlight=False)
    if failure is not None:
        err_console.print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("compile")
def compile_cmd(
    config_path: ConfigOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the compiled KFP v2 YAML.")],
    overrides: SetOpt = None,
) -> None:
    """Compile the pipeline for a KFP cluster, with the resolved config as its default parameter."""
    from step3vl.pipeline.submit import compile_pipeline

    path = compile_pipeline(_pipeline_config(config_path, overrides), out)
    console.print(f"compiled {path}", highlight=False)


@app.command("submit")
def submit_cmd(
    config_path: ConfigOpt,
    host: Annotated[str, typer.Option(help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80.")],
    overrides: SetOpt = None,
    experiment: Annotated[Optional[str], typer.Option(help="KFP experiment (default: tracking.experiment).")] = None,
    run_name: Annotated[Optional[str], typer.Option(help="KFP run name (default <config name>-<time>).")] = None,
    namespace: Annotated[Optional[str], typer.Option(help="Kubeflow profile namespace (multi-user KFP).")] = None,
    mlflow_parent_run_id: Annotated[str, typer.Option(help="Nest the stages' MLflow runs under this run.")] = "",
    from_stage: Annotated[Optional[str], typer.Option(help="Start at this stage, reusing the earlier stages of --resume-from.")] = None,
    resume_from: Annotated[Optional[str], typer.Option(help="An earlier run (MLflow run id or name) whose outputs --from-stage reuses.")] = None,
    executor: Annotated[str, typer.Option(help="Training stages: 'pod' (in the task pod) or 'trainjob' (Kubeflow Trainer).")] = "pod",
) -> None:
    """Compile the pipeline for a cluster and start a run on a KFP API server."""
    import dataclasses

    from step3vl.pipeline.cluster import DEFAULT
    from step3vl.pipeline.submit import submit

    cfg = _pipeline_config(config_path, overrides)
    res = submit(cfg, host=host, experiment=experiment, run_name=run_name, namespace=namespace,
                 mlflow_parent_run_id=mlflow_parent_run_id, from_stage=from_stage, resume_from=resume_from,
                 settings=dataclasses.replace(DEFAULT, executor=executor))
    console.print(f"submitted run {res['run_name']} ({res['run_id']}) to {res['host']}, experiment {res['experiment']}"
                  + (f", reusing {res['reused']} from {resume_from}" if res.get("reused") else ""), highlight=False)


# --------------------------------------------------------------------------- model registry

registry_app = typer.Typer(help="The MLflow model registry: versions, aliases, gate decisions, rollback.",
                           no_args_is_help=True)
app.add_typer(registry_app, name="registry")
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered model name.")]
OptConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="Pipeline config: its tracking and "
                                                      "promotion sections (default: built-in defaults).")]


def _tracking_and_policy(config_path: Path | None, overrides: list[str] | None):
    if config_path is None:
        from step3vl.config import PromotionConfig

        return None, PromotionConfig()
    cfg = _pipeline_config(config_path, overrides)
    return cfg.tracking, cfg.promotion


tracking_app = typer.Typer(help="The MLflow tracking store: journals of stages that lost their server.",
                           no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("replay")
def tracking_replay_cmd(config_path: OptConfigOpt = None) -> None:
    """Send the metrics that stages journaled while the tracking server was gone; their runs end FAILED."""
    from step3vl import tracking as trk

    tcfg, _ = _tracking_and_policy(config_path, None)
    uri = trk.preflight(trk.tracking_uri(tcfg), replay=False)
    done = trk.replay_journals(uri)
    for r in done:
        console.print(f"run {r.run_id}: sent {r.sent} journaled records"
                      + ("; marked FAILED" if r.marked_failed else ""), highlight=False)
    if not done:
        console.print(f"nothing to replay into {trk.display_uri(uri)}", highlight=False)


cache_app = typer.Typer(help="What runs share under storage.root: PaCoRe's message cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("prune")
def cache_prune_cmd(
    older_than: Annotated[float, typer.Option("--older-than", help="Remove the entries last used (reused by a run, or stored) more than this many days ago (0: every entry).", min=0.0)],
    config_path: Annotated[Optional[Path], typer.Option("--config", "-c", help="Pipeline config: the cache is <storage.root>/pacore-message-cache, as the pipeline uses.")] = None,
    overrides: SetOpt = None,
    cache: Annotated[Optional[str], typer.Option(help="The message cache itself (a folder or s3://…), instead of --config.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
) -> None:
    """Remove PaCoRe message-cache entries older than --older-than days. A run that needed one makes its message
    sets again; an entry being stored now is recent, so it stays."""
    import time

    from rich.table import Table

    from step3vl.stages import pacore
    from step3vl.storage import absolute_uri, join_uri

    if (cache is None) == (config_path is None):
        raise Step3VLError("give the pipeline's --config (its cache under storage.root) or the --cache itself, "
                           "not both and not neither")
    if cache is None:
        cache = join_uri(absolute_uri(_pipeline_config(config_path, overrides).storage.root), pacore.MESSAGE_CACHE)
    entries = pacore.cache_entries(cache)
    gone = {e.key for e in pacore.prune_cache(cache, older_than * 86400.0, dry_run=dry_run, entries=entries)}
    t = Table(title=f"{cache}: {len(entries)} entries", title_justify="left")
    for col in ("entry", "last used", "files", "MB", "whole", "action"):
        t.add_column(col, justify="right" if col in ("files", "MB") else "left")
    for e in entries:
        action = ("would remove" if dry_run else "removed") if e.key in gone else "kept"
        t.add_row(e.key[:16], time.strftime("%Y-%m-%d %H:%M", time.localtime(e.used)), str(e.files),
                  f"{e.size / 1e6:.1f}", "yes" if e.whole else "no", action)
    console.print(t)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(gone)} of {len(entries)} entries "
                  f"({sum(e.size for e in entries if e.key in gone) / 1e6:.1f} MB)", highlight=False)


@app.command("register")
def register_cmd(
    model_uri: Annotated[str, typer.Option(help="The published checkpoint (path or s3://) to register.")],
    metrics: Annotated[Path, typer.Option(help="The evaluate stage's metrics.json.")],
    config_path: ConfigOpt,
    overrides: SetOpt = None,
    stage: Annotated[str, typer.Option(help="The stage the checkpoint came from.")] = "final",
    model: Annotated[Optional[str], typer.Option(help="Registered model (default: tracking.registered_model).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="The data prep output (path or s3://) the model was trained and evaluated on: its sets' hashes and its location go into the lineage.")] = None,
    data_manifest: Annotated[Optional[Path], typer.Option(help="Only data prep's data_manifest.json (dataset hashes, no location).")] = None,
    kfp_run_id: Annotated[str, typer.Option(help="The KFP run this model came from.")] = "",
    parent_run_id: Annotated[str, typer.Option(help="The pipeline's MLflow parent run.")] = "",
) -> None:
    """Register a checkpoint as a new model version with its lineage and eval metrics; alias `candidate`."""
    from step3vl import registry
    from step3vl.config import config_hash
    from step3vl.stages.data import read_data_manifest
    from step3vl.stages.release import data_location

    if data and data_manifest:
        raise Step3VLError("pass --data or --data-manifest, not both (--data reads its data_manifest.json itself)")
    cfg = _pipeline_config(config_path, overrides)
    hashes = {}
    if data:
        hashes = registry.data_hashes(read_data_manifest(data))
    elif data_manifest:
        hashes = registry.data_hashes(json.loads(data_manifest.read_text()))
    name = model or cfg.tracking.registered_model
    mv = registry.register_final(name, model_uri, metrics=json.loads(metrics.read_text()), stage=stage,
                                 config_hash=config_hash(cfg), data_manifest_hashes=hashes,
                                 data_uri=data_location(data) if data else "", kfp_run_id=kfp_run_id,
                                 parent_run_id=parent_run_id, tracking=cfg.tracking)
    console.print(f"registered {name} version {mv.version} ({model_uri}); alias candidate → {mv.version}",
                  highlight=False)


@app.command("promote")
def promote_cmd(
    model: ModelOpt,
    version: Annotated[str, typer.Option("--version", "-v", help="The version to promote.")],
    to: Annotated[str, typer.Option(help="The alias to move.")] = "champion",
    config_path: OptConfigOpt = None,
    overrides: SetOpt = None,
    force: Annotated[bool, typer.Option(help="Move the alias even if the gate fails (needs --reason).")] = False,
    reason: Annotated[Optional[str], typer.Option(help="Why the gate is overridden (recorded).")] = None,
    actor: Annotated[Optional[str], typer.Option(help="Who promotes (default $STEP3VL_ACTOR or user@host).")] = None,
) -> None:
    """Gate a version against the current champion and move the alias on a pass; exit 1 when refused."""
    from step3vl import registry

    tracking, policy = _tracking_and_policy(config_path, overrides)
    res = registry.promote(model, version, to, force=force, reason=reason, actor=actor, policy=policy,
                           tracking=tracking)
    verdict = ("forced" if res.forced else "promoted") if res.promoted else (
        "unchanged" if res.previous == res.version else "refused")
    against = f"version {res.previous}" if res.previous else "no champion"
    console.print(f"{model} version {version} → {to}: {verdict} (gated against {against})", highlight=False)
    for r in res.decision.reasons:
        console.print(f"  - {r}", highlight=False, markup=False)
    if not res.promoted and res.previous != res.version:
        err_console.print(f"[bold red]refused:[/] failing families: {', '.join(res.decision.failing_families) or '-'}",
                          highlight=False)
        raise typer.Exit(1)


@registry_app.command("list")
def registry_list_cmd(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="List this model's versions instead.")] = None,
    config_path: OptConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Registered models with their aliases, or one model's versions."""
    from step3vl import registry

    tracking, _ = _tracking_and_policy(config_path, None)
    rows = registry.describe(model, tracking)["versions"] if model else registry.list_models(tracking)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=1, sort_keys=True) + "\n")
        return
    t = Table(title=f"versions of {model}" if model else "registered models")
    if model:
        for col in ("version", "aliases", "stage", "created", "champion gate", "source"):
            t.add_column(col)
        for v in rows:
            t.add_row(v["version"], ",".join(v["aliases"]), v["tags"].get("step3vl.stage", ""), v["created"],
                      registry.version_gate(v).get("decision", ""), v["source"])
    else:
        for col in ("model", "latest version", "aliases"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"], r["latest_version"] or "-", ", ".join(f"{a}→{v}" for a, v in sorted(r["aliases"].items())))
    console.print(t)


@registry_app.command("show")
def registry_show_cmd(
    model: ModelOpt,
    version: Annotated[Optional[str], typer.Option("--version", "-v", help="Every tag of this version.")] = None,
    config_path: OptConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A model's aliases, versions with their gate decisions, and the alias history."""
    from step3vl import registry

    tracking, _ = _tracking_and_policy(config_path, None)
    info = registry.describe(model, tracking)
    if version is not None:
        info = next((v for v in info["versions"] if v["version"] == version), None)
        if info is None:
            raise registry.RegistryError(f"{model} has no version {version}")
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    if version is not None:
        t = Table(title=f"{model} version {version}: {info['source']}")
        t.add_column("tag")
        t.add_column("value", overflow="fold")
        for k, v in info["tags"].items():
            t.add_row(k, v)
        console.print(t)
        return
    console.print(f"{model}: " + (", ".join(f"{a} → {v}" for a, v in sorted(info["aliases"].items())) or "no aliases"),
                  highlight=False)
    t = Table(title="versions")
    for col in ("version", "aliases", "stage", "champion gate", "vs", "failing", "by"):
        t.add_column(col)
    for v in info["versions"]:
        g = registry.version_gate(v)
        decision = g.get("decision", "") + (", rolled back" if "rolled_back" in g else "")
        t.add_row(v["version"], ",".join(v["aliases"]), v["tags"].get("step3vl.stage", ""), decision,
                  g.get("compared_to", ""), g.get("failing_families", ""), g.get("actor", ""))
    console.print(t)
    t = Table(title="alias history")
    for col in ("#", "at", "action", "alias", "version", "previous", "actor", "reason / failing"):
        t.add_column(col)
    for e in info["events"]:
        why = e.get("reason") or ", ".join(e.get("failing", []))
        t.add_row(str(e["seq"]), e["at"][:19], e["action"], e["alias"], e["version"], e.get("previous") or "-",
                  e["actor"], why)
    console.print(t)


@registry_app.command("rollback")
def registry_rollback_cmd(
    model: ModelOpt,
    alias: Annotated[str, typer.Option(help="The alias to move back.")] = "champion",
    to_version: Annotated[Optional[str], typer.Option(help="An earlier holder of the alias (default: the previous one).")] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    actor: Annotated[Optional[str], typer.Option(help="Who rolls back (default $STEP3VL_ACTOR or user@host).")] = None,
    config_path: OptConfigOpt = None,
) -> None:
    """Point the alias back at the version it had before its last promotion."""
    from step3vl import registry

    tracking, _ = _tracking_and_policy(config_path, None)
    res = registry.rollback(model, alias, to_version=to_version, reason=reason, actor=actor, tracking=tracking)
    console.print(f"{model}@{alias} → version {res.version} (was {res.previous})", highlight=False)


@app.command("serve")
def serve_cmd(
    model: Annotated[str, typer.Option(help="Checkpoint: a path, s3://… or models:/NAME@alias.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="STEP3VL_API_KEY",
                                                   help="Require 'Authorization: Bearer KEY' (env STEP3VL_API_KEY).")] = None,
    model_name: Annotated[str, typer.Option(help="Model id clients name (default: the checkpoint's).")] = "",
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.", min=1)] = 1024,
    max_n: Annotated[int, typer.Option(help="Largest n a request may ask for.", min=1)] = 8,
    max_pending: Annotated[int, typer.Option(help="Requests queued or running before 429.", min=1)] = 256,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body (413 above).", min=1)] = 8 << 20,
    max_image_bytes: Annotated[int, typer.Option(help="Largest image file (413 above).", min=1)] = 4 << 20,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image, width x height.", min=1)] = 12_000_000,
) -> None:
    """Serve a checkpoint with an OpenAI-compatible API (torch on CPU; batched across clients)."""
    from step3vl.serve.app import serve
    from step3vl.serve.config import ServeConfig

    cfg = ServeConfig(api_key=api_key or None, model_name=model_name, max_tokens=max_tokens, max_n=max_n,
                      max_pending=max_pending, max_request_bytes=max_request_bytes, max_image_bytes=max_image_bytes,
                      max_image_pixels=max_image_pixels)
    serve(model, host=host, port=port, cfg=cfg)


@app.command("export")
def export_cmd(
    checkpoint: Annotated[str, typer.Option(help="Checkpoint: a path, s3://… or models:/NAME@alias.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (Hugging Face layout for vLLM).")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output directory.")] = False,
) -> None:
    """Export a checkpoint in the layout vLLM's built-in step_vl loads (`vllm serve OUT --trust-remote-code`)."""
    from step3vl.serve.export import export_hf

    res = export_hf(checkpoint, out, dtype=dtype, overwrite=overwrite)
    note = "" if res.vllm_images else " (text only in vLLM: its image processor needs 728/504 px, patch 14)"
    console.print(f"exported {res.n_tensors} tensors to {res.out_dir}{note}", highlight=False)


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except Step3VLError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
