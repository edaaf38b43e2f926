"""Unit tests for step3vl.storage: the local store, the publish/verify/fetch protocol, S3 settings.

Real-S3 behaviour is covered in test_s3_integration.py; here an S3 endpoint is at most a closed port.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from step3vl import storage
from step3vl.errors import Step3VLError
from step3vl.storage import (
    MANIFEST_NAME,
    IntegrityError,
    KeyNotFoundError,
    LocalStore,
    NotPublishedError,
    StorageError,
    build_manifest,
    fetch_dir,
    join_uri,
    open_store,
    publish_dir,
    read_manifest,
    retry_policy,
    verify_dir,
    verify_published,
)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": bytes(range(256)) * 40,
        "sub/deeper/c.json": b'{"c": 3}',
        "empty.dat": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def siblings_with_tmp_mark(path: Path) -> list[str]:
    return [p.name for p in path.parent.iterdir() if storage.TMP_MARK in p.name]


# --------------------------------------------------------------------------- local store


def test_local_store_basic_ops(tmp_path: Path) -> None:
    store = open_store(tmp_path / "root", create=True)
    assert isinstance(store, LocalStore)
    assert not store.exists("x/y.txt")
    store.write_bytes("x/y.txt", b"hello")
    store.write_bytes("x/z/w.txt", b"world")
    store.write_bytes("top.txt", b"!")
    assert store.exists("x/y.txt")
    assert store.read_bytes("x/y.txt") == b"hello"
    assert store.list() == ["top.txt", "x/y.txt", "x/z/w.txt"]
    assert store.list("x/") == ["x/y.txt", "x/z/w.txt"]
    assert store.list("x/z") == ["x/z/w.txt"]
    assert store.list(recursive=False) == ["top.txt", "x/"]
    assert store.list("nope/") == []

    src = tmp_path / "upload.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    store.upload_file(src, "up/load.bin")
    store.download_file("up/load.bin", tmp_path / "dl" / "copy.bin")
    assert (tmp_path / "dl" / "copy.bin").read_bytes() == src.read_bytes()
    assert b"".join(store.iter_bytes("up/load.bin", chunk_size=7)) == src.read_bytes()

    assert store.delete_prefix("x/") == 2
    assert store.list() == ["top.txt", "up/load.bin"]
    assert not (tmp_path / "root" / "x").exists(), "emptied directories are removed"
    assert siblings_with_tmp_mark(tmp_path / "root" / "top.txt") == []


def test_local_store_missing_key_and_bad_keys(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(KeyNotFoundError, match=r"missing\.txt does not exist"):
        store.read_bytes("missing.txt")
    with pytest.raises(KeyNotFoundError, match=r"missing\.txt does not exist"):
        store.download_file("missing.txt", tmp_path / "out")
    with pytest.raises(StorageError, match=r"'\.\.' components are not allowed"):
        store.read_bytes("../etc/passwd")
    with pytest.raises(StorageError, match=r"unsupported URI scheme in 'gs://bucket/x'"):
        open_store("gs://bucket/x")


def test_write_bytes_replaces_atomically(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.write_bytes("f", b"old")
    store.write_bytes("f", b"new content")
    assert store.read_bytes("f") == b"new content"
    assert os.listdir(tmp_path) == ["f"], "no temporary file is left behind"
    # An in-flight temp file (a writer mid-way) is never listed.
    (tmp_path / f".g{storage.TMP_MARK}123").write_bytes(b"partial")
    assert store.list() == ["f"]


def test_join_uri_keeps_style() -> None:
    assert join_uri("s3://b/p/", "step-000001", "x") == "s3://b/p/step-000001/x"
    assert join_uri("/data/run", "step-000001") == "/data/run/step-000001"
    assert join_uri("file:///data", "a") == "file:///data/a"


# --------------------------------------------------------------------------- manifest / publish


def test_build_manifest_lists_every_file(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    manifest = build_manifest(tmp_path, {"kind": "dataset", "rows": 3})
    assert list(manifest["files"]) == sorted(files)
    for rel, data in files.items():
        assert manifest["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest["meta"] == {"kind": "dataset", "rows": 3}
    assert manifest["total_size"] == sum(len(d) for d in files.values())


def test_publish_local_then_fetch_and_verify(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    dest = tmp_path / "out" / "v1"
    manifest = publish_dir(src, dest, {"kind": "test"})

    assert json.loads((dest / MANIFEST_NAME).read_text()) == manifest
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert (src / "a.txt").exists(), "a copying publish leaves the source alone"
    assert siblings_with_tmp_mark(dest) == []
    assert verify_dir(dest) == manifest
    assert verify_published(dest) == manifest
    assert read_manifest(dest)["meta"] == {"kind": "test"}
    assert fetch_dir(dest) == dest

    copy = fetch_dir(str(dest), tmp_path / "copy")
    assert verify_dir(copy) == manifest


def test_publish_refuses_published_destination_unless_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    dest = tmp_path / "dest"
    publish_dir(src, dest)
    with pytest.raises(StorageError, match="already published"):
        publish_dir(src, dest)
    (src / "a.txt").write_bytes(b"changed")
    manifest = publish_dir(src, dest, overwrite=True)
    assert (dest / "a.txt").read_bytes() == b"changed"
    assert verify_dir(dest) == manifest
    assert siblings_with_tmp_mark(dest) == []


def test_publish_refuses_non_empty_unpublished_destination(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "user-file").write_text("mine")
    with pytest.raises(StorageError, match="not an empty directory"):
        publish_dir(src, tmp_path / "dest")
    assert (tmp_path / "dest" / "user-file").read_text() == "mine"


def test_publish_move_renames_source_into_place(tmp_path: Path) -> None:
    src = tmp_path / "build"
    files = make_tree(src)
    dest = tmp_path / "dest"
    publish_dir(src, dest, move=True)
    assert not src.exists()
    assert verify_dir(dest)["files"].keys() == files.keys()


def test_failed_publish_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    make_tree(src)
    dest = tmp_path / "dest"
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def flaky_copy(a, b, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_copy(a, b, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", flaky_copy)
    with pytest.raises(OSError, match="No space"):
        publish_dir(src, dest)
    assert not dest.exists()
    assert siblings_with_tmp_mark(dest) == []


def published(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_tree(src)
    dest = tmp_path / "pub"
    publish_dir(src, dest)
    return dest


def test_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    dest = published(tmp_path)
    data = (dest / "sub/b.bin").read_bytes()
    (dest / "sub/b.bin").write_bytes(data[:100])
    with pytest.raises(IntegrityError, match=r"sub/b\.bin has 100 bytes") as err:
        verify_dir(dest)
    assert err.value.files == ["sub/b.bin"]
    with pytest.raises(IntegrityError, match=r"sub/b\.bin"):
        fetch_dir(dest)


def test_edited_file_same_size_is_refused_naming_it(tmp_path: Path) -> None:
    dest = published(tmp_path)
    path = dest / "sub/deeper/c.json"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"sub/deeper/c\.json sha256 differs") as err:
        verify_dir(dest)
    assert err.value.files == ["sub/deeper/c.json"]
    assert isinstance(err.value, StorageError) and isinstance(err.value, Step3VLError)


def test_missing_and_extra_files_are_refused(tmp_path: Path) -> None:
    dest = published(tmp_path)
    (dest / "a.txt").unlink()
    (dest / "sub" / "intruder.txt").write_text("x")
    with pytest.raises(IntegrityError) as err:
        verify_dir(dest)
    assert "a.txt is missing" in str(err.value)
    assert "sub/intruder.txt is not in MANIFEST.json" in str(err.value)
    assert sorted(err.value.files) == ["a.txt", "sub/intruder.txt"]


def test_unpublished_directory_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path / "raw")
    with pytest.raises(NotPublishedError, match=r"raw is not published: no MANIFEST\.json"):
        verify_dir(tmp_path / "raw")
    with pytest.raises(NotPublishedError):
        fetch_dir(tmp_path / "raw")


def test_garbled_manifest_is_refused(tmp_path: Path) -> None:
    dest = published(tmp_path)
    (dest / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(IntegrityError, match=r"MANIFEST\.json is not valid JSON"):
        verify_dir(dest)
    (dest / MANIFEST_NAME).write_text(
        json.dumps({"format": storage.MANIFEST_FORMAT, "files": {"../escape": {"sha256": "0", "size": 1}}})
    )
    with pytest.raises(IntegrityError, match="malformed entry"):
        verify_dir(dest)


# --------------------------------------------------------------------------- S3 settings


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_vars(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
        "AWS_ACCESS_KEY_ID": "AKIDUNITTEST",
        "AWS_SECRET_ACCESS_KEY": "unit-test-secret-do-not-print",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    return values


@pytest.mark.parametrize("missing", ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_s3_missing_setting_is_named(s3_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.delenv(missing)
    with pytest.raises(StorageError, match=f"environment variable\\(s\\) {missing} ") as err:
        open_store("s3://bucket/prefix")
    assert s3_vars["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_s3_endpoint_must_have_scheme(s3_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:7480")
    with pytest.raises(StorageError, match=r"AWS_ENDPOINT_URL='127\.0\.0\.1:7480' must look like http"):
        open_store("s3://bucket/prefix")


def test_s3_unreachable_endpoint_fails_fast_and_names_it(
    s3_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "2")
    store = open_store("s3://bucket/prefix")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.read_bytes("model.safetensors")
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert s3_vars["AWS_ENDPOINT_URL"] in message
    assert "unreachable" in message and "s3://bucket/prefix/model.safetensors" in message
    assert s3_vars["AWS_SECRET_ACCESS_KEY"] not in message
    assert elapsed < 5, f"took {elapsed:.1f} s with a 2 s retry budget"


def test_retry_budget_env_is_validated(s3_vars: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, "soon")
    with pytest.raises(StorageError, match="STEP3VL_S3_RETRY_SECONDS='soon'"):
        open_store("s3://bucket/prefix")


@pytest.mark.parametrize("budget", [0.5, 2.0, 5.0, 20.0, 29.0, 60.0])
def test_retry_policy_worst_case_fits_budget(budget: float) -> None:
    retry, timeout = retry_policy(budget)
    worst = (retry.total + 1) * timeout.connect_timeout
    history = []
    for _ in range(retry.total):
        history.append(None)
        consecutive = len(history)
        if consecutive > 1:
            worst += min(retry.backoff_max, retry.backoff_factor * 2 ** (consecutive - 1))
    assert worst <= budget
    if budget >= storage.DEFAULT_RETRY_SECONDS:
        assert retry.total >= 4, "the default budget allows several retries"


_HOLD = ("import sys, time\nfrom step3vl.storage import file_lock\nwith file_lock(sys.argv[1]):\n"
         "    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")


def _holder(lock: Path, seconds: float):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_file_lock_waits_for_its_holder_and_says_so_once(tmp_path):
    lock = tmp_path / "not-yet" / ".root.lock"  # the folder is created
    holder = _holder(lock, 1.0)
    waited: list[float] = []
    t0 = time.monotonic()
    with storage.file_lock(lock, on_wait=lambda: waited.append(time.monotonic())):
        entered = time.monotonic()
    assert holder.wait(timeout=5) == 0  # the holder ran its block and exited cleanly
    assert len(waited) == 1 and waited[0] - t0 < 0.5 and entered - t0 >= 0.5
    free: list[float] = []
    with storage.file_lock(lock, on_wait=lambda: free.append(1.0)):
        pass
    assert free == []  # nobody held it: no waiting, no message


def test_file_lock_of_a_killed_holder_is_free(tmp_path):
    import signal

    lock = tmp_path / ".root.lock"
    holder = _holder(lock, 60.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    waited: list[int] = []
    t0 = time.monotonic()
    with storage.file_lock(lock, on_wait=lambda: waited.append(1)):
        pass
    assert waited == [] and time.monotonic() - t0 < 5


def test_seal_dir_publishes_a_directory_where_it_is(tmp_path: Path) -> None:
    d = tmp_path / "data"
    (d / "raw" / "a").mkdir(parents=True)
    (d / "raw" / "a" / "x.jsonl").write_text("{}\n")
    (d / "timings.json").write_text("{}")
    with pytest.raises(storage.NotPublishedError):
        storage.verify_dir(d)
    manifest = storage.seal_dir(d)
    assert sorted(manifest["files"]) == ["raw/a/x.jsonl", "timings.json"]
    assert storage.verify_dir(d) == manifest and storage.fetch_dir(str(d)) == d
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary manifest left beside it
    (d / "raw" / "a" / "x.jsonl").write_text("{} \n")
    with pytest.raises(storage.IntegrityError, match="raw/a/x.jsonl"):
        storage.verify_dir(d)


# --------------------------------------------------------------------------- RemoteFiles (a local "remote" here)


def _remote(tmp_path: Path, files: dict[str, str]) -> str:
    src = tmp_path / "src"
    shutil.rmtree(src, ignore_errors=True)
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    storage.publish_dir(src, tmp_path / "remote", overwrite=True)
    return str(tmp_path / "remote")


def _count_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys any LocalStore downloads from now on (every process-local RemoteFiles of these tests)."""
    got: list[str] = []
    real = storage.LocalStore.download_file

    def download_file(self: storage.LocalStore, key: str, local_path: object) -> None:
        got.append(key)
        real(self, key, local_path)

    monkeypatch.setattr(storage.LocalStore, "download_file", download_file)
    return got


