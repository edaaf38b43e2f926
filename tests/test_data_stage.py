"""Data prep stage: deterministic synthetic sets, the gate in front of everything, packed shards."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from step3vl import config
from step3vl.config import PipelineConfig
from step3vl.data.gate import GateFailed, dataset_hashes
from step3vl.data.io import DataError
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

    names = [n for n, s in micro_cfg.data.sets.items() if s.split == "train"]
    sets = [data._RawSet(micro_data.out_dir, n) for n in names]
    every = []
    for n in names:
        for raw in io.iter_records(micro_data.raw(n)):
            every += [m["content"].replace("<image>", "") for m in raw.record.get("messages", [])]
            every += [raw.record[k] for k in ("chosen", "rejected") if k in raw.record]
    assert list(data._corpus(sets)) == every

    firsts = {n: next(io.iter_records(micro_data.raw(n))).record for n in names}  # every set gives its first text
    read: list[str] = []
    real = io.iter_shard

    def counted(shard, **kw):
        for raw in real(shard, **kw):
            read.append(raw.record["id"])
            yield raw

    monkeypatch.setattr(io, "iter_shard", counted)
    some = list(data._corpus(sets, 60))
    assert 60 - len(sets) <= len(some) <= 60 and set(some) <= set(every)
    assert all(r["messages"][0]["content"].replace("<image>", "") in some for r in firsts.values()), firsts
    assert len(read) < len(every) / 4  # the sets' other records are never read
    assert len(build_tokenizer(micro_cfg.model.tokenizer, corpus=iter(some))) > 300
    with pytest.raises(ConfigError, match="'data.tokenizer_max_texts' must be >= 0"):
        from_dict(PipelineConfig, {"data": {"tokenizer_max_texts": -1}})


@pytest.fixture(scope="module")
def one_shard_parts(micro_cfg, tmp_path_factory):
    """Data prep of micro with every input shard a part of its own."""
    cfg = config.load(PipelineConfig, ROOT / "tests/conf/micro.yaml", ["data.part_shards=1"])
    return data.run(cfg, tmp_path_factory.mktemp("parts"), progress=False)


def test_a_set_in_parts_passes_the_same_gate_and_packs_the_same_samples(micro_cfg, micro_data, one_shard_parts):
    whole, parts = micro_data.manifest["sets"], one_shard_parts.manifest["sets"]
    plan = json.loads((one_shard_parts.out_dir / "plan.json").read_text())
    n_shards = {n: len(list((micro_data.raw(n)).glob("*.jsonl"))) for n in whole}
    assert [p["set"] for p in plan["parts"]] == [n for n in micro_cfg.data.sets for _ in range(n_shards[n])]
    assert max(n_shards.values()) > 1  # some set really is in several parts
    assert not (one_shard_parts.out_dir / "prep").exists()
    for name, info in whole.items():
        for key in ("content_hash", "n_records", "rows_per_task", "gate"):
            assert parts[name][key] == info[key], (name, key)
        hashes = [sorted((d.out_dir / "hashes" / name).glob("*.txt")) for d in (one_shard_parts, micro_data)]
        assert [len(h) for h in hashes] == ([n_shards[name], 1] if info["split"] == "train" else [0, 0])
        assert sorted(h for f in hashes[0] for h in f.read_text().split()) == \
            sorted(h for f in hashes[1] for h in f.read_text().split())
        for packed, counts in info.get("packed", {}).items():
            got = parts[name]["packed"][packed]
            assert {k: got[k] for k in ("samples", "tokens", "loss_tokens")} == \
                {k: counts[k] for k in ("samples", "tokens", "loss_tokens")}, packed
            index = json.loads((one_shard_parts.packed(packed) / "index.json").read_text())
            assert [s["file"] for s in index["shards"]] == [f"pack-{i:05d}.safetensors"
                                                           for i in range(len(index["shards"]))]
            assert sum(s["rows"] for s in index["shards"]) == got["rows"] == index["rows"]
            verify_dir(one_shard_parts.packed(packed))
    # every record of a set in parts is packed once: the same records, in another order
    tok = load_tokenizer(one_shard_parts.tokenizer_dir)
    a = PackedDataset(micro_data.packed("pretrain_broad"), ImageProcessor(micro_cfg.model.vision))
    b = PackedDataset(one_shard_parts.packed("pretrain_broad"), ImageProcessor(micro_cfg.model.vision))
    assert n_shards["pretrain_broad"] > 1

    def samples(ds):
        out = []
        for i in range(ds.n_shards):
            sh = ds.shard(i)
            for ids, seg in zip(sh["input_ids"].tolist(), sh["segment_ids"].tolist()):
                for s in set(seg) - {0}:
                    out.append(tok.decode([t for t, g in zip(ids, seg) if g == s]))
        return sorted(out)

    assert samples(a) == samples(b)


def test_the_gate_judges_a_set_across_its_parts(micro_cfg, tmp_path):
    """An id repeated in another part, and an unreadable line, fail the set; its other parts are not packed alone."""
    src = tmp_path / "user"
    src.mkdir()
    recs = [{"id": f"r{i}", "task": "t", "split": "train", "images": [],
             "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    (src / "data-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    (src / "data-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [recs[2], recs[0]]))
    (src / "data-00002.jsonl").write_text(json.dumps(recs[3]) + "\nnot json\n")
    (src / "data-00003.jsonl").write_text("{not json\n")  # a part with no readable line at all
    cfg = config.load(PipelineConfig, ROOT / "tests/conf/micro.yaml",
                      [f"data.sets.sft_stage2.path={src}", "data.part_shards=1"])
    out = tmp_path / "out"
    with pytest.raises(GateFailed) as err:
        data.run(cfg, out, progress=False)
    report = err.value.report
    assert report.path.endswith("raw/sft_stage2") and not report.passed
    assert report.check("unique_ids").example_ids == ["r0", "r0"]
    assert report.check("parse").example_ids == ["data-00002.jsonl:2", "data-00003.jsonl:1"]
    assert [c.name for c in report.failed_checks] == ["parse", "unique_ids"]  # no check errs on the empty part
    parts = json.loads((out / "plan.json").read_text())["parts"]
    mine = [i for i, p in enumerate(parts) if p["set"] == "sft_stage2"]
    assert len(mine) == 4
    done = [json.loads((out / "prep" / "parts" / f"{i:05d}" / "part.json").read_text()) for i in mine]
    assert [d["unreadable_records"] for d in done] == [0, 0, 1, 1]
    assert not (out / "prep" / "parts" / f"{mine[2]:05d}" / "packed").exists()
    assert (out / "prep" / "parts" / f"{mine[0]:05d}" / "packed" / "sft_stage2").is_dir()
    assert not (out / "packed").exists() and not (out / "MANIFEST.json").exists()


def test_merge_refuses_a_part_that_was_not_prepared(micro_cfg, tmp_path):
    out = tmp_path / "out"
    n = len(data.plan(micro_cfg, out, progress=False)["parts"])
    for i in range(n):
        if i != 2:
            data.prepare_part(micro_cfg, out, i, progress=False)
    with pytest.raises(DataError, match=r"part 2 of data prep \(set \w+, \d+ shards\) was not prepared"):
        data.merge(micro_cfg, out, progress=False)
    assert not (out / "MANIFEST.json").exists() and not (out / "data_manifest.json").exists()
    with pytest.raises(DataError, match=f"no part {n} "):
        data.prepare_part(micro_cfg, out, n, progress=False)
    data.prepare_part(micro_cfg, out, 2, progress=False)
    done = data.merge(micro_cfg, out, progress=False)
    verify_dir(done.out_dir)
    with pytest.raises(config.ConfigError, match="'data.part_shards' must be >= 0"):
        config.from_dict(PipelineConfig, {"data": {"part_shards": -1}})


def test_a_published_sets_content_hash_is_read_from_its_manifest(micro_data, tmp_path):
    from step3vl.data.gate import check_scan, scan_dataset
    from step3vl.data.io import dataset_sha256, dataset_sha256_of_manifest
    from step3vl.storage import publish_dir

    manifest = publish_dir(micro_data.raw("sft_stage1"), tmp_path / "pub")
    assert dataset_sha256_of_manifest(manifest) == dataset_sha256(micro_data.raw("sft_stage1"))
    shard = next((tmp_path / "pub").glob("*.jsonl"))
    shard.write_bytes(shard.read_bytes().replace(b'"', b"'", 1))
    assert dataset_sha256(tmp_path / "pub") != dataset_sha256_of_manifest(manifest)
    # a scan without token lengths cannot be judged on them (it would pass every record)
    df = scan_dataset(micro_data.raw("sft_stage1"))
    with pytest.raises(ValueError, match="max_tokens needs token lengths"):
        check_scan(df, "sft_stage1", max_tokens=10)
    assert check_scan(df, "sft_stage1").passed


def test_the_same_data_packed_otherwise_is_published_apart(micro_cfg, micro_data, tmp_path):
    """What data prep publishes is addressed by its content, not by its sets and tokenizer alone: a run that packs
    the same data for another sequence length must not be handed the first run's packed shards."""
    import shutil

    from step3vl.storage import read_manifest, seal_dir

    root = str(tmp_path / "root")
    uri = data.publish(micro_data.out_dir, root)
    again = tmp_path / "again"
    shutil.copytree(micro_data.out_dir, again)
    (again / "timings.json").write_text('{"total": 1.0}')  # per run, as the reports are
    seal_dir(again)
    assert data.publish(again, root) == uri  # reused, not published twice
    other = data.run(config.load(PipelineConfig, ROOT / "tests/conf/micro.yaml", ["pretrain.seq_len=96"]),
                     tmp_path / "other", progress=False)
    assert other.manifest["sets"]["pretrain_hq"]["content_hash"] == \
        micro_data.manifest["sets"]["pretrain_hq"]["content_hash"]
    other_uri = data.publish(other.out_dir, root)
    assert other_uri.split("/")[-2] != uri.split("/")[-2]
    index = json.loads((Path(other_uri) / "packed" / "pretrain_hq" / "index.json").read_text())
    assert index["seq_len"] == 96 and read_manifest(other_uri) == read_manifest(other.out_dir)


