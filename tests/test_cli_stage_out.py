"""`step3vl stage … --out`: an s3:// output reaches the stage function as the URI it is."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import MICRO
from typer.testing import CliRunner


@pytest.mark.parametrize("stage, target", [("pretrain", "step3vl.stages.train.run_training"),
                                           ("rlvr", "step3vl.stages.rl.run_rl"),
                                           ("pacore", "step3vl.stages.pacore.run")])
def test_stage_out_keeps_an_s3_uri_whole(stage: str, target: str, tmp_path, monkeypatch) -> None:
    from step3vl.cli import app

    seen: list[Any] = []

    class Stop(Exception):
        pass

    def fake(*args: Any, **kwargs: Any) -> None:
        seen.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(target, fake)
    res = CliRunner().invoke(app, ["stage", stage, "--config", str(MICRO), "--data", str(tmp_path),
                                   "--out", "s3://bucket/runs/x", "--init", str(tmp_path / "init"), "--no-tracking"])
    assert isinstance(res.exception, Stop), res.output
    (args, kwargs), = seen
    assert "s3://bucket/runs/x" in list(args) + list(kwargs.values())
