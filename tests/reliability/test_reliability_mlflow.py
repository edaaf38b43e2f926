"""The MLflow tracking server is unreachable at start, or dies in the middle of a training stage."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from step3vl import tracking

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "conf" / "micro.yaml"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@contextlib.contextmanager
def _health_server() -> Iterator[int]:
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_preflight_fails_fast_naming_the_uri(tmp_path, reliability):
    timings = {}
    closed = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=f"{closed} is unreachable"):
        tracking.preflight(closed, timeout=1)
    timings["refused"] = time.monotonic() - t0
    with _silent_server() as port:
        t0 = time.monotonic()
        with pytest.raises(tracking.TrackingUnavailable, match=f"http://\\*\\*\\*@127.0.0.1:{port} is unreachable") as e:
            tracking.preflight(f"http://alice:s3cr3t-pw@127.0.0.1:{port}", timeout=1)
        timings["silent"] = time.monotonic() - t0
        assert "s3cr3t-pw" not in str(e.value)
    with pytest.raises(tracking.TrackingUnavailable, match="/proc/nope"):
        tracking.preflight("sqlite:////proc/nope/mlflow.db")
    with _health_server() as port:
        assert tracking.preflight(f"http://127.0.0.1:{port}", timeout=1) == f"http://127.0.0.1:{port}"
    assert tracking.preflight(f"sqlite:///{tmp_path}/m/mlflow.db").endswith("mlflow.db")
    assert timings["refused"] < 1 and timings["silent"] < 2.5, timings
    reliability.record("mlflow-preflight", outcome=f"TrackingUnavailable naming the URI after {timings['refused']:.2f} s "
                       f"(connection refused) and {timings['silent']:.1f} s (no answer, timeout 1 s); password masked",
                       data_lost="n/a (nothing started)")


@pytest.mark.slow
def test_run_refuses_to_start_without_tracking(tmp_path, reliability):
    uri = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "STEP3VL_HOME": str(tmp_path / "home")}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "step3vl.cli", "run", "--config", str(MICRO)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"MLflow tracking server {uri} is unreachable" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "home" / "kfp").exists(), "pipeline work started"
    reliability.record("mlflow-preflight", outcome=f"`step3vl run` exited 2 after {elapsed:.1f} s (CLI start-up "
                       f"included) with one line naming {uri}; no KFP work started", data_lost="n/a (nothing started)")


@pytest.mark.slow
@pytest.mark.integration
def test_tracking_server_lost_mid_stage(micro_data, tmp_path, monkeypatch, reliability):
    import mlflow
    from servers import mlflow_server
    from servers.mlflow_server import MlflowServer

    from step3vl.checkpoint import latest_valid_checkpoint, load_checkpoint

    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = MlflowServer(backend, str(tmp_path / "artifacts"), workers=1)
    url = server.start()
    port = int(url.rsplit(":", 1)[1])
    out = tmp_path / "pretrain"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MLFLOW_TRACKING_URI": url,
           # MLflow's own retries (default 7, exponential from 2 s) cut short so the test sees the end
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    cmd = [sys.executable, "-m", "step3vl.cli", "stage", "pretrain", "--config", str(MICRO), "--data",
           str(micro_data.out_dir), "--out", str(out), "--set", "pretrain.checkpoint_every=1"]
    log = tmp_path / "stage.log"
    ck = out / "checkpoints"
    try:
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            deadline = time.time() + 300
            while proc.poll() is None and latest_valid_checkpoint(ck) is None:
                assert time.time() < deadline
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()[-3000:]
            os.killpg(server._proc.pid, signal.SIGKILL)  # the server dies, no goodbye
            server.stop()
            killed_at = time.monotonic()
            rc = proc.wait(timeout=300)
        stopped_after = time.monotonic() - killed_at
        text = log.read_text()
        monkeypatch.setattr(mlflow_server, "_free_port", lambda: port)
        server = MlflowServer(backend, str(tmp_path / "artifacts"), workers=1)
        assert server.start() == url  # back, same address, same store
        client = mlflow.MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("step3vl-micro").experiment_id])
        assert len(runs) == 1
        run = runs[0]
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss"))
    finally:
        server.stop()
    latest = latest_valid_checkpoint(ck)
    assert latest is not None, "a checkpoint published before the loss is gone"
    kept = load_checkpoint(latest).train_state["step"]
    if rc == 0:
        assert steps == list(range(1, 11)) and (out / "model" / "MANIFEST.json").exists()
        outcome = f"training continued; all {len(steps)} steps' metrics in the run after it returned"
    else:
        assert f"127.0.0.1:{port}" in text, text[-3000:]  # the error names the server
        assert kept >= 1 and steps and max(steps) <= kept + 1
        outcome = (f"stage stopped {stopped_after:.0f} s after the server died (exit {rc}), error naming "
                   f"127.0.0.1:{port}; checkpoints up to step {kept} kept and valid (the rerun resumes from them); "
                   f"metrics of steps {steps[0]}-{steps[-1]} are in MLflow; the run stays '{run.info.status}' "
                   f"(not marked failed: the server was gone)")
    reliability.record("mlflow-lost-mid-stage", outcome=outcome, data_lost="none (checkpoints); metrics after the "
                       "loss were not logged, the stage failed loudly" if rc else "none",
                       exit_code=rc, run_status=run.info.status, steps_logged=len(steps), checkpoint_step=kept)


_OPEN_RUN = """
import sys
from step3vl import tracking
from step3vl.config import TrackingConfig
tracking.preflight(tracking.tracking_uri())
with tracking.pipeline_run(TrackingConfig(experiment="race"), sys.argv[1]) as run:
    print(run.info.run_id)
"""


@pytest.mark.slow
def test_two_runs_starting_on_a_fresh_store_both_open_it(tmp_path, reliability):
    """Without the locked store creation in preflight, one of two simultaneous first runs dies in MLflow's
    schema migration ("duplicate column name" / "Online migration expected to match one row")."""
    for trial in range(2):
        env = {**os.environ, "STEP3VL_HOME": str(tmp_path / f"home{trial}")}
        env.pop("MLFLOW_TRACKING_URI", None)
        procs = [subprocess.Popen([sys.executable, "-c", _OPEN_RUN, name], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-2000:]
        assert len({out.strip() for out, _ in outs}) == 2
    reliability.record("concurrent-pipelines", outcome="two first runs on a fresh SQLite store opened it together "
                       "(2 trials; before the locked creation in tracking.preflight one of them died in MLflow's "
                       "schema migration)", data_lost="none")
