"""The installed ``step3vl`` console script: help everywhere, one-line user errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("step3vl", path=str(Path(sys.executable).parent))


def run(*args: str) -> subprocess.CompletedProcess:
    assert EXE, "the step3vl console script is not installed in this venv"
    return subprocess.run([EXE, *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("args", [["--help"], ["model", "--help"], ["model", "info", "--help"]])
def test_help_everywhere(args):
    p = run(*args)
    assert p.returncode == 0 and "Usage" in p.stdout


def test_model_info_tiny_json():
    p = run("model", "info", "--config", "conf/model/tiny.yaml", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["total_params"] > 0


def test_pipeline_config_accepted_for_model_info():
    p = run("model", "info", "-c", "conf/pipeline/tiny.yaml", "--json", "--set", "model.text.hidden_size=64")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["decoder"]["hidden_size"] == 64


@pytest.mark.parametrize(
    "args, needle",
    [
        (["model", "info", "-c", "conf/model/nope.yaml"], "config file not found"),
        (["model", "info", "-c", "conf/model/tiny.yaml", "--set", "text.hidden_sise=3"], "text.hidden_sise"),
        (["model", "info", "-c", "conf/model/tiny.yaml", "--set", "vision.layers=x"], "vision.layers"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, needle):
    p = run(*args)
    assert p.returncode == 2
    assert needle in p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert len([line for line in p.stderr.splitlines() if line.strip()]) <= 3  # rich may soft-wrap one line


@pytest.mark.parametrize("stage, target", [("pretrain", "step3vl.stages.train.run_training"),
                                           ("rlvr", "step3vl.stages.rl.run_rl"),
                                           ("pacore", "step3vl.stages.pacore.run")])
def test_stage_out_keeps_an_s3_uri_whole(stage: str, target: str, tmp_path, monkeypatch) -> None:
    """`step3vl stage … --out s3://…` reaches the stage function as the URI it is (not folded by pathlib)."""
    from typer.testing import CliRunner

    from step3vl.cli import app

    seen: list[Any] = []

    class Stop(Exception):
        pass

    def fake(*args: Any, **kwargs: Any) -> None:
        seen.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(target, fake)
    res = CliRunner().invoke(app, ["stage", stage, "--config", str(ROOT / "tests" / "conf" / "micro.yaml"), "--data", str(tmp_path),
                                   "--out", "s3://bucket/runs/x", "--init", str(tmp_path / "init"), "--no-tracking"])
    assert isinstance(res.exception, Stop), res.output
    (args, kwargs), = seen
    assert "s3://bucket/runs/x" in list(args) + list(kwargs.values())
