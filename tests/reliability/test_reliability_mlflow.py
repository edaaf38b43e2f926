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


def _wait_for(pred, proc, log, timeout=300.0):
    deadline = time.time() + timeout
    while not pred():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def _ck_step(ck):
    from step3vl.checkpoint import latest_valid_checkpoint, load_checkpoint

    latest = latest_valid_checkpoint(ck)
    return 0 if latest is None else load_checkpoint(latest).train_state["step"]


@pytest.mark.slow
@pytest.mark.integration
def test_tracking_server_lost_mid_stage(micro_data, tmp_path, monkeypatch, reliability):
    """Killed after the first checkpoint: (a) back while the stage trains → every point lands, run FINISHED;
    (b) gone until the stage ends → the stage still trains to the end, then fails naming the server and
    its journal; `step3vl tracking replay` sends the backlog afterwards and marks the run FAILED."""
    import mlflow
    from servers import mlflow_server
    from servers.mlflow_server import MlflowServer

    from step3vl.checkpoint import load_checkpoint

    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = MlflowServer(backend, str(tmp_path / "artifacts"), workers=1)
    url = server.start()
    port = int(url.rsplit(":", 1)[1])
    monkeypatch.setattr(mlflow_server, "_free_port", lambda: port)  # restarts come back on the same address
    home = tmp_path / "home"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MLFLOW_TRACKING_URI": url, "STEP3VL_HOME": str(home),
           # MLflow's own retries (default 7, exponential from 2 s) cut short so the loss is seen sooner
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    results = {}
    try:
        for part, flush_timeout in (("back", 300), ("gone", 3)):
            out = tmp_path / part
            ck = out / "checkpoints"
            cmd = [sys.executable, "-m", "step3vl.cli", "stage", "pretrain", "--config", str(MICRO), "--data",
                   str(micro_data.out_dir), "--out", str(out), "--set", "pretrain.checkpoint_every=1",
                   "--set", f"tracking.flush_timeout_s={flush_timeout}", "--set", f"tracking.experiment={part}"]
            log = tmp_path / f"{part}.log"
            with open(log, "wb") as f:
                proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
                _wait_for(lambda: _ck_step(ck) >= 1, proc, log)
                os.killpg(server._proc.pid, signal.SIGKILL)  # the server dies, no goodbye
                server.stop()
                killed_step = _ck_step(ck)
                if part == "back":
                    # training goes on without the server: two more checkpoints, then it returns
                    _wait_for(lambda: _ck_step(ck) >= killed_step + 2, proc, log)
                    trained_without = _ck_step(ck) - killed_step
                    server = MlflowServer(backend, str(tmp_path / "artifacts"), workers=1)
                    assert server.start() == url
                rc = proc.wait(timeout=300)
            text = log.read_text()
            if part == "gone":
                server = MlflowServer(backend, str(tmp_path / "artifacts"), workers=1)
                assert server.start() == url
                journals = list((home / "tracking-journal").glob("*.jsonl"))
                replay = subprocess.run([sys.executable, "-m", "step3vl.cli", "tracking", "replay"], env=env,
                                        capture_output=True, text=True, timeout=120)
                assert replay.returncode == 0, replay.stdout + replay.stderr
            client = mlflow.MlflowClient(url)
            runs = client.search_runs([client.get_experiment_by_name(part).experiment_id])
            assert len(runs) == 1
            run = client.get_run(runs[0].info.run_id)
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss"))
            final = load_checkpoint(out / "model")  # the stage trained to the end and published its model
            assert final.manifest["meta"]["step"] == 10
            assert steps == list(range(1, 11)), f"{part}: metrics lost or doubled: {steps}"
            assert f"127.0.0.1:{port} unreachable during pretrain" in text, text[-3000:]
            if part == "back":
                assert rc == 0, text[-3000:]
                assert "answers again" in text and run.info.status == "FINISHED"
                assert not list((home / "tracking-journal").glob("*.jsonl"))
                results[part] = (f"server killed at checkpoint {killed_step}, back after {trained_without} more "
                                 f"steps trained without it: the stage finished (exit 0), all {len(steps)} steps' "
                                 f"metrics in MLflow, run FINISHED")
            else:
                assert rc != 0, text[-3000:]
                assert f"127.0.0.1:{port} went away during pretrain" in text and str(journals[0]) in text
                assert "Traceback" not in text
                assert run.info.status == "FAILED" and "step3vl.tracking.replayed" in run.data.tags
                assert not list((home / "tracking-journal").glob("*.jsonl"))
                results[part] = (f"server killed at checkpoint {killed_step} and kept down: the stage still trained "
                                 f"to step 10 and published its model, then exited {rc} naming the server and its "
                                 f"journal; after the restart `step3vl tracking replay` sent the backlog "
                                 f"(all {len(steps)} steps' metrics in MLflow) and marked the run FAILED")
    finally:
        server.stop()
    reliability.record("mlflow-lost-mid-stage", outcome="; ".join(results[k] for k in ("back", "gone")),
                       data_lost="none (checkpoints, model and every metric point)")


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
