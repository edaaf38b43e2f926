"""The S3 gateway (real Ceph radosgw) dies in the middle of a checkpoint upload, then comes back.

Only the radosgw process is killed: the monitor and the OSD keep the objects, so what a reader sees
after the restart is what the interrupted publish really left behind.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from servers.radosgw import RadosGW, S3Server
from servers_fixtures import S3_TEST_BUCKET

from step3vl import storage
from step3vl.checkpoint import checkpoint_uri, latest_valid_checkpoint, load_checkpoint, save_checkpoint
from step3vl.storage import NotPublishedError, S3Store, StorageError, open_store, read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUDGET_S = 8.0  # 2 retries on a refused connection: sleeps of 0 s, then 1 s


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return {"model_state": model.state_dict(), "config": {"d": 64},
            "train_state": {"step": 2, "rng": torch.get_rng_state()}}


def _gateway(gw: RadosGW) -> Any:
    return next(p for p in gw._procs if p.args[0] == "radosgw" and p.poll() is None)


def test_gateway_stopped_mid_upload_then_restarted(radosgw_server: RadosGW, s3_env: S3Server,
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path, reliability):
    monkeypatch.setenv(storage.RETRY_SECONDS_ENV, str(BUDGET_S))
    ckpts = f"s3://{S3_TEST_BUCKET}/gw-{uuid.uuid4().hex[:8]}"
    state = _state()
    save_checkpoint(checkpoint_uri(ckpts, 1), **state)
    uri = checkpoint_uri(ckpts, 2)
    real_upload = S3Store.upload_file
    uploads: list[str] = []

    def upload_then_kill_gateway(self: S3Store, local_path: Any, key: str) -> None:
        real_upload(self, local_path, key)
        uploads.append(key)
        if len(uploads) == 1:
            gw = _gateway(radosgw_server)
            gw.send_signal(signal.SIGKILL)
            gw.wait()

    monkeypatch.setattr(S3Store, "upload_file", upload_then_kill_gateway)
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        save_checkpoint(uri, **state)
    elapsed = time.monotonic() - start
    monkeypatch.setattr(S3Store, "upload_file", real_upload)
    message = str(err.value)
    assert s3_env.endpoint in message and "unreachable" in message, message
    assert s3_env.secret_key not in message and s3_env.access_key not in message
    assert 0.9 < elapsed < BUDGET_S + 3, f"gave up after {elapsed:.1f} s (budget {BUDGET_S} s, backoff >= 1 s)"

    try:  # the gateway comes back on the same port, over the same cluster
        gw = radosgw_server._spawn("rgw", "radosgw", "-f", "-n", "client.rgw.a")
        radosgw_server._wait_http(s3_env.endpoint + "/", gw, time.monotonic() + 60)
    except BaseException:
        radosgw_server.stop()  # the next s3_env user gets a fresh server
        raise
    left = open_store(uri).list()
    assert left == uploads[:1], f"what the interrupted publish left: {left}"
    with pytest.raises(NotPublishedError):
        read_manifest(uri)
    assert latest_valid_checkpoint(ckpts) == checkpoint_uri(ckpts, 1), "the partial checkpoint is invisible"
    manifest = save_checkpoint(uri, **state)  # the rerun of the same step clears the leftover and completes
    assert latest_valid_checkpoint(ckpts) == uri
    ck = load_checkpoint(uri, tmp_path / "dl")
    assert all(torch.equal(ck.model_state[k], v) for k, v in state["model_state"].items())
    reliability.record(
        "s3-down-mid-upload",
        outcome=f"gateway killed after 1 of {len(manifest['files'])} uploads; StorageError naming the endpoint after "
                f"{elapsed:.1f} s (budget {BUDGET_S:g} s); readers saw no step 2 (latest stayed step 1); after the "
                f"restart the rerun published step 2 and it loads bit-exact",
        data_lost="none", seconds_to_error=round(elapsed, 2), error=message)
