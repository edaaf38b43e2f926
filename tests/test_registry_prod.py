"""The production registry topology, for real: an MLflow tracking server (``mlflow server`` from PyPI)
backed by PostgreSQL (Debian's) with its artifact store on S3 (Ceph radosgw, the session's server).

register → gate → promote / refuse → rollback → ``models:/NAME@champion`` load → greedy generation
(standing in for serving), and racing promotions from separate processes through the server. The
weights go to S3 directly (``save_checkpoint``); the tracking server only ever sees their URI and
checksums, which the test checks in the server's own access log.

Fails, never skips, when Ceph or PostgreSQL is missing: ``make test`` runs scripts/install-test-servers.sh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from servers.mlflow_server import MlflowServer
from servers.postgres import PostgreSQL, bindir
from servers.radosgw import RadosGW
from servers_fixtures import S3_TEST_BUCKET

from step3vl import registry
from step3vl.config import PromotionConfig, TrackingConfig
from step3vl.storage import open_store, read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
POLICY = PromotionConfig(headline="text_math", min_accuracy={"text_math": 0.2}, max_regression=0.02,
                         min_improvement=0.0)


@pytest.fixture(scope="module")
def prod(radosgw_server: RadosGW) -> Iterator[MlflowServer]:
    """PostgreSQL + the session's radosgw + ``mlflow server`` on them; env pointed at both for the module."""
    if bindir() is None:
        pytest.fail("integration tests need PostgreSQL (initdb not found); run scripts/install-test-servers.sh",
                    pytrace=False)
    t0 = time.monotonic()
    s3 = radosgw_server.start()
    pg = PostgreSQL("mlflow")
    dsn = pg.start()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3.env().items():
            mp.setenv(k, v)
        mp.delenv("AWS_CA_BUNDLE", raising=False)
        open_store(f"s3://{S3_TEST_BUCKET}", create=True)
        server = MlflowServer(dsn, f"s3://{S3_TEST_BUCKET}/mlartifacts",
                              {**s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}, workers=1)
        try:
            url = server.start()
            print(f"\nprod topology up in {time.monotonic() - t0:.1f} s: mlflow {url} on {dsn}, S3 {s3.endpoint}")
            mp.setenv("MLFLOW_TRACKING_URI", url)
            yield server
        finally:
            mlflow.set_tracking_uri(None)
            server.stop()
            pg.stop()


