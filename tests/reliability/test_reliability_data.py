"""Hostile inputs end to end: a bad user dataset stops data prep before anything is packed, and a
pickle disguised as safetensors never runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from test_data_gate import append_lines, bomb_png, clean_records, image, make, raw_line, record, text_record

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bad_user_dataset_stops_data_prep_before_anything_is_packed(tmp_path, reliability):
    from step3vl import config
    from step3vl.data.gate import GateFailed
    from step3vl.stages import data
    from step3vl.stages.train import run_training
    from step3vl.storage import NotPublishedError

    image(7, 32).save(tmp_path / "outside.png")  # a valid image just outside the dataset
    ds = make(tmp_path / "user", clean_records(), name="ds")
    (ds / "images" / "bomb.png").write_bytes(bomb_png(30000, 30000))
    dup = raw_line(text_record(13))[:-1] + b', "id": "rec-13-again"}'
    append_lines(
        ds,
        raw_line(record(10, images=["../../outside.png"])),
        raw_line(record(11, images=["/etc/passwd"])),
        raw_line(record(12, images=["images/bomb.png"])),
        dup,
        raw_line(record(14, images=[], messages=[{"role": "user", "content": "x" * (10 << 20)},
                                                 {"role": "assistant", "content": "y"}])),
    )
    cfg = config.load(config.PipelineConfig, ROOT / "tests/conf/micro.yaml",
                      [f"data.sets.user_sft={{purpose: sft, path: {ds}}}"])
    out = tmp_path / "prep"
    with pytest.raises(GateFailed) as err:
        data.run(cfg, out, progress=False)
    report = (out / "reports" / "user_sft.md").read_text()
    failed = json.loads((out / "reports" / "user_sft.json").read_text())
    names = sorted(c["name"] for c in failed["checks"] if not c["passed"])
    assert {"image_paths_safe", "images_decode", "parse"} <= set(names), report
    for needle in ("rec-10", "rec-11", "rec-12", "duplicate JSON key 'id'", "over the 1048576-byte limit"):
        assert needle in report, (needle, report)
    assert "user_sft" in str(err.value)
    assert not (out / "packed").exists(), "nothing may be packed when a set fails the gate"
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["sets"]["user_sft"]["gate"]["passed"] is False
    with pytest.raises(NotPublishedError):  # training finds nothing to consume
        run_training("pretrain", cfg, out, str(tmp_path / "pretrain"), progress=False)
    assert not (tmp_path / "pretrain" / "model").exists()
    reliability.record("bad-data-downstream", outcome=f"GateFailed; failed checks {', '.join(names)}; report names "
                       "rec-10/11/12, the duplicate key and the 10 MB line; no packed/ written; training refused to "
                       "start on the output", data_lost="n/a (refused input)")


def test_pickle_disguised_as_safetensors_never_runs(tmp_path, monkeypatch, reliability):
    import torch

    from step3vl.checkpoint import CheckpointError, latest_valid_checkpoint, load_checkpoint, save_checkpoint
    from step3vl.storage import MANIFEST_NAME, build_manifest

    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def never(*_a, **_k):
        raise AssertionError("something tried to unpickle")

    root = tmp_path / "ckpts"
    save_checkpoint(str(root / "step-000001"), model_state={"w": torch.zeros(4)}, config={})
    evil = root / "step-000002"
    save_checkpoint(str(evil), model_state={"w": torch.ones(4)}, config={})
    (evil / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    # re-sign the manifest, as an attacker with write access would: the checksum check passes
    manifest = build_manifest(evil, json.loads((evil / MANIFEST_NAME).read_text())["meta"])
    (evil / MANIFEST_NAME).write_text(json.dumps(manifest))
    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(pickle, "load", never)
    monkeypatch.setattr(pickle, "loads", never)
    assert latest_valid_checkpoint(root) == str(evil)  # its manifest matches: only loading can tell
    with pytest.raises(CheckpointError, match="model.safetensors of checkpoint .*step-000002") as err:
        load_checkpoint(evil)
    assert not marker.exists(), "the pickle payload ran"
    assert "header" in str(err.value).lower() or "deserializ" in str(err.value).lower(), err.value
    reliability.record("pickle-checkpoint", outcome=f"a pickle named model.safetensors with a matching manifest: "
                       f"load refused (CheckpointError: reading model.safetensors … failed: "
                       f"{str(err.value).rsplit('failed: ', 1)[-1][:60]}), nothing unpickled, payload "
                       "never ran", data_lost="n/a (refused input)")