def test_remote_files_download_each_file_once_verified_and_evict(tmp_path: Path, monkeypatch) -> None:
    uri = _remote(tmp_path, {"tok/a.json": "a", "tok/b.json": "bb", "packed/s0.bin": "000"})
    got = _count_downloads(monkeypatch)
    f = storage.RemoteFiles(uri, tmp_path / "node")
    assert (f.files("tok") / "b.json").read_text() == "bb"
    assert sorted(got) == ["tok/a.json", "tok/b.json"]  # only what was asked for
    got.clear()
    g = storage.RemoteFiles(uri, tmp_path / "node")  # another rank of the node
    assert g.file("tok/a.json") == f.dir / "tok/a.json" and got == []
    assert g.evict("tok/a.json") and not (f.dir / "tok/a.json").exists() and not g.evict("tok/a.json")
    assert g.file("tok/a.json").read_text() == "a" and got == ["tok/a.json"]
    with pytest.raises(storage.KeyNotFoundError, match="nope.txt is not in its MANIFEST.json"):
        f.file("nope.txt")
    # the whole directory: a copy that verifies like fetch_dir's, reusing what the cache holds
    whole = g.all()
    assert storage.verify_dir(whole)["files"].keys() == {"tok/a.json", "tok/b.json", "packed/s0.bin"}
    assert got == ["tok/a.json", "packed/s0.bin"]
    # a whole copy is pinned: a streaming rank's eviction cannot leave its manifest over a missing file
    assert not f.evict("packed/s0.bin") and storage.verify_dir(whole)