def m(**acc: float) -> dict[str, float]:
    return {f"greedy/{k}/accuracy": v for k, v in acc.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model config and a tokenizer (trained on the built-in corpus in ~1 s)."""
    from step3vl import config
    from step3vl.model.tokenizer import build_tokenizer, save_tokenizer

    cfg = config.load(config.ModelConfig, ROOT / "conf" / "model" / "tiny.yaml")
    tok = build_tokenizer(cfg.tokenizer)
    tok_dir = save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")
    return cfg, tok, tok_dir


def publish(tiny, prefix: str, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    """A random tiny model checkpoint written straight to S3; returns its URI and weights."""
    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model

    cfg, tok, tok_dir = tiny
    model = new_model(cfg, tok, seed)
    uri = f"{prefix}/v{seed}"
    save_checkpoint(uri, model_state=model.state_dict(), config=checkpoint_config(cfg, tok), tokenizer_dir=tok_dir,
                    extra_meta={"stage": "rlvr"})
    return uri, {k: v.clone() for k, v in model.state_dict().items()}


def cli(*args: str):
    """The step3vl CLI in this process (the race test below runs it in processes of its own)."""
    from typer.testing import CliRunner

    from step3vl.cli import app

    return CliRunner().invoke(app, list(args))


def test_register_gate_rollback_load_and_generate(prod: MlflowServer, tiny) -> None:
    from step3vl import tracking
    from step3vl.model.loading import load_model
    from step3vl.rl.rollout import Prompt, SamplingParams, TorchEngine

    t0 = time.monotonic()
    name = f"prod-{uuid.uuid4().hex[:6]}"
    prefix = f"s3://{S3_TEST_BUCKET}/ckpts-{name}"
    with tracking.pipeline_run(TrackingConfig(experiment=name), "pipeline") as parent:
        mlflow.log_text("config: tiny\n", "config.yaml")  # a run artifact: proxied by the server to S3
        parent_id = parent.info.run_id

    weights: dict[int, dict[str, torch.Tensor]] = {}

    def register(seed: int, metrics: dict[str, float]) -> str:
        uri, weights[seed] = publish(tiny, prefix, seed)
        mv = registry.register_final(name, uri, metrics=metrics, stage="rlvr", config_hash="c0ffee",
                                     data_manifest_hashes={"eval": "e" * 64}, kfp_run_id="kfp-run-1",
                                     parent_run_id=parent_id, run_id=parent_id)
        return str(mv.version)

    v1 = register(1, m(text_math=0.40, mm_math=0.30, perception_count=0.50))
    assert registry.promote(name, v1, policy=POLICY).promoted
    worse = register(2, m(text_math=0.45, mm_math=0.20, perception_count=0.30))
    refused = registry.promote(name, worse, policy=POLICY)
    assert not refused.promoted and set(refused.decision.failing_families) == {"mm_math", "perception_count"}
    better = register(3, m(text_math=0.45, mm_math=0.31, perception_count=0.49))
    assert registry.promote(name, better, policy=POLICY).promoted
    assert registry.resolve_model_uri(f"models:/{name}@champion") == f"{prefix}/v3"
    rb = cli("registry", "rollback", "--model", name, "--reason", "canary regressions")
    assert rb.exit_code == 0 and f"{name}@champion → version {v1} (was {better})" in rb.output, rb.output

    # every step is visible in `registry show`
    show = cli("registry", "show", "--model", name, "--json")
    assert show.exit_code == 0, show.output
    info = json.loads(show.output)
    assert info["aliases"] == {"candidate": better, "champion": v1}
    assert [(e["action"], e["version"]) for e in info["events"]] == [
        ("promote", v1), ("refuse", worse), ("promote", better), ("rollback", v1)]
    assert info["events"][1]["failing"] == ["mm_math", "perception_count"]
    by_version = {v["version"]: v for v in info["versions"]}
    gate2 = registry.version_gate(by_version[worse])
    assert gate2["decision"] == "refused" and gate2["failing_families"] == "mm_math,perception_count"
    assert any("mm_math: accuracy 0.2000 regressed 0.1000" in r for r in gate2["reasons"])
    tags = by_version[v1]["tags"]
    assert tags["step3vl.kfp_run_id"] == "kfp-run-1" and tags["step3vl.mlflow_parent_run_id"] == parent_id
    assert tags["step3vl.config_hash"] == "c0ffee" and tags["step3vl.data.eval.sha256"] == "e" * 64
    assert tags["step3vl.stage"] == "rlvr" and len(tags["step3vl.git_commit"]) >= 40
    assert tags[registry.MANIFEST_TAG] == registry.manifest_digest(read_manifest(f"{prefix}/v1"))
    print(f"\nregister x3, promote x3, rollback, show: {time.monotonic() - t0:.1f} s")

    # the champion loads by alias (weights verified against the manifest, fetched from S3) and generates
    t1 = time.monotonic()
    lm = load_model(f"models:/{name}@champion")
    assert lm.uri == f"{prefix}/v1"
    for k, v in lm.model.state_dict().items():
        if k in weights[1]:
            assert torch.equal(v, weights[1][k]), k
    engine = TorchEngine(lm.model, lm.tokenizer, lm.processor)
    (out,) = engine.generate([Prompt([{"role": "user", "content": "What is 2 + 3?"}])], 1,
                             SamplingParams(temperature=0.0, max_tokens=8))
    assert len(out[0].token_ids) >= 1 and out[0].finish_reason in ("stop", "length")
    print(f"load models:/{name}@champion from S3 + greedy generate: {time.monotonic() - t1:.1f} s")

    # weights never went through the tracking server: its artifact store has only the run's config.yaml,
    # and its access log shows no artifact transfer other than that one upload
    artifacts = open_store(f"s3://{S3_TEST_BUCKET}/mlartifacts").list()
    assert any(a.endswith(f"{parent_id}/artifacts/config.yaml") for a in artifacts), artifacts
    assert not any(a.endswith(".safetensors") for a in artifacts)
    transfers = [ln for ln in prod.log_text().splitlines() if "/mlflow-artifacts/" in ln]
    assert transfers and all("config.yaml" in ln for ln in transfers), transfers


RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from step3vl import registry
    real = registry.RegistryLock.acquire
    def acquire_when_both_ready(self):
        # both processes have read the champion: start the race for the lock together
        Path(os.environ["RACE_DIR"], os.environ["RACE_ME"]).touch()
        while len(os.listdir(os.environ["RACE_DIR"])) < 2:
            time.sleep(0.01)
        return real(self)
    registry.RegistryLock.acquire = acquire_when_both_ready
    from step3vl.cli import main
    sys.argv = ["step3vl", *sys.argv[1:]]
    main()
""")


