"""Data prep stage: deterministic synthetic sets, the gate in front of everything, packed shards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from step3vl import config
from step3vl.config import PipelineConfig
from step3vl.data.gate import GateFailed, dataset_hashes
from step3vl.data.pack import IGNORE_INDEX, PackedDataset
from step3vl.model.processor import ImageProcessor
from step3vl.model.tokenizer import load_tokenizer
from step3vl.stages import data
from step3vl.storage import verify_dir

ROOT = Path(__file__).resolve().parent.parent


def test_manifest_covers_every_set(micro_cfg, micro_data):
    m = json.loads((micro_data.out_dir / "data_manifest.json").read_text())
    assert set(m["sets"]) == set(micro_cfg.data.sets)
    for name, info in m["sets"].items():
        assert info["gate"]["passed"], name
        assert len(info["content_hash"]) == 64
        spec = micro_cfg.data.sets[name]
        assert info["rows_per_task"] == {f: s.n for f, s in sorted(spec.families.items())}
    assert (micro_data.tokenizer_dir / "tokenizer.json").is_file()
    for packed in ("pretrain_broad", "pretrain_hq", "sft_stage1", "sft_stage2", "eval-all", "eval-assistant"):
        verify_dir(micro_data.packed(packed))


def test_train_sets_never_contain_eval_content(micro_cfg, micro_data):
    eval_hashes = dataset_hashes(micro_data.raw("eval"))
    for name, spec in micro_cfg.data.sets.items():
        if spec.split == "train":
            assert not (dataset_hashes(micro_data.raw(name)) & eval_hashes), name


def test_generate_is_byte_identical_for_the_same_seed(micro_cfg, tmp_path):
    a = data.generate(micro_cfg, tmp_path / "a", progress=False)
    b = data.generate(micro_cfg, tmp_path / "b", progress=False)
    assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()}
    other = config.load(PipelineConfig, ROOT / "tests/conf/micro.yaml", ["data.seed=1"])
    c = data.generate(other, tmp_path / "c", progress=False)
    assert a["sft_stage1"]["sha256"] != c["sft_stage1"]["sha256"]


def test_sft_loss_only_on_assistant_tokens(micro_cfg, micro_data):
    tok = load_tokenizer(micro_data.tokenizer_dir)
    ds = PackedDataset(micro_data.packed("sft_stage1"), ImageProcessor(micro_cfg.model.vision))
    b = ds.batch([(0, 0)])
    ids, labels = b.input_ids[0].tolist(), b.labels[0].tolist()
    text_all = tok.decode(ids, skip_special_tokens=False)
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert "<|im_start|>user" in text_all and "user" not in trained
    assert trained.count("<|im_end|>") == text_all.count("<|im_start|>assistant")
    # pre-training trains on every text token but never on image placeholders
    pre = PackedDataset(micro_data.packed("pretrain_broad"), ImageProcessor(micro_cfg.model.vision))
    pb = pre.batch([(0, r) for r in range(4)])
    img = pb.input_ids == tok.convert_tokens_to_ids("<im_patch>")
    assert img.any() and (pb.labels[img] == IGNORE_INDEX).all()


def test_a_failing_gate_stops_the_stage_and_writes_its_report(micro_cfg, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    rec = {"id": "x1", "task": "t", "split": "train", "images": ["images/missing.png"],
           "messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "ok"}]}
    (bad / "data-00000.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    cfg = config.load(PipelineConfig, ROOT / "tests/conf/micro.yaml", [f"data.sets.sft_stage2.path={bad}"])
    out = tmp_path / "out"
    with pytest.raises(GateFailed):
        data.run(cfg, out, progress=False)
    report = (out / "reports" / "sft_stage2.md").read_text()
    assert "unique_ids" in report and "images_decode" in report and "x1" in report
    assert not (out / "packed").exists()


def test_cli_validate_names_failing_checks(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data-00000.jsonl").write_bytes(
        b'{"id": "a", "task": "t", "split": "train", "images": [], "messages": [{"role": "user", "content": "q"},'
        b' {"role": "assistant", "content": ""}]}\n\xff\xfe not utf8\n')
    p = subprocess.run([sys.executable, "-m", "step3vl.cli", "data", "validate", str(d)], capture_output=True, text=True)
    assert p.returncode == 1
    assert "no_empty_turns" in p.stdout and "parse" in p.stdout and "`a`" in p.stdout
    assert "data gate failed" in p.stderr


def test_data_prep_manifest_is_byte_identical_across_runs(micro_cfg, micro_data, tmp_path):
    again = data.run(micro_cfg, tmp_path / "again", progress=False)
    assert (again.out_dir / "data_manifest.json").read_bytes() == (micro_data.out_dir / "data_manifest.json").read_bytes()


def test_the_tokenizer_corpus_is_every_training_text_or_a_bounded_share_of_each_set(micro_cfg, micro_data,
                                                                                     monkeypatch):
    from step3vl.config import ConfigError, from_dict
    from step3vl.data import io
    from step3vl.model.tokenizer import build_tokenizer

    dirs = [micro_data.raw(n) for n, s in micro_cfg.data.sets.items() if s.split == "train"]
    every = []
    for d in dirs:
        for raw in io.iter_records(d):
            every += [m["content"].replace("<image>", "") for m in raw.record.get("messages", [])]
            every += [raw.record[k] for k in ("chosen", "rejected") if k in raw.record]
    assert list(data._corpus(dirs)) == every

    read: list[str] = []
    real = io.iter_records

    def counted(d, **kw):
        for raw in real(d, **kw):
            read.append(raw.record["id"])
            yield raw

    monkeypatch.setattr(io, "iter_records", counted)
    some = list(data._corpus(dirs, 60))
    assert 60 - len(dirs) <= len(some) <= 60 and set(some) <= set(every)
    firsts = {d: next(real(d)).record for d in dirs}  # every set gives its first text
    assert all(r["messages"][0]["content"].replace("<image>", "") in some for r in firsts.values()), firsts
    assert len(read) < len(every) / 4  # the sets' other records are never read
    assert len(build_tokenizer(micro_cfg.model.tokenizer, corpus=iter(some))) > 300
    with pytest.raises(ConfigError, match="'data.tokenizer_max_texts' must be >= 0"):
        from_dict(PipelineConfig, {"data": {"tokenizer_max_texts": -1}})