def test_a_whole_copy_made_while_a_rank_evicts_stays_whole(tmp_path: Path, monkeypatch) -> None:
    """all() pins its version before fetching: an eviction racing it (here: run between all()'s downloads and
    its manifest) removes nothing, so the manifest it writes covers files that are there."""
    uri = _remote(tmp_path, {"a.bin": "a", "b.bin": "bb"})
    streaming = storage.RemoteFiles(uri, tmp_path / "node")
    streaming.file("a.bin")
    whole = storage.RemoteFiles(uri, tmp_path / "node")
    real_file = storage.RemoteFiles.file
    evicted: list[bool] = []

    def file_then_evict(self: storage.RemoteFiles, rel: str) -> Path:
        path = real_file(self, rel)
        if self is whole:
            evicted.append(streaming.evict(rel))  # the other rank, right after this file arrived
        return path

    monkeypatch.setattr(storage.RemoteFiles, "file", file_then_evict)
    d = whole.all()
    assert evicted == [False, False]
    assert storage.verify_dir(d)["files"].keys() == {"a.bin", "b.bin"}


def test_remote_files_refuse_a_file_that_does_not_match_the_manifest(tmp_path: Path) -> None:
    uri = _remote(tmp_path, {"a.bin": "abc"})
    f = storage.RemoteFiles(uri, tmp_path / "node")
    (Path(uri) / "a.bin").write_text("abd")  # same size, other bytes
    with pytest.raises(storage.IntegrityError, match=r"a.bin does not match its MANIFEST.json: sha256"):
        f.file("a.bin")
    (Path(uri) / "a.bin").write_text("ab")
    with pytest.raises(storage.IntegrityError, match="2 bytes instead of 3"):
        f.file("a.bin")
    assert not any(p.is_file() for p in f.dir.rglob("*"))  # nothing half-written stays behind


def test_remote_files_of_data_published_anew_go_to_a_new_cache(tmp_path: Path) -> None:
    uri = _remote(tmp_path, {"a.txt": "one"})
    first = storage.RemoteFiles(uri, tmp_path / "node")
    first.file("a.txt")
    uri = _remote(tmp_path, {"a.txt": "two"})
    second = storage.RemoteFiles(uri, tmp_path / "node")
    assert second.dir != first.dir and second.dir.parent == first.dir.parent
    assert second.file("a.txt").read_text() == "two"
    with pytest.raises(storage.NotPublishedError):
        storage.RemoteFiles(str(tmp_path / "src"), tmp_path / "node")
