"""Evaluation: the stage x family x mode report of several models, the contamination check (a planted
duplicate is reported), the modes and their hooks, and the ``step3vl eval`` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from step3vl.errors import Step3VLError


@pytest.fixture(scope="module")
def checkpoints(micro_cfg, tmp_path_factory):
    from step3vl.serve.tiny import random_checkpoint

    d = tmp_path_factory.mktemp("ckpts")
    return {"base": random_checkpoint(d / "a", micro_cfg.model, seed=0),
            "sft": random_checkpoint(d / "b", micro_cfg.model, seed=1)}


def test_data_prep_records_the_content_hashes_of_every_training_set_as_written(micro_cfg, micro_data):
    from step3vl.data.gate import dataset_hashes

    src = Path(micro_data.out_dir)
    train = sorted(n for n, s in micro_cfg.data.sets.items() if s.split == "train")
    assert sorted(p.name for p in (src / "hashes").iterdir()) == train
    for name in train:
        files = sorted((src / "hashes" / name).iterdir())
        assert [f.name for f in files] == ["part-00000.txt"], name  # micro: one part per set
        lines = files[0].read_text().splitlines()
        assert lines == sorted(dataset_hashes(src / "raw" / name)), name


def test_contamination_check_reports_a_planted_duplicate(micro_data, tmp_path):
    from step3vl.data.gate import content_hash
    from step3vl.data.io import DataError
    from step3vl.eval import contamination

    src = Path(micro_data.out_dir)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(src / "data_manifest.json", data)
    shutil.copytree(src / "raw" / "eval", data / "raw" / "eval")
    shutil.copytree(src / "hashes", data / "hashes")
    clean = contamination.check(data)
    assert clean.count == 0 and clean.n_eval == 70 and "sft_stage1" in clean.train_sets and "eval" not in clean.train_sets
    # a training set holding one text-only eval record (new id, same content): its hash is in its hashes file
    line = next(ln for ln in (data / "raw" / "eval").glob("*.jsonl").__next__().read_text().splitlines()
                if '"task": "text_math"' in ln or '"task":"text_math"' in ln)
    rec = json.loads(line)
    planted = content_hash({**rec, "id": "planted-duplicate", "split": "train"}, data / "raw" / "eval")
    with (data / "hashes" / "sft_stage1" / "part-00001.txt").open("w") as f:  # a set's second part
        f.write(planted + "\n")
    dirty = contamination.check(data)
    assert dirty.count == 1 and dirty.duplicates == {rec["id"]: ["sft_stage1"]}
    assert f"`{rec['id']}` | sft_stage1" in dirty.to_markdown()
    shutil.rmtree(data / "hashes" / "pretrain_hq")
    with pytest.raises(DataError, match=r"hashes/pretrain_hq: no content hashes of training set pretrain_hq"):
        contamination.check(data)


def test_evaluate_models_stage_family_mode_table(micro_cfg, micro_data, checkpoints, tmp_path):
    from step3vl.stages.evaluate import evaluate_models

    out = evaluate_models(micro_cfg, micro_data.out_dir, checkpoints, tmp_path / "ev", per_family=3, progress=False)
    fams = {"text_math", "mm_math", "perception_count", "chat"}
    assert set(out.results) == {"base", "sft"} and all(set(r) == {"greedy", "sere"} for r in out.results.values())
    for label in ("base", "sft"):
        for mode in ("greedy", "sere"):
            res = out.results[label][mode]
            assert set(res.families) == fams and all(f.n == 3 for f in res.families.values())
            for fam, f in res.families.items():
                assert out.metrics[f"{label}/{mode}/{fam}/accuracy"] == pytest.approx(f.correct / 3)
        per = json.loads((tmp_path / "ev" / label / "metrics.json").read_text())
        assert per == out.per_model[label] and "greedy/text_math/accuracy" in per  # what the registry reads
    assert out.metrics["contamination/duplicates"] == 0 and out.metrics["eval_records"] == 12
    md = out.report.read_text()
    assert "| family | n | base | sft |" in md and md.count("| text_math | 3 |") == 2  # one table per mode
    assert "## Contamination check" in md and "0 of 70 records" in md
    page = out.html.read_text()
    assert "<table>" in page and "data:image/png;base64," in page and out.plot.stat().st_size > 1000
    # greedy is deterministic: the same model evaluated again gives the same numbers
    again = evaluate_models(micro_cfg, micro_data.out_dir, {"base": checkpoints["base"]}, tmp_path / "ev2",
                            modes=("greedy",), per_family=3, progress=False)
    assert again.metrics["greedy/mean_accuracy"] == out.metrics["base/greedy/mean_accuracy"]
    assert again.plot is None  # one model: no progression


def test_evaluate_models_holds_one_model_at_a_time(micro_cfg, micro_data, checkpoints, tmp_path, monkeypatch):
    """Each model is let go before the next one loads: the evaluate pod's GPU holds one at a time (at 10B in fp32,
    38 GiB rather than 76 while the next one loads)."""
    import weakref

    from step3vl.model import loading
    from step3vl.stages.evaluate import evaluate_models

    alive, real = [], loading.load_model

    def load(uri, **kw):
        assert all(ref() is None for ref in alive), "the previous model is still held"
        lm = real(uri, **kw)
        alive.append(weakref.ref(lm.model))
        return lm

    monkeypatch.setattr(loading, "load_model", load)
    evaluate_models(micro_cfg, micro_data.out_dir, checkpoints, tmp_path / "ev", modes=("greedy",), per_family=1,
                    progress=False)
    assert len(alive) == 2


def test_modes_and_their_hooks(micro_cfg):
    from step3vl import config
    from step3vl.eval import modes, suite

    assert modes.check_mode("majority@8") == "majority@8"
    with pytest.raises(Step3VLError, match="unknown evaluation mode 'best'"):
        modes.check_mode("best")
    with pytest.raises(config.ConfigError, match="eval.modes"):
        config.from_dict(config.PipelineConfig, {**config.to_dict(micro_cfg), "eval": {"modes": ["majority@0"]}})
    for mode, hook in (("pacore", "evaluate_pacore"), ("majority@4", "evaluate_majority")):
        if not hasattr(suite, hook):
            with pytest.raises(Step3VLError, match=f"suite.{hook}"):
                modes.run_mode(mode, None, [], ".", seed=0)


def test_eval_cli_writes_metrics_and_logs_to_the_active_run(micro_data, checkpoints, tmp_path, monkeypatch):
    import mlflow
    from typer.testing import CliRunner

    from step3vl.cli import app

    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    micro = Path(__file__).parent / "conf" / "micro.yaml"
    try:
        from step3vl import config, tracking

        tracking.setup(config.load(config.PipelineConfig, micro).tracking)
        with mlflow.start_run() as run:
            pass
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        res = CliRunner().invoke(app, ["eval", "--model", checkpoints["sft"], "--config", str(micro), "--data",
                                       str(micro_data.out_dir), "--mode", "greedy", "--per-family", "2",
                                       "--out", str(tmp_path / "out")])
        assert res.exit_code == 0, res.output
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert set(metrics) >= {"greedy/text_math/accuracy", "greedy/mean_accuracy", "contamination/duplicates"}
        assert "text_math" in res.output and "contamination: 0 of 70" in res.output
        logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
        assert logged["greedy/mean_accuracy"] == metrics["greedy/mean_accuracy"]
    finally:
        mlflow.set_tracking_uri(None)


def test_eval_cli_reads_a_registered_versions_own_data(micro_cfg, micro_data, checkpoints, tmp_path, monkeypatch):
    """``step3vl eval --model models:/…`` without ``--data`` evaluates on the data the version's lineage records (as
    a pipeline run registers it), checked against the version's eval-set hash; without such a record it needs a data
    prep output at the default place, and says so."""
    import mlflow
    from typer.testing import CliRunner

    from step3vl import registry
    from step3vl.cli import app
    from step3vl.stages.data import read_data_manifest
    from step3vl.stages.release import data_location

    home = tmp_path / "home"
    monkeypatch.setenv("STEP3VL_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    micro = Path(__file__).parent / "conf" / "micro.yaml"
    name = micro_cfg.tracking.registered_model
    hashes = registry.data_hashes(read_data_manifest(micro_data.out_dir))
    assert hashes["eval"]

    def register(**kw) -> str:
        mv = registry.register_final(name, checkpoints["sft"], metrics={}, stage="sft", config_hash="c",
                                     commit="deadbeef", **kw)
        return f"models:/{name}/{mv.version}"

    def evaluate(model: str, out: str):
        return CliRunner().invoke(app, ["eval", "--model", model, "--config", str(micro), "--mode", "greedy",
                                        "--per-family", "2", "--out", str(tmp_path / out)], terminal_width=400)

    try:
        recorded = register(data_manifest_hashes=hashes, data_uri=data_location(micro_data.out_dir))
        assert registry.registered_data(recorded) == registry.RegisteredData(
            str(Path(micro_data.out_dir).resolve()), hashes)
        res = evaluate(recorded, "ok")
        assert res.exit_code == 0, res.output
        assert f"from {recorded}'s lineage" in res.output and "contamination: 0 of 70" in res.output
        assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["greedy/text_math/n"] == 2

        # the recorded location now holds another eval set than the version was registered with
        other = register(data_manifest_hashes={**hashes, "eval": "0" * 64}, data_uri=data_location(micro_data.out_dir))
        res = evaluate(other, "other")
        assert isinstance(res.exception, Step3VLError), res.output
        assert "is not the one" in str(res.exception) and "0" * 64 in str(res.exception)
        assert not (tmp_path / "other").exists()

        gone = register(data_manifest_hashes=hashes, data_uri=str(tmp_path / "deleted"))
        res = evaluate(gone, "gone")
        assert isinstance(res.exception, Step3VLError) and "cannot be read" in str(res.exception), res.output
        assert str(tmp_path / "deleted") in str(res.exception) and "--data" in str(res.exception)

        # no location recorded (registered by hand without --data): the default place, which is empty here
        bare = register(data_manifest_hashes=hashes)
        assert registry.registered_data(bare).uri == ""
        res = evaluate(bare, "bare")
        assert isinstance(res.exception, Step3VLError), res.output
        msg = str(res.exception)
        assert "records no data location" in msg and str(home / "data" / micro_cfg.name) in msg
        assert "step3vl stage data" in msg

        # `step3vl register --data DIR` records both the hashes and the location
        metrics = tmp_path / "metrics.json"
        metrics.write_text("{}")
        res = CliRunner().invoke(app, ["register", "--model-uri", checkpoints["sft"], "--metrics", str(metrics),
                                       "--config", str(micro), "--data", str(micro_data.out_dir)])
        assert res.exit_code == 0, res.output
        latest = registry.describe(name)["versions"][-1]["version"]
        assert registry.registered_data(f"models:/{name}/{latest}") == registry.RegisteredData(
            str(Path(micro_data.out_dir).resolve()), hashes)
        res = CliRunner().invoke(app, ["register", "--model-uri", checkpoints["sft"], "--metrics", str(metrics),
                                       "--config", str(micro), "--data", str(micro_data.out_dir),
                                       "--data-manifest", str(Path(micro_data.out_dir) / "data_manifest.json")])
        assert isinstance(res.exception, Step3VLError) and "not both" in str(res.exception), res.output
    finally:
        mlflow.set_tracking_uri(None)
