"""step3vl.storage and step3vl.checkpoint against a real S3 server (Ceph radosgw, started per session).

Fails, never skips, when Ceph is not installed: ``make test`` runs scripts/install-test-servers.sh first.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from servers.radosgw import RadosGW, S3Server
from servers_fixtures import S3_TEST_BUCKET
from shrink import SHRINK_ALL_BUT_PACORE, SHRINK_STEPS

from step3vl import storage
from step3vl.checkpoint import (
    checkpoint_uri,
    latest_valid_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from step3vl.storage import (
    MANIFEST_NAME,
    IntegrityError,
    KeyNotFoundError,
    NotPublishedError,
    RemoteFiles,
    S3Store,
    StorageError,
    fetch_dir,
    open_store,
    publish_dir,
    read_manifest,
    verify_published,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix(s3_env: S3Server) -> str:
    """A fresh prefix in the test bucket, so tests sharing the session's server do not interfere."""
    return f"s3://{S3_TEST_BUCKET}/{uuid.uuid4().hex[:12]}"


def small_run() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {
        "model_state": model.state_dict(),
        "config": {"hidden": 64},
        "train_state": {"step": 2, "optimizer": opt.state_dict(), "rng": torch.get_rng_state()},
    }


def upload_like_kfp(local: Path, uri: str) -> None:
    """A KFP artifact directory as the launcher uploads it: every file as it is (its manifest included)."""
    import os

    store = open_store(uri)
    for dirpath, _, names in os.walk(local):
        for name in names:
            store.upload_file(Path(dirpath, name), Path(dirpath, name).relative_to(local).as_posix())


def count_store_calls(monkeypatch: pytest.MonkeyPatch, under: str, method: str = "download_file") -> list[str]:
    """The keys S3Store downloads (or passes to another ``method``: ``iter_bytes``, streamed in place to verify
    them; ``upload_file``) in stores under ``under``, from now on."""
    got: list[str] = []
    real = getattr(S3Store, method)

    def counted(self: S3Store, key: str, *args: Any, **kwargs: Any) -> Any:
        if self.uri.startswith(under):
            got.append(key)
        return real(self, key, *args, **kwargs)

    monkeypatch.setattr(S3Store, method, counted)
    return got


def test_put_list_read(prefix: str) -> None:
    store = open_store(prefix)
    assert isinstance(store, S3Store)
    assert store.list() == []
    assert not store.exists("a/b.txt")
    store.write_bytes("a/b.txt", b"hello")
    store.write_bytes("a/c/d.bin", bytes(range(256)))
    store.write_bytes("top", b"")
    assert store.exists("a/b.txt")
    assert store.read_bytes("a/b.txt") == b"hello"
    assert store.read_bytes("top") == b""
    assert store.list() == ["a/b.txt", "a/c/d.bin", "top"]
    assert store.list("a/") == ["a/b.txt", "a/c/d.bin"]
    assert store.list(recursive=False) == ["a/", "top"]
    with pytest.raises(KeyNotFoundError, match=f"{prefix}/missing does not exist"):
        store.read_bytes("missing")
    assert store.delete_prefix("a/") == 2
    assert store.list() == ["top"]


def test_upload_download_multipart(prefix: str, tmp_path: Path) -> None:
    store = open_store(prefix)
    data = torch.randint(0, 256, (12 * 1024 * 1024,), dtype=torch.uint8).numpy().tobytes()  # > 1 part
    (tmp_path / "big.bin").write_bytes(data)
    store.upload_file(tmp_path / "big.bin", "big.bin")
    store.download_file("big.bin", tmp_path / "back" / "big.bin")
    assert (tmp_path / "back" / "big.bin").read_bytes() == data