def test_racing_promotions_through_the_server_end_with_one_champion(prod: MlflowServer, tiny, tmp_path) -> None:
    """Two `step3vl promote` processes, both sure the base version is champion, race for the alias: one
    wins, the other exits 2 naming the winner. Then three rounds of three racing threads."""
    name = f"race-{uuid.uuid4().hex[:6]}"
    prefix = f"s3://{S3_TEST_BUCKET}/ckpts-{name}"
    uri, _ = publish(tiny, prefix, 0)  # one checkpoint; versions differ by their metrics only

    def register(acc: float) -> str:
        return str(registry.register_final(name, uri, metrics=m(text_math=acc), stage="rlvr", config_hash="x",
                                           commit="abc").version)

    base = register(0.30)
    registry.promote(name, base, policy=POLICY)
    t0 = time.monotonic()
    a, b = register(0.40), register(0.40)
    procs = {v: subprocess.Popen(
        [sys.executable, "-c", RACER, "promote", "--model", name, "--version", v, "--actor", f"proc-{v}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "RACE_DIR": str(tmp_path), "RACE_ME": v}) for v in (a, b)}
    results = {v: (p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for v, p in procs.items()}
    champion = registry.describe(name)["aliases"]["champion"]
    assert champion in (a, b)
    loser = b if champion == a else a
    assert results[champion][0] == 0 and "promoted" in results[champion][1], results
    rc, _, err = results[loser]
    assert rc == 2 and f"version {champion} won" in err and f"while promoting version {loser}" in err, results
    assert f"(by proc-{champion})" in err
    print(f"\nprocess race through the server: {time.monotonic() - t0:.1f} s")

    t0 = time.monotonic()
    for rnd in range(3):
        vs = [register(0.60 + rnd / 20) for _ in range(3)]
        outcomes: dict[str, object] = {}
        start = threading.Barrier(3)

        def go(v: str) -> None:
            start.wait()
            try:
                outcomes[v] = registry.promote(name, v, policy=POLICY, expected=champion)
            except Exception as e:  # noqa: BLE001 - checked below
                outcomes[v] = e

        threads = [threading.Thread(target=go, args=(v,)) for v in vs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [v for v, o in outcomes.items() if isinstance(o, registry.PromotionResult) and o.promoted]
        assert len(winners) == 1, outcomes
        champion = registry.describe(name)["aliases"]["champion"]
        assert champion == winners[0]
        losers = [o for v, o in outcomes.items() if v != champion]
        assert len(losers) == 2 and all(isinstance(o, registry.PromotionConflict) for o in losers), outcomes
        assert all(f"version {champion} won" in str(o) for o in losers)
    events = registry.describe(name)["events"]
    assert [e["action"] for e in events].count("promote") == 1 + 1 + 3  # base, process race, thread races
    print(f"3 three-thread races through the server: {time.monotonic() - t0:.1f} s")