def test_the_steps_run_apart_as_pipeline_tasks_do(micro_cfg, micro_data, tmp_path):
    """Plan, parts and merge each in a folder of their own (a KFP task's output), the plan and the parts only read:
    the same data directory as data prep in one process; parts handed in another order are refused."""
    plan_dir = tmp_path / "plan"
    n = len(data.plan(micro_cfg, plan_dir, progress=False)["parts"])
    parts = [data.prepare_part(micro_cfg, plan_dir, i, out=tmp_path / f"part{i}", progress=False) for i in range(n)]
    before = {p: sorted(q.relative_to(p) for q in p.rglob("*")) for p in [plan_dir, *parts]}
    with pytest.raises(DataError, match=r"part 0 of data prep .* was not prepared \(it holds set \w+ part 0\)"):
        data.merge(micro_cfg, tmp_path / "bad", plan_dir=plan_dir, parts=[parts[1], parts[0], *parts[2:]],
                   progress=False)
    with pytest.raises(DataError, match=f"plans {n} parts; {n - 1} were given"):
        data.merge(micro_cfg, tmp_path / "bad", plan_dir=plan_dir, parts=parts[1:], progress=False)
    done = data.merge(micro_cfg, tmp_path / "data", plan_dir=plan_dir, parts=parts, progress=False)
    manifest = "data_manifest.json"
    assert (done.out_dir / manifest).read_bytes() == (micro_data.out_dir / manifest).read_bytes()
    verify_dir(done.out_dir)
    assert not (done.out_dir / "prep").exists()
    assert {p: sorted(q.relative_to(p) for q in p.rglob("*")) for p in [plan_dir, *parts]} == before
    for packed in ("pretrain_broad", "eval-assistant"):
        assert [p.read_bytes() for p in sorted(done.packed(packed).glob("*.safetensors"))] == \
            [p.read_bytes() for p in sorted(micro_data.packed(packed).glob("*.safetensors"))]