def test_checkpoint_round_trip_on_s3(prefix: str, tmp_path: Path) -> None:
    run = small_run()
    uri = checkpoint_uri(f"{prefix}/ckpts", 2)
    manifest = save_checkpoint(uri, **run, extra_meta={"where": "s3"})
    assert sorted(open_store(uri).list()) == sorted([*manifest["files"], MANIFEST_NAME])
    assert verify_published(uri) == manifest

    ckpt = load_checkpoint(uri, tmp_path / "local")
    assert ckpt.path == tmp_path / "local"
    assert ckpt.manifest == manifest and ckpt.config == run["config"]
    assert list(ckpt.model_state) == list(run["model_state"])
    for name, tensor in run["model_state"].items():
        assert torch.equal(ckpt.model_state[name], tensor) and ckpt.model_state[name].dtype == tensor.dtype
    opt_state = ckpt.train_state["optimizer"]
    assert list(opt_state["state"]) == [0, 1, 2, 3]
    for pid, entry in run["train_state"]["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(opt_state["state"][pid][key], value)
    assert opt_state["param_groups"] == run["train_state"]["optimizer"]["param_groups"]
    assert torch.equal(ckpt.train_state["rng"], run["train_state"]["rng"])
    assert latest_valid_checkpoint(f"{prefix}/ckpts") == uri

    with pytest.raises(StorageError, match="already exists"):
        save_checkpoint(uri, **run)


def test_reader_sees_nothing_until_manifest(prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between every upload of a publish, an independent reader finds no checkpoint at all."""
    ckpts = f"{prefix}/ckpts"
    uri = checkpoint_uri(ckpts, 5)
    observed: list[str] = []
    real_upload = S3Store.upload_file

    def upload_then_look(self: S3Store, local_path: Any, key: str) -> None:
        real_upload(self, local_path, key)
        observed.append(key)
        reader = open_store(uri)  # a separate client, as another process would have
        assert key in reader.list()
        with pytest.raises(NotPublishedError):
            read_manifest(uri)
        with pytest.raises(NotPublishedError):
            fetch_dir(uri, tmp_path / f"reader-{len(observed)}")
        assert latest_valid_checkpoint(ckpts) is None

    monkeypatch.setattr(S3Store, "upload_file", upload_then_look)
    manifest = save_checkpoint(uri, **small_run())
    assert sorted(observed) == sorted(manifest["files"]), "every file was uploaded before the manifest"
    assert latest_valid_checkpoint(ckpts) == uri


def test_interrupted_publish_is_invisible_and_recoverable(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpts = f"{prefix}/ckpts"
    run = small_run()
    save_checkpoint(checkpoint_uri(ckpts, 1), **run)
    uri = checkpoint_uri(ckpts, 2)
    real_upload = S3Store.upload_file
    uploads = {"n": 0}

    def crash_on_second(self: S3Store, local_path: Any, key: str) -> None:
        uploads["n"] += 1
        if uploads["n"] == 2:
            raise StorageError("simulated crash mid-publish")
        real_upload(self, local_path, key)

    monkeypatch.setattr(S3Store, "upload_file", crash_on_second)
    with pytest.raises(StorageError, match="simulated crash"):
        save_checkpoint(uri, **run)
    monkeypatch.setattr(S3Store, "upload_file", real_upload)

    assert len(open_store(uri).list()) == 1, "one object of the unfinished publish is there"
    assert latest_valid_checkpoint(ckpts) == checkpoint_uri(ckpts, 1)
    with pytest.raises(NotPublishedError):
        load_checkpoint(uri)
    # re-publishing the same step (a resumed run) clears the leftovers and succeeds
    manifest = save_checkpoint(uri, **run)
    assert sorted(open_store(uri).list()) == sorted([*manifest["files"], MANIFEST_NAME])
    assert latest_valid_checkpoint(ckpts) == uri


def test_message_cache_on_s3_is_listed_and_pruned_by_age(prefix: str, tmp_path: Path) -> None:
    """On S3 an entry's age comes from its objects' LastModified (one listing, sizes included), a reuse's LAST_USED
    among them: prune removes the entries older than asked, whole and half-stored ones, and leaves the rest."""
    from step3vl.stages import pacore

    cache = f"{prefix}/root/{pacore.MESSAGE_CACHE}"
    for key, names in (("k1", ("warmup", "messages")), ("k2", ("warmup",))):
        src = tmp_path / key
        src.mkdir()
        (src / "part-0000.jsonl").write_text('{"id": "a"}\n' * 10)
        (src / "stats.json").write_text('{"references": 10}')
        for name in names:
            publish_dir(src, f"{cache}/{key}/{name}")
    infos = open_store(cache).list_info()
    assert [i.key for i in infos] == sorted(open_store(cache).list())
    assert all(i.size > 0 and abs(i.modified - time.time()) < 300 for i in infos)
    entries = pacore.cache_entries(cache)
    assert [(e.key, e.whole, e.files) for e in sorted(entries, key=lambda e: e.key)] == [("k1", True, 6),
                                                                                      ("k2", False, 3)]
    assert pacore.prune_cache(cache, 3600) == []  # written just now
    # a run reusing k1 rewrites its LAST_USED: an object of the entry, so the entry's age is from that use
    assert pacore._from_cache(f"{cache}/k1", tmp_path / "msgs", tmp_path / "warm") == {"references": 10}
    (before,) = [e for e in entries if e.key == "k1"]
    (k1,) = [e for e in pacore.cache_entries(cache) if e.key == "k1"]
    assert k1.files == 7 and open_store(cache).exists(f"k1/{pacore.USED_MARKER}") and k1.used >= before.used
    later = time.time() + 2 * 3600
    assert {e.key for e in pacore.prune_cache(cache, 3600, now=later, dry_run=True)} == {"k1", "k2"}
    assert len(open_store(cache).list()) == 10
    assert {e.key for e in pacore.prune_cache(cache, 3600, now=later)} == {"k1", "k2"}
    assert open_store(cache).list() == [] and pacore.cache_entries(cache) == []


def test_corrupt_object_is_refused_and_skipped(prefix: str, tmp_path: Path) -> None:
    ckpts = f"{prefix}/ckpts"
    run = small_run()
    save_checkpoint(checkpoint_uri(ckpts, 1), **run)
    uri = checkpoint_uri(ckpts, 2)
    save_checkpoint(uri, **run)
    store = open_store(uri)
    data = bytearray(store.read_bytes("model.safetensors"))
    data[-1] ^= 0xFF
    store.write_bytes("model.safetensors", bytes(data))

    assert latest_valid_checkpoint(ckpts) == checkpoint_uri(ckpts, 1)
    assert latest_valid_checkpoint(ckpts, deep=False) == uri, "a shallow check only sees presence"
    with pytest.raises(IntegrityError, match=r"model\.safetensors sha256 differs"):
        load_checkpoint(uri, tmp_path / "dl")
    # objects are read several at once: every altered one is still named, with the missing and the unexpected
    others = sorted(k for k in store.list() if k not in (MANIFEST_NAME, "model.safetensors"))
    store.write_bytes(others[0], store.read_bytes(others[0]) + b"x")
    store.delete_prefix(others[1])
    store.write_bytes("stray.bin", b"?")
    with pytest.raises(IntegrityError) as e:
        verify_published(uri)
    assert sorted(e.value.files) == sorted(["model.safetensors", others[0], others[1], "stray.bin"])
    assert f"{others[0]} has " in str(e.value) and f"{others[1]} is missing" in str(e.value)


def test_resuming_ranks_share_one_verified_copy_of_the_newest_checkpoint(prefix: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each resuming rank used to stream the newest checkpoint once to verify it, then download it again into a
    temporary folder of its own that was never removed. Now the node's ranks share one copy in the node's cache,
    each file downloaded once and verified as it arrives."""
    ckpts = f"{prefix}/ckpts"
    run = small_run()
    save_checkpoint(checkpoint_uri(ckpts, 1), **run)
    newest = checkpoint_uri(ckpts, 2)
    save_checkpoint(newest, **run)
    node, tmp = tmp_path / "node", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(node))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    got, streamed = count_store_calls(monkeypatch, ckpts), count_store_calls(monkeypatch, ckpts, "iter_bytes")
    first = load_latest_checkpoint(ckpts)  # one rank of the node
    second = load_latest_checkpoint(ckpts)  # another
    assert first is not None and second is not None
    assert first.uri == second.uri == newest and first.path == second.path == RemoteFiles(newest).dir
    assert first.path.is_relative_to(node)
    assert sorted(got) == sorted(read_manifest(newest)["files"]) and streamed == []
    assert list(tmp.iterdir()) == []
    torch.testing.assert_close(second.model_state, run["model_state"])
    assert second.train_state["step"] == 2
    torch.testing.assert_close(second.train_state["optimizer"]["state"], run["train_state"]["optimizer"]["state"])


def test_a_resume_skips_a_corrupt_newest_checkpoint_but_not_an_unreachable_store(
        prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ckpts = f"{prefix}/ckpts"
    run = small_run()
    save_checkpoint(checkpoint_uri(ckpts, 1), **run)
    newest = checkpoint_uri(ckpts, 2)
    save_checkpoint(newest, **run)
    store = open_store(newest)
    data = bytearray(store.read_bytes("model.safetensors"))
    data[-1] ^= 0xFF
    store.write_bytes("model.safetensors", bytes(data))
    with caplog.at_level("WARNING", logger="step3vl.checkpoint"):
        ck = load_latest_checkpoint(ckpts)
    assert ck is not None and ck.uri == checkpoint_uri(ckpts, 1)
    assert f"skipping checkpoint {newest}" in caplog.text and "model.safetensors does not match" in caplog.text
    assert not (RemoteFiles(newest).dir / "model.safetensors").exists()  # nothing unverified stays in the cache
    # a store that does not answer is not a corrupt checkpoint: the run must not fall back, or start over
    real = S3Store.download_file

    def unreachable(self: S3Store, key: str, local_path: Any) -> None:
        if key == "train_state.safetensors":
            raise StorageError(f"S3 endpoint {self.uri} unreachable")
        real(self, key, local_path)

    monkeypatch.setattr(S3Store, "download_file", unreachable)
    save_checkpoint(checkpoint_uri(ckpts, 3), **run)
    with pytest.raises(StorageError, match="unreachable"):
        load_latest_checkpoint(ckpts)


def test_publish_dir_and_fetch_reuses_verified_copy(prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "dataset"
    (src / "shards").mkdir(parents=True)
    for i in range(3):
        (src / "shards" / f"{i:05d}.parquet").write_bytes(bytes([i]) * (1000 + i))
    manifest = publish_dir(src, f"{prefix}/data/v1", {"kind": "dataset"})
    local = fetch_dir(f"{prefix}/data/v1", tmp_path / "cache")
    assert storage.verify_dir(local) == manifest
    # a second fetch into the same place finds the verified copy and downloads nothing
    (local / "shards" / "00000.parquet").touch()
    open_store(f"{prefix}/data/v1").delete_prefix("shards/")
    assert fetch_dir(f"{prefix}/data/v1", tmp_path / "cache") == local


def test_server_down_fails_within_bounded_time(
    radosgw_server: RadosGW, s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs last: stops the session's server (a later s3_env user gets a fresh one)."""
    monkeypatch.delenv(storage.RETRY_SECONDS_ENV, raising=False)  # the default budget
    uri = checkpoint_uri(f"s3://{S3_TEST_BUCKET}/down-{uuid.uuid4().hex[:8]}", 1)
    save_checkpoint(uri, **small_run())
    load_checkpoint(uri, tmp_path / "first")

    radosgw_server.stop()
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        load_checkpoint(uri, tmp_path / "second")
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert s3_env.endpoint in message and "unreachable" in message
    assert s3_env.secret_key not in message
    assert elapsed < 60, f"gave up only after {elapsed:.1f} s"
    print(f"server-down error after {elapsed:.1f} s: {message}")



def test_trainjob_chain_on_s3_from_data_to_pacore(prefix: str, micro_cfg: Any, micro_data: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's TrainJob data flow: every training stage runs as ``step3vl stage exec`` does, on ``s3://``
    URIs only (the data prep artifact as KFP uploads it, each stage starting from the last one's model)."""
    import json
    from dataclasses import replace

    from step3vl import config
    from step3vl.config import dump_yaml
    from step3vl.model.loading import load_model
    from step3vl.pipeline import trainjob

    data = Path(micro_data.out_dir)
    assert (data / MANIFEST_NAME).is_file()  # data prep seals its output last
    upload_like_kfp(data, f"{prefix}/data")
    cfg = config.load(config.PipelineConfig, Path(__file__).parent / "conf" / "micro.yaml", SHRINK_STEPS)
    pc = replace(cfg.pacore, curriculum=cfg.pacore.curriculum[:1], scaling_per_family=2, scaling_ks=(1, 2))
    cfg = replace(cfg, pacore=pc)
    config_yaml = dump_yaml(cfg)
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    fetched = count_store_calls(monkeypatch, f"{prefix}/data")

    init = None
    for stage, fn, extra in [("pretrain", "step3vl.stages.train:run_training", {"stage": "pretrain"}),
                             ("sft", "step3vl.stages.train:run_training", {"stage": "sft"}),
                             ("rlvr", "step3vl.stages.rl:run_rl", {"stage": "rlvr"}),
                             ("rlhf", "step3vl.stages.rlhf:run", {}),
                             ("pacore", "step3vl.stages.pacore:run", {})]:
        args = {**extra, "data_dir": f"{prefix}/data", "out_uri": f"{prefix}/{stage}",
                "ckpt_uri": f"{prefix}/checkpoints/{stage}", "progress": False}
        if init:
            args["init_uri"] = init
        summary = trainjob.exec_call({"fn": fn, "arguments": args, "config_yaml": config_yaml,
                                      "result_uri": f"{prefix}/results/{stage}.json"})
        init = summary["model_uri"]
        assert init.startswith(f"{prefix}/{stage}/"), (stage, init)
        assert load_model(init).tokenizer_dir is not None, stage  # the next stage starts from it
        assert json.loads(open_store(f"{prefix}/results").read_bytes(f"{stage}.json")) == summary

    # one copy for the node of what the stages read, each file downloaded once: the training loop's shards, and
    # the sets the RL stages name; not the raw sets only data prep reads (pre-training's, SFT's)
    from step3vl.stages import pacore, rl, rlhf

    files = storage.read_manifest(f"{prefix}/data")["files"]
    sets = {*rl.data_sets(cfg, "rlvr"), *rlhf.data_sets(cfg), *pacore.data_sets(cfg)}
    assert len(fetched) == len(set(fetched)), sorted(fetched)
    assert {f for f in fetched if f.startswith("raw/")} == {f for f in files if f.split("/")[:2] in
                                                            [["raw", name] for name in sets]}
    unread = {f.split("/")[1] for f in files if f.startswith("raw/")} - sets
    assert {"pretrain_broad", "pretrain_hq"} <= unread, unread
    assert {f.split("/")[0] for f in fetched} == {"tokenizer", "packed", "raw", "data_manifest.json"}
    # PaCoRe's report sits beside its model: the metrics and the accuracy-vs-rollouts curve
    out = open_store(f"{prefix}/pacore")
    metrics = json.loads(out.read_bytes("metrics.json"))
    curves = json.loads(out.read_bytes("scaling.json"))
    assert set(curves) == {"text_math", "mm_math"} and curves["mm_math"]["k"] == [1, 2]
    assert metrics["scaling/mm_math/pacore_at_2"] == curves["mm_math"]["pacore"][1]
    assert out.read_bytes("scaling.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_trainjob_command_as_two_ranks_on_s3(prefix: str, micro_data: Any, tmp_path: Path) -> None:
    """What a pre-training TrainJob runs, for real: ``torchrun --no-python step3vl stage exec pretrain`` on two
    ranks (DeepSpeed ZeRO-2 on gloo), the call in ``$STEP3VL_CALL``, data and outputs on S3 only. The first
    attempt stops after its step-2 checkpoint; the retry resumes from it, both ranks from the node's one copy."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from step3vl import config
    from step3vl.model.loading import load_model
    from step3vl.pipeline import trainjob

    root = Path(__file__).resolve().parent
    cfg = config.load(config.PipelineConfig, root / "conf" / "micro.yaml", [
        "pretrain.batch_size=8", "pretrain.micro_batch_size=2", "pretrain.zero_stage=2", "pretrain.eval_data=",
        "pretrain.checkpoint_every=2", "pretrain.phases=[{data: pretrain_broad, steps: 4, lr_start: 1.0e-3, lr_end: 1.0e-3}]",
    ])
    data = Path(micro_data.out_dir)
    upload_like_kfp(data, f"{prefix}/data")
    call = {"fn": "step3vl.stages.train:run_training", "config_yaml": config.dump_yaml(cfg),
            "arguments": {"stage": "pretrain", "data_dir": f"{prefix}/data", "out_uri": f"{prefix}/pretrain",
                          "ckpt_uri": f"{prefix}/checkpoints", "progress": False},
            "result_uri": f"{prefix}/trainjob-result.json"}
    node, tmp = tmp_path / "node", tmp_path / "tmp"
    tmp.mkdir()
    exe = shutil.which("step3vl", path=str(Path(sys.executable).parent))
    assert exe, "the step3vl console script is not installed in this venv"

    def attempt(arguments: dict[str, Any], port: int) -> str:
        spec = {**call, "arguments": {**call["arguments"], **arguments}}
        env = {**os.environ, "OMP_NUM_THREADS": "1", trainjob.CALL_ENV: json.dumps(spec),
               storage.NODE_CACHE_ENV: str(node), "TMPDIR": str(tmp)}
        for var in ("RANK", "WORLD_SIZE", trainjob.RUN_ENV):
            env.pop(var, None)
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(port), "--no-python", exe, "stage", "exec", "pretrain"],
                           capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, p.stderr[-5000:]
        return p.stderr

    attempt({"stop_after_step": 2}, 29533)
    logs = attempt({}, 29534)  # a port of its own: the first attempt's may not be free again yet
    summary = json.loads(open_store(prefix).read_bytes("trainjob-result.json"))
    assert summary["model_uri"] == f"{prefix}/pretrain/model" and summary["step"] == 4
    assert summary["metrics"]["steps"] == 4.0
    published = [k for k in open_store(f"{prefix}/checkpoints").list() if k.endswith(MANIFEST_NAME)]
    assert published == [f"step-00000{s}/{MANIFEST_NAME}" for s in (2, 4)]  # by rank 0 only
    assert logs.count(f"resuming from {prefix}/checkpoints/step-000002 at step 2") == 2, logs[-3000:]
    assert load_model(summary["model_uri"]).tokenizer_dir is not None
    # the data sits once in the node's shared place, and only what pre-training reads: the tokenizer and its set
    copies = {RemoteFiles(u, node).dir for u in (f"{prefix}/data", f"{prefix}/checkpoints/step-000002")}
    assert {d for d in node.glob("*/*") if d.is_dir() and not d.name.endswith(".locks")} == copies

    def held(d: Path) -> list[str]:
        return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())

    data_copy = RemoteFiles(f"{prefix}/data", node).dir
    assert held(data_copy) == sorted([*(f"tokenizer/{p.name}" for p in (data / "tokenizer").iterdir()),
                                      "packed/pretrain_broad/index.json",
                                      "packed/pretrain_broad/pack-00000.safetensors"]), held(data_copy)
    # the checkpoint both ranks resumed from: one whole copy for the node, and none in a rank's temp dir
    resumed = f"{prefix}/checkpoints/step-000002"
    assert held(RemoteFiles(resumed, node).dir) == sorted([*read_manifest(resumed)["files"], MANIFEST_NAME])
    assert not list(tmp.glob("step3vl-fetch-*")), list(tmp.iterdir())


def test_a_nodes_copy_is_downloaded_once_and_again_when_the_data_changes(prefix: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one")
    uri = f"{prefix}/d"
    publish_dir(src, uri)
    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    got = count_store_calls(monkeypatch, uri)
    first = fetch_dir(uri)
    assert fetch_dir(uri) == first and got == ["a.txt"]  # the node's other ranks reuse it
    assert (first / "a.txt").read_text() == "one" and first.parent.parent == tmp_path / "node"
    (src / "a.txt").write_text("two")
    publish_dir(src, uri, overwrite=True)
    assert (fetch_dir(uri) / "a.txt").read_text() == "two" and got == ["a.txt", "a.txt"]


@pytest.mark.slow
def test_pipeline_with_storage_on_s3_passes_data_and_models_as_pointers(prefix: str, tmp_path: Path) -> None:
    """``step3vl run`` (KFP's local runner) with ``storage.root`` on S3: data prep and the training stages publish their
    outputs there and their artifacts hold only pointers (KFP's launcher downloads every input artifact whole into
    each pod that consumes it); each stage's node fetches what it reads, once: no raw pre-training or SFT set."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from step3vl import config
    from step3vl.stages import pacore, rl, rlhf

    exe = shutil.which("step3vl", path=str(Path(sys.executable).parent))
    micro = Path(__file__).parent / "conf" / "micro.yaml"
    root = f"{prefix}/root"
    env = {**os.environ, "STEP3VL_HOME": str(tmp_path / ".step3vl")}
    # the data and the stages cut down (what flows between them is the point), PaCoRe's two curriculum steps kept
    shrink = [a for s in SHRINK_ALL_BUT_PACORE for a in ("--set", s)]
    p = subprocess.run([exe, "run", "--config", str(micro), "--set", f"storage.root={root}", *shrink, "--json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    st = json.loads(p.stdout)["stages"]
    assert {s: v["status"] for s, v in st.items()} == dict.fromkeys(st, "done") and len(st) == 9
    data = st["data_prep"]["outputs"]["data"]
    uri = data["metadata"]["data_uri"]
    assert uri.startswith(f"{root}/data/")
    assert sorted(os.listdir(data["uri"])) == ["REMOTE.json"]
    assert json.loads(Path(data["uri"], "REMOTE.json").read_text()) == {"data_uri": uri}
    from step3vl.pipeline.lineage import data_digest

    assert data["metadata"]["digest"] == data_digest(uri)  # computed on the local folder before it was published
    # data prep's parts were published apart and joined there: each part's packed shards, not a copy of them, went
    # through the merge; the part artifacts hold pointers
    plan = json.loads(RemoteFiles(uri).file("plan.json").read_text())
    parts = open_store(f"{root}/data-parts").list(recursive=False)
    assert len(parts) == len(plan["parts"]) > 1 and all(read_manifest(f"{root}/data-parts/{d}") for d in parts)
    part_cache = [RemoteFiles(f"{root}/data-parts/{d}").dir for d in parts]
    assert not [f for d in part_cache for f in d.rglob("*.safetensors")]
    assert sorted(Path(data["uri"]).parent.parent.glob("for-loop-*/data-part/part/REMOTE.json"))

    # what this machine's node cache holds of the data: the sets the RL stages and evaluate read, the hashes the
    # contamination check reads; no raw set that only data prep reads
    cfg = config.load(config.PipelineConfig, micro)
    cache = RemoteFiles(uri).dir
    held = {f.relative_to(cache).as_posix() for f in cache.rglob("*") if f.is_file()}
    raw = {f.split("/")[1] for f in held if f.startswith("raw/")}
    assert raw == {*rl.data_sets(cfg, "rlvr"), *rlhf.data_sets(cfg), *pacore.data_sets(cfg), "eval"}
    assert not raw & {"pretrain_broad", "pretrain_hq", "sft_stage1", "sft_stage2"}
    assert {f for f in held if f.startswith("hashes/")} == {f for f in read_manifest(uri)["files"]
                                                           if f.startswith("hashes/")}
    assert st["evaluate"]["metrics"]["contamination/duplicates"] == 0
    assert st["register"]["metrics"]["version"] == 1
    # so are the models: each training stage's artifact points at object storage, where the next stages, evaluate,
    # register and serving read it
    for stage in ("pretrain", "sft", "rlvr", "rlhf", "pacore"):
        model = st[stage]["outputs"]["model"]
        assert os.listdir(model["uri"]) == ["REMOTE.json"], stage
        assert model["metadata"]["model_uri"].startswith(f"{root}/models/{stage}-"), stage
        assert read_manifest(model["metadata"]["model_uri"])["files"], stage
    assert st["register"]["outputs"]["decision"]["metadata"]["model_uri"] == \
        st["pacore"]["outputs"]["model"]["metadata"]["model_uri"]
    # PaCoRe's message sets are a Dataset of their own, on object storage too: one published dataset per step
    msgs = st["pacore"]["outputs"]["messages"]
    assert msgs["type"] == "system.Dataset" and os.listdir(msgs["uri"]) == ["REMOTE.json"]
    assert msgs["metadata"]["data_uri"].startswith(f"{root}/pacore-messages/pacore-")
    assert msgs["metadata"]["steps"] == ["step-1", "step-2"] and msgs["metadata"]["digest"]
    assert read_manifest(msgs["metadata"]["data_uri"] + "/step-1")["files"]
    cached = {k.split("/")[0] for k in open_store(f"{root}/pacore-message-cache").list()}
    assert len(cached) == 2  # each step's message sets, stored on object storage for later runs to reuse
    assert read_manifest(f"{root}/pacore-message-cache/{sorted(cached)[0]}/messages")["files"]
    assert st["deploy_serving"]["metrics"]["completion_tokens"] >= 1
    ckpts = {k.split("/")[0].split("-")[0] for k in open_store(f"{root}/checkpoints").list()}
    assert {"pretrain", "sft", "rlvr", "rlhf", "pacore"} <= ckpts


def test_data_prep_publishes_its_output_once_and_replaces_an_interrupted_upload(prefix: str, micro_data: Any,
                                                                                tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil

    from step3vl.pipeline.lineage import data_digest
    from step3vl.stages.data import content_digest, local_copy, publish, read_data_manifest

    from step3vl.storage import seal_dir

    out = tmp_path / "data"
    shutil.copytree(micro_data.out_dir, out)
    store = open_store(f"{prefix}/data/{content_digest(read_manifest(out)['files'])[:16]}")
    store.write_bytes("0000/raw/eval/part.jsonl", b"an upload that never finished")  # no manifest: not reused
    uri = publish(out, prefix)
    assert uri.startswith(store.uri + "/") and uri != f"{store.uri}/0000"
    assert verify_published(uri) == read_manifest(out)  # every file, the raw sets' own manifests included
    assert data_digest(uri) == data_digest(out)
    assert read_data_manifest(uri) == json.loads((out / "data_manifest.json").read_text())

    # the same data prepared again (its timings differ): what is published is reused, nothing uploaded
    (out / "timings.json").write_text('{"total": 1.0}')
    seal_dir(out)
    uploads = count_store_calls(monkeypatch, prefix, "upload_file")
    assert publish(out, prefix) == uri and uploads == []

    version = open_store(uri)  # an upload killed before its manifest, leaving a stray object
    version.delete_prefix(MANIFEST_NAME)
    version.write_bytes("raw/stray.bin", b"left over")
    shutil.rmtree(out)
    shutil.copytree(micro_data.out_dir, out)
    assert publish(out, prefix) == uri
    assert verify_published(uri) == read_manifest(out) and not version.exists("raw/stray.bin")

    # a stage's node copies only what it names: here the eval set and the hashes
    fetched = count_store_calls(monkeypatch, prefix)
    local = local_copy(uri, ["eval"], ("hashes",))
    assert {f.split("/")[0] for f in fetched} == {"raw", "hashes"}
    assert {f.split("/")[1] for f in fetched if f.startswith("raw/")} == {"eval"}
    assert sorted(p.name for p in (local / "raw").iterdir()) == ["eval"]


def test_publishing_over_another_published_directory_is_refused(prefix: str, tmp_path: Path) -> None:
    src = tmp_path / "d"
    (src / "raw").mkdir(parents=True)
    (src / "raw" / "a.txt").write_text("a")
    publish_dir(src / "raw", f"{prefix}/parent/other")  # published by someone else, under the prefix
    with pytest.raises(StorageError, match=r"holds other published directories \(other/MANIFEST.json\)"):
        publish_dir(src, f"{prefix}/parent")
    assert read_manifest(f"{prefix}/parent/other")["files"].keys() == {"a.txt"}  # untouched


def test_evaluate_leaves_no_copy_of_the_models_it_compared_on_the_pods_disk(prefix: str, micro_cfg: Any,
                                                                            micro_data: Any, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from step3vl.serve.tiny import random_checkpoint
    from step3vl.stages.evaluate import evaluate_models

    models = {}
    for i, label in enumerate(("base", "sft")):
        local = random_checkpoint(tmp_path / label, micro_cfg.model, seed=i)
        models[label] = f"{prefix}/{label}"
        publish_dir(local, models[label])
    fetched = {label: count_store_calls(monkeypatch, uri) for label, uri in models.items()}
    out = evaluate_models(micro_cfg, micro_data.out_dir, models, tmp_path / "ev", modes=("greedy",), per_family=1,
                          progress=False)
    assert {"base/greedy/mean_accuracy", "sft/greedy/mean_accuracy"} <= set(out.metrics)
    for label, uri in models.items():
        assert sorted(fetched[label]) == sorted(read_manifest(uri)["files"]), label  # loaded from S3, once
        assert not RemoteFiles(uri).dir.exists(), label  # dropped once evaluated


def test_a_users_set_on_s3_is_read_where_it_is_not_published_again(prefix: str, micro_cfg: Any, micro_data: Any,
                                                                    tmp_path: Path) -> None:
    """A user's dataset on object storage is not copied into the published data directory (at the recipe's scale its
    raw text is terabytes): the data manifest names it and the version data prep read; a stage reading it gets that
    version, linked where the set would be; a set published again since is refused."""
    import json
    from dataclasses import replace

    from step3vl.config import DatasetSpec, StorageConfig
    from step3vl.data.io import DataError, iter_records
    from step3vl.stages import data

    publish_dir(micro_data.raw("rl"), f"{prefix}/user/rl")
    sets = {**micro_cfg.data.sets, "rl": DatasetSpec(purpose="rl", path=f"{prefix}/user/rl")}
    cfg = replace(micro_cfg, data=replace(micro_cfg.data, sets=sets), storage=StorageConfig(root=f"{prefix}/root"))
    out = data.run(cfg, tmp_path / "data", progress=False)
    source = out.manifest["sets"]["rl"]["source"]
    assert source["uri"] == f"{prefix}/user/rl"
    files = read_manifest(out.data_uri)["files"]
    assert not [f for f in files if f.startswith("raw/rl/")] and [f for f in files if f.startswith("raw/eval/")]
    assert not (tmp_path / "data" / "raw" / "rl").exists()  # data prep gated it where it is, in parts

    local = data.local_copy(out.data_uri, ["rl", "eval"])
    assert (local / "raw" / "rl").is_symlink()
    ids = [r.record["id"] for r in iter_records(local / "raw" / "rl")]
    assert ids == [r.record["id"] for r in iter_records(micro_data.raw("rl"))]
    assert data.local_copy(out.data_uri, ["rl"]) == local  # again, as another rank of the node
    # with a local root the data directory stays self-contained: the set is copied in, its source still named
    here = data.run(replace(cfg, storage=StorageConfig(root=str(tmp_path / "root"))), tmp_path / "here",
                    progress=False)
    assert here.manifest["sets"]["rl"]["source"] == source and here.data_uri == str(tmp_path / "here")
    assert not (here.out_dir / "raw" / "rl").is_symlink()
    assert [r.record["id"] for r in iter_records(here.out_dir / "raw" / "rl")] == ids
    assert here.manifest["sets"]["rl"]["content_hash"] == out.manifest["sets"]["rl"]["content_hash"]

    shard = sorted(micro_data.raw("rl").glob("*.jsonl"))[0].name
    changed = tmp_path / "changed"
    fetch_dir(f"{prefix}/user/rl", changed)
    (changed / shard).write_text((changed / shard).read_text() + json.dumps({"id": "late"}) + "\n")
    publish_dir(changed, f"{prefix}/user/rl", overwrite=True)
    with pytest.raises(DataError, match=r"user/rl \(set rl of .*\) was published again since data prep read it"):
        data.local_copy(out.data_uri, ["rl"])


def test_data_prep_fetches_what_each_part_of_a_users_set_on_s3_needs(prefix: str, micro_cfg: Any, micro_data: Any,
                                                                      tmp_path: Path, monkeypatch: Any) -> None:
    """With storage.root on S3 a user's set is never fetched whole: the tokenizer reads its first shards, and a part
    fetches its own shards and the images their records name; the joined set is the set prepared whole."""
    from dataclasses import replace

    from step3vl.config import DatasetSpec, StorageConfig
    from step3vl.data.io import iter_shard
    from step3vl.stages import data

    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    publish_dir(micro_data.raw("pretrain_broad"), f"{prefix}/user/broad")
    shards = sorted(p.name for p in micro_data.raw("pretrain_broad").glob("*.jsonl"))
    assert len(shards) == 3
    sets = {**micro_cfg.data.sets, "pretrain_broad": DatasetSpec(purpose="pretrain", path=f"{prefix}/user/broad")}
    cfg = replace(micro_cfg, data=replace(micro_cfg.data, sets=sets, part_shards=1, tokenizer_max_texts=60),
                  storage=StorageConfig(root=f"{prefix}/root"))
    out = tmp_path / "data"
    plan = data.plan(cfg, out, progress=False)
    cache = storage.RemoteFiles(f"{prefix}/user/broad").dir

    def cached() -> set[str]:
        return {p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()}

    assert cached() == {shards[0]}  # the tokenizer's share of the set is in its first shard
    mine = [i for i, p in enumerate(plan["parts"]) if p["set"] == "pretrain_broad"]
    assert [plan["parts"][i]["shards"] for i in mine] == [[s] for s in shards]
    data.prepare_part(cfg, out, mine[1], progress=False)
    images = {i for r in iter_shard(micro_data.raw("pretrain_broad") / shards[1]) for i in r.record["images"]}
    assert images and cached() == {shards[0], shards[1], *images}
    for i in range(len(plan["parts"])):
        if i != mine[1]:
            data.prepare_part(cfg, out, i, progress=False)
    done = data.merge(cfg, out, progress=False)
    got, whole = done.manifest["sets"]["pretrain_broad"], micro_data.manifest["sets"]["pretrain_broad"]
    assert got["source"]["uri"] == f"{prefix}/user/broad" and not (out / "raw" / "pretrain_broad").exists()
    assert {k: got[k] for k in ("content_hash", "n_records", "gate")} == {k: whole[k] for k in
                                                                          ("content_hash", "n_records", "gate")}
    assert got["packed"]["pretrain_broad"]["samples"] == whole["packed"]["pretrain_broad"]["samples"]
    assert read_manifest(done.data_uri)["files"]["packed/pretrain_broad/index.json"]


def test_data_prep_parts_on_s3_are_joined_by_copies_on_the_server(prefix: str, micro_cfg: Any, tmp_path: Path,
                                                                   monkeypatch: Any) -> None:
    """The pipeline's parts (storage.root on S3) are published; the merge fetches their verdicts, ids' digests and
    indexes only (no scan: no id is repeated), and the published data directory gets their packed shards and content
    hashes by server-side copies: the same data as in one process."""
    from dataclasses import replace

    from step3vl.config import StorageConfig
    from step3vl.data.io import DataError
    from step3vl.stages import data

    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    local = replace(micro_cfg, data=replace(micro_cfg.data, part_shards=1))
    cfg = replace(local, storage=StorageConfig(root=f"{prefix}/root"))
    plan_dir = tmp_path / "plan"
    n = len(data.plan(cfg, plan_dir, progress=False)["parts"])
    uris = [f"{prefix}/parts/{i}" for i in range(n)]
    for i, uri in enumerate(uris):
        publish_dir(data.prepare_part(cfg, plan_dir, i, out=tmp_path / f"part{i}", progress=False), uri)
    with pytest.raises(DataError, match="storage.root must be on object storage too"):
        data.merge(local, tmp_path / "x", plan_dir=plan_dir, parts=uris, progress=False)

    uploads, downloads = count_store_calls(monkeypatch, prefix, "upload_file"), count_store_calls(monkeypatch, prefix)
    copies: list[tuple[str, str]] = []
    real = S3Store.copy_from
    monkeypatch.setattr(S3Store, "copy_from", lambda self, src, key: (copies.append((src, key)), real(self, src, key)))
    done = data.merge(cfg, tmp_path / "data", plan_dir=plan_dir, parts=uris, progress=False)
    assert not [k for k in uploads + downloads if str(k).endswith((".safetensors", "scan.parquet", "hashes.txt"))]
    assert {src.rsplit("/", 1)[-1].split("-")[0] for src, _ in copies} == {"pack", "hashes.txt"}
    assert all(src.startswith(f"{prefix}/parts/") for src, _ in copies)
    assert verify_published(done.data_uri)  # every file, the copied shards included, against the manifest
    whole = data.run(local, tmp_path / "whole", progress=False)
    assert (done.out_dir / "data_manifest.json").read_bytes() == (whole.out_dir / "data_manifest.json").read_bytes()
    published = storage.RemoteFiles(done.data_uri).all()
    for name in ("pretrain_broad", "sft_stage1"):
        assert [f.read_bytes() for f in sorted((published / "hashes" / name).glob("*.txt"))] == \
            [f.read_bytes() for f in sorted((whole.out_dir / "hashes" / name).glob("*.txt"))], name
    for packed in ("pretrain_broad", "sft_stage1", "eval-all"):
        assert [p.read_bytes() for p in sorted((published / "packed" / packed).glob("*.safetensors"))] == \
            [p.read_bytes() for p in sorted(whole.packed(packed).glob("*.safetensors"))], packed


def test_the_merge_fetches_a_parts_scan_only_to_name_its_repeated_ids(prefix: str, tmp_path: Path,
                                                                       monkeypatch: Any) -> None:
    """A part published on S3, as the set's gate opens it: its verdict and ids' digests are fetched, its scan only
    when the gate asks which of its rows hold a repeated id (a part that holds none is never read again)."""
    import json

    import numpy as np
    import pandas as pd

    from step3vl.data import gate
    from step3vl.stages import data

    monkeypatch.setenv(storage.NODE_CACHE_ENV, str(tmp_path / "node"))
    frames = [pd.DataFrame({c: [None] * 2 for c in gate.COLUMNS}) for _ in range(3)]
    for k, (frame, ids) in enumerate(zip(frames, (["a", "b"], ["c", "a"], ["d", "e"]))):
        frame["id"], frame["shard"], frame["line_no"] = ids, f"data-{k:05d}.jsonl", [1, 2]
        d = tmp_path / f"part{k}"
        d.mkdir()
        report = gate.GateReport(f"part {k}", True, 2, [], 0.0)
        (d / data.PART_FILE).write_text(json.dumps({"set": "s", "index": k, "shards": [f"data-{k:05d}.jsonl"]}))
        (d / data.GATE_FILE).write_text(report.to_json())
        np.save(d / data.IDS_FILE, gate.id_digests(frame["id"]))
        frame.to_parquet(d / data.SCAN_FILE)
        publish_dir(d, f"{prefix}/parts/{k}")
    downloads = count_store_calls(monkeypatch, prefix)
    parts = [data._Part.open(f"{prefix}/parts/{k}", []) for k in range(3)]
    assert all(p is not None for p in parts)
    assert not [k for k in downloads if k.endswith(data.SCAN_FILE)]
    result = gate.check_set("s", [p.gate() for p in parts])
    assert result.check("unique_ids").failing_rows == 2 and result.check("unique_ids").example_ids == ["a", "a"]
    assert sorted(k for k in downloads if k.endswith(data.SCAN_FILE)) == [data.SCAN_FILE] * 2  # parts 0 and 1
