"""The journaled metrics sink: training never waits on the tracking server, nothing logged is lost."""

from __future__ import annotations

import json
import threading
import time

import mlflow
import pytest

from step3vl import tracking
from step3vl.config import TrackingConfig


class FlakyServer:
    """Stands in for ``tracking._send``/``_reachable``: down while ``up`` is clear; records what arrives."""

    def __init__(self, up: bool = True) -> None:
        self.up = threading.Event()
        if up:
            self.up.set()
        self.received: list[tuple[str, int, float]] = []
        self.calls = 0

    def send(self, client, run_id, batch):
        self.calls += 1
        if not self.up.is_set():
            raise ConnectionError(f"connection refused by {client._tracking_client.tracking_uri}")
        self.received += [(m["key"], m["step"], m["value"]) for m in batch if m["kind"] == "metric"]

    def reachable(self, uri):
        return self.up.is_set()


@pytest.fixture
def flaky(monkeypatch, tmp_path):
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    server = FlakyServer()
    monkeypatch.setattr(tracking, "_send", server.send)
    monkeypatch.setattr(tracking, "_reachable", server.reachable)
    return server


def _journal_items(path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    acked = max([x["n"] for x in lines if x["kind"] == "ack"], default=0)
    items = [x for x in lines if x["kind"] == "metric"]
    return items, acked


def test_points_flow_through_and_the_journal_is_removed(flaky):
    sink = tracking.MetricSink("run1", "http://mlflow.example:5000", "pretrain")
    for step in range(1, 51):
        sink.log_metrics({"pretrain/loss": 1.0 / step, "pretrain/lr": 0.1}, step=step)
    sink.close(timeout=10)
    assert [r for r in flaky.received if r[0] == "pretrain/loss"] == [("pretrain/loss", s, 1.0 / s) for s in range(1, 51)]
    assert len(flaky.received) == 100
    assert not sink.path.exists(), "a fully sent journal is deleted"


def test_server_lost_then_back_mid_stage_loses_nothing_and_never_blocks(flaky):
    flaky.up.clear()
    sink = tracking.MetricSink("run2", "http://mlflow.example:5000", "sft")
    t0 = time.monotonic()
    for step in range(1, 201):
        sink.log_metrics({"sft/loss": float(step)}, step=step)
    assert time.monotonic() - t0 < 1.0, "logging waited on a dead server"
    deadline = time.monotonic() + 10
    while sink.lost_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.lost_since is not None and "connection refused" in sink.last_error
    items, acked = _journal_items(sink.path)
    assert len(items) == 200 and acked == 0  # every point is on disk while the server is gone
    flaky.up.set()
    sink.close(timeout=30)
    assert [s for _, s, _ in flaky.received] == list(range(1, 201))
    assert sink.lost_since is None and sink.sent_after_loss == 200
    assert not sink.path.exists()


def test_server_gone_for_good_raises_naming_it_and_keeps_the_journal(flaky):
    flaky.up.clear()
    sink = tracking.MetricSink("run3", "http://alice:pw@mlflow.example:5000", "rlvr")
    sink.log_metrics({"rlvr/reward": 0.5}, step=1)
    with pytest.raises(tracking.TrackingLost) as err:
        sink.close(timeout=0.5)
    msg = str(err.value)
    assert "http://***@mlflow.example:5000" in msg and "alice:pw" not in msg
    assert str(sink.path) in msg and "rlvr" in msg and "step3vl tracking replay" in msg
    items, acked = _journal_items(sink.path)
    assert [(i["key"], i["step"]) for i in items] == [("rlvr/reward", 1)] and acked == 0


def test_replay_sends_only_what_was_never_acknowledged_and_marks_the_run_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.preflight(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    run = client.create_run(exp)
    # a stage sent steps 1-3, then its server went away and the process died (journal unlocked, run RUNNING)
    real_send = tracking._send
    sent = {"n": 0}

    def send_three_then_die(client, run_id, batch):
        if sent["n"] >= 3:
            raise ConnectionError("gone")
        real_send(client, run_id, batch)
        sent["n"] += len(batch)

    monkeypatch.setattr(tracking, "_send", send_three_then_die)
    monkeypatch.setattr(tracking, "_reachable", lambda u: sent["n"] < 3)
    sink = tracking.MetricSink(run.info.run_id, uri, "pretrain")
    for step in (1, 2, 3):
        sink.log_metrics({"pretrain/loss": float(step)}, step=step)
        while sink.backlog:
            time.sleep(0.01)
    for step in (4, 5, 6):
        sink.log_metrics({"pretrain/loss": float(step)}, step=step)
    with pytest.raises(tracking.TrackingLost):
        sink.close(timeout=0.3)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [1, 2, 3]
    monkeypatch.setattr(tracking, "_send", real_send)
    done = tracking.replay_journals(uri)
    assert [(r.run_id, r.sent, r.marked_failed) for r in done] == [(run.info.run_id, 3, True)]
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss"))
    assert steps == [1, 2, 3, 4, 5, 6], "duplicates or losses"
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FAILED" and "pretrain" in got.data.tags["step3vl.tracking.replayed"]
    assert not sink.path.exists() and tracking.replay_journals(uri) == []


def test_replay_leaves_a_live_writers_journal_alone(flaky, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flaky.up.clear()
    sink = tracking.MetricSink("live", uri, "sft")
    sink.log_metrics({"sft/loss": 1.0}, step=1)
    assert tracking.replay_journals(uri) == []  # its writer holds the lock
    assert sink.path.exists()
    flaky.up.set()
    sink.close(timeout=10)


def test_stage_run_routes_metrics_through_the_sink_and_ends_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(experiment="sink")
    with tracking.stage_run("pretrain", cfg) as run:
        assert tracking._SINK is not None
        for step in range(1, 6):
            tracking.log_metrics({"pretrain/loss": float(step)}, step=step)
    assert tracking._SINK is None
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "pretrain/loss")] == [1, 2, 3, 4, 5]
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["step3vl.device"] == "cpu"  # where it computed
    assert not list((tmp_path / "home" / "tracking-journal").glob("*.jsonl"))


def test_stage_run_that_loses_the_server_fails_loudly_without_minutes_of_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server = FlakyServer()
    monkeypatch.setattr(tracking, "_send", server.send)
    monkeypatch.setattr(tracking, "_reachable", server.reachable)
    cfg = TrackingConfig(experiment="sink", flush_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingLost, match="went away during pretrain"):
        with tracking.stage_run("pretrain", cfg):
            server.up.clear()
            tracking.log_metrics({"pretrain/loss": 1.0}, step=1)
    assert time.monotonic() - t0 < 10
    assert mlflow.active_run() is None
    assert len(list((tmp_path / "home" / "tracking-journal").glob("*.jsonl"))) == 1



def _drain(sink):
    deadline = time.monotonic() + 10
    while sink.backlog and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not sink.backlog


def test_records_the_store_refuses_are_set_aside_at_once_and_the_rest_still_go(flaky, monkeypatch):
    """A store that answers with an error no retry can fix (here: a value it rejects) is not a lost server: the
    refused batch is set aside at once, later ones are still sent, and close() says so without waiting for its
    timeout, keeping the refused records in a journal that replay leaves alone."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    def send(client, run_id, batch):
        if any(m.get("key") == "sft/bad" for m in batch):
            raise MlflowException("Got invalid value for metric 'sft/bad'", error_code=INVALID_PARAMETER_VALUE)
        flaky.send(client, run_id, batch)

    monkeypatch.setattr(tracking, "_send", send)
    uri = "http://mlflow.example:5000"
    sink = tracking.MetricSink("run5", uri, "sft")
    for step, metrics in enumerate(({"sft/loss": 1.0}, {"sft/bad": 2.0}, {"sft/loss": 0.5}), 1):
        sink.log_metrics(metrics, step=step)
        _drain(sink)  # one batch each
    assert sink.lost_since is None and sink.refused == 1
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingRefused) as err:
        sink.close(timeout=60)
    assert time.monotonic() - t0 < 5
    kept = sink.path.with_name(sink.path.name + tracking.REFUSED_SUFFIX)
    msg = str(err.value)
    assert "refused 1 " in msg and "INVALID_PARAMETER_VALUE" in msg and "sft/bad" in msg and "run5" in msg
    assert str(kept) in msg
    assert flaky.received == [("sft/loss", 1, 1.0), ("sft/loss", 3, 0.5)]
    lines = [json.loads(x) for x in kept.read_text().splitlines()]
    assert [x["n"] for x in lines if x["kind"] == "refused"] == [1] and not sink.path.exists()
    assert tracking.replay_journals(uri) == [] and kept.exists()


def test_stage_whose_run_is_deleted_mid_stage_fails_at_once_naming_it(tmp_path, monkeypatch):
    """A real store: the stage's run deleted while it trains refuses every later point. The stage ends with
    TrackingRefused within seconds (not after flush_timeout_s of retries), its run popped, nothing to replay."""
    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.preflight(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("deleted", artifact_location=str(tmp_path / "artifacts"))
    cfg = TrackingConfig(uri=uri, experiment="deleted", flush_timeout_s=300)
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingRefused, match="must be in the 'active' state") as err:
        with tracking.stage_run("rlvr", cfg) as run:
            tracking.log_metrics({"rlvr/reward": 0.1}, step=1)
            _drain(tracking._SINK)
            client.delete_run(run.info.run_id)
            tracking.log_metrics({"rlvr/reward": 0.2}, step=2)
    assert time.monotonic() - t0 < 30
    assert run.info.run_id in str(err.value) and mlflow.active_run() is None
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rlvr/reward")] == [1]
    assert tracking.replay_journals(uri) == []
    assert len(list((tmp_path / "home" / "tracking-journal").glob("*" + tracking.REFUSED_SUFFIX))) == 1
