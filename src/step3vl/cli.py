"""The ``step3vl`` command line (Typer + rich). Thin: every command calls into the library.

User errors (``Step3VLError``: bad config, bad data, missing/corrupt artifacts) print one line and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

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
    console.print(t)


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
