"""The model registry: the eval gate on hand-made numbers, lineage tags, promotion, rollback, the alias
lock under racing promotions, and the CLI. Embedded SQLite store per test; the PostgreSQL + S3
production topology is tests/test_registry_prod.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from typer.testing import CliRunner

from step3vl import registry
from step3vl.checkpoint import save_checkpoint
from step3vl.config import PromotionConfig
from step3vl.registry import GateDecision, PromotionConflict, RegistryError, RegistryLock, gate

POLICY = PromotionConfig(headline="text_math", min_accuracy={"text_math": 0.3, "ocr": 0.5},
                         max_regression=0.02, min_improvement=0.01)


def m(**acc: float) -> dict[str, float]:
    """Evaluate-stage metrics for the given family accuracies (plus noise keys the gate must ignore)."""
    out = {f"greedy/{k}/accuracy": v for k, v in acc.items()}
    out.update({f"greedy/{k}/n": 100.0 for k in acc}, **{f"sere/{k}/accuracy": 0.0 for k in acc})
    return out


# --------------------------------------------------------------------------- the gate (no MLflow)


def test_gate_first_promotion_checks_floors_only():
    assert gate(m(text_math=0.3, ocr=0.5), None, POLICY).passed
    d = gate(m(text_math=0.29, ocr=0.9), None, POLICY)
    assert not d.passed and d.failing_families == ("text_math",)
    assert "text_math: accuracy 0.2900 is below the floor 0.3000" in d.reasons
    d = gate(m(text_math=0.5), None, POLICY)
    assert d.failing_families == ("ocr",) and "not evaluated" in d.reasons[0]


def test_gate_against_champion_names_every_failing_family():
    champ = m(text_math=0.50, ocr=0.80, chart=0.40)
    # better headline, regressions within 0.02 elsewhere → pass
    ok = gate(m(text_math=0.52, ocr=0.78, chart=0.385), champ, POLICY)
    assert ok == GateDecision(True, ok.reasons, ())
    assert any("headline text_math: 0.5200 vs the champion's 0.5000 (+0.0200)" in r for r in ok.reasons)
    # chart drops 0.05, ocr 0.03, headline gains only +0.005 < 0.01
    bad = gate(m(text_math=0.505, ocr=0.77, chart=0.35), champ, POLICY)
    assert not bad.passed
    assert set(bad.failing_families) == {"chart", "ocr", "text_math"}
    text = "\n".join(bad.reasons)
    assert "chart: accuracy 0.3500 regressed 0.0500 from the champion's 0.4000 (max 0.0200)" in text
    assert "does not improve by 0.0100" in text
    # a family the champion was evaluated on but the candidate was not fails too
    miss = gate(m(text_math=0.6, ocr=0.8), champ, POLICY)
    assert miss.failing_families == ("chart",)


def test_gate_boundaries_are_inclusive_and_modes_are_separate():
    champ = m(text_math=0.50, ocr=0.80)
    exact = gate(m(text_math=0.51, ocr=0.78), champ, POLICY)  # exactly min_improvement, exactly max_regression
    assert exact.passed, exact.reasons
    sere = PromotionConfig(mode="sere", headline="text_math")
    d = gate(m(text_math=0.9), m(text_math=0.1), sere)  # sere accuracies are all 0.0 in m()
    assert d.passed  # 0.0 vs 0.0: no regression, +0 improvement meets min_improvement 0
    assert gate({}, None, POLICY).reasons == ("no greedy/<family>/accuracy metrics recorded for the candidate",)
    # EvalResult.metrics() without a prefix is read too
    assert registry.family_accuracies({"ocr/accuracy": 0.5, "mean_accuracy": 0.5}) == {"ocr": 0.5}
    tagged = registry.metrics_from_tags(registry.metric_tags({"majority@8/ocr/accuracy": 0.25}))
    assert registry.family_accuracies(tagged, "majority@8") == {"ocr": 0.25}


def test_promotion_config_section(tmp_path):
    from step3vl import config
    from step3vl.config import ConfigError, PipelineConfig

    conf = Path(__file__).resolve().parent.parent / "conf" / "pipeline"
    tiny = config.load(PipelineConfig, conf / "tiny.yaml").promotion
    assert tiny.headline == "text_math" and set(tiny.min_accuracy) >= {"text_math", "mm_math"}
    big = config.load(PipelineConfig, conf / "step3vl-10b.yaml", ["promotion.min_accuracy.ocr=0.9"]).promotion
    assert big.min_accuracy["ocr"] == 0.9 and big.min_accuracy["mm_math"] == 0.5  # siblings kept
    assert PipelineConfig().promotion == PromotionConfig()
    p = tmp_path / "p.yaml"
    for body, match in [("promotion: {min_accuracy: {ocr: 1.5}}", r"'promotion\.min_accuracy\.ocr' must be an accuracy"),
                        ("promotion: {max_regression: -0.1}", r"'promotion\.max_regression' must be in \[0, 1\]"),
                        ("promotion: {mode: beam}", r"'promotion\.mode' is 'beam'"),
                        ("promotion: {headlin: ocr}", r"unknown key 'promotion\.headlin'")]:
        p.write_text(f"model: tiny\n{body}\n")
        with pytest.raises(ConfigError, match=match):
            config.load(PipelineConfig, p)


# --------------------------------------------------------------------------- MLflow (embedded SQLite)


@pytest.fixture(scope="module")
def _home(tmp_path_factory):
    """One embedded store per module (creating one costs ~3 s of migrations); tests use distinct model names."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEP3VL_HOME", str(tmp_path_factory.mktemp("registry") / ".step3vl"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("STEP3VL_ACTOR", "tester")
        yield
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def store(_home, tmp_path):
    return tmp_path


@pytest.fixture()
def name(request) -> str:
    return request.node.name.removeprefix("test_")[:60]


def ckpt(root: Path, i: int) -> str:
    uri = str(root / "ckpts" / f"m{i}")
    torch.manual_seed(i)
    save_checkpoint(uri, model_state=torch.nn.Linear(4, 4).state_dict(), config={"i": i})
    return uri


def reg(root: Path, name: str, i: int, metrics: dict[str, float], **kw) -> str:
    mv = registry.register_final(name, ckpt(root, i), metrics=metrics, stage="rlvr", config_hash="abc123",
                                 commit="deadbeef", **kw)
    return str(mv.version)


def test_register_final_records_lineage_and_sets_candidate(store, name):
    mv = registry.register_final(
        name, ckpt(store, 1), metrics=m(text_math=0.4, ocr=0.6), stage="pacore", config_hash="cafe",
        data_manifest_hashes=registry.data_hashes({"sets": {"eval": {"content_hash": "e1"}, "rl": {"content_hash": "r1"}}}),
        kfp_run_id="kfp-123", parent_run_id="run-456", commit="0123abc")
    info = registry.describe(name)
    (v,) = info["versions"]
    t = v["tags"]
    assert v["version"] == str(mv.version) and v["aliases"] == ["candidate"] and v["source"] == str(store / "ckpts/m1")
    assert t["step3vl.kfp_run_id"] == "kfp-123" and t["step3vl.mlflow_parent_run_id"] == "run-456"
    assert t["step3vl.git_commit"] == "0123abc" and t["step3vl.config_hash"] == "cafe"
    assert t["step3vl.stage"] == "pacore"
    assert t["step3vl.data.eval.sha256"] == "e1" and t["step3vl.data.rl.sha256"] == "r1"
    assert t["metric.greedy/ocr/accuracy"] == "0.6" and v["metrics"]["greedy/text_math/accuracy"] == 0.4
    assert len(t[registry.MANIFEST_TAG]) == 64
    assert registry.resolve_model_uri(f"models:/{name}@candidate") == str(store / "ckpts/m1")
    # the default commit is this checkout's HEAD
    assert len(registry.git_commit().split("+")[0]) == 40


def test_promote_refuse_promote_rollback_all_recorded(store, name):
    v1 = reg(store, name, 1, m(text_math=0.40, ocr=0.60))
    first = registry.promote(name, v1, policy=POLICY)
    assert first.promoted and first.previous is None
    worse = reg(store, name, 2, m(text_math=0.45, ocr=0.50))
    r = registry.promote(name, worse, policy=POLICY)
    assert not r.promoted and r.decision.failing_families == ("ocr",)
    assert "ocr: accuracy 0.5000 regressed 0.1000" in r.decision.reasons[0]
    better = reg(store, name, 3, m(text_math=0.45, ocr=0.61))
    assert registry.promote(name, better, policy=POLICY).promoted
    assert registry.resolve_model_uri(f"models:/{name}@champion") == str(store / "ckpts/m3")

    info = registry.describe(name)
    assert info["aliases"] == {"candidate": better, "champion": better}
    g2 = registry.version_gate(info["versions"][1])
    assert g2["decision"] == "refused" and g2["failing_families"] == "ocr" and g2["compared_to"] == v1
    assert g2["actor"] == "tester" and g2["policy"]["max_regression"] == 0.02
    assert registry.version_gate(info["versions"][2])["decision"] == "passed"

    rb = registry.rollback(name, reason="bad outputs in canary")
    assert (rb.version, rb.previous) == (v1, better)
    assert registry.resolve_model_uri(f"models:/{name}@champion") == str(store / "ckpts/m1")
    info = registry.describe(name)
    assert [(e["action"], e["version"], e["previous"]) for e in info["events"]] == [
        ("promote", v1, None), ("refuse", worse, v1), ("promote", better, v1), ("rollback", v1, better)]
    assert json.loads(info["versions"][2]["tags"]["step3vl.gate.champion.rolled_back"])["reason"] == "bad outputs in canary"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(name)


def test_force_needs_reason_and_records_who_and_why(store, name):
    v1 = reg(store, name, 1, m(text_math=0.40, ocr=0.60))
    registry.promote(name, v1, policy=POLICY)
    v2 = reg(store, name, 2, m(text_math=0.10, ocr=0.60))
    with pytest.raises(RegistryError, match="needs --reason"):
        registry.promote(name, v2, policy=POLICY, force=True)
    r = registry.promote(name, v2, policy=POLICY, force=True, reason="hotfix for tokenizer bug", actor="alice")
    assert r.promoted and r.forced and r.decision.failing_families == ("text_math",)
    g = registry.version_gate(registry.describe(name)["versions"][1])
    assert (g["decision"], g["actor"], g["force_reason"]) == ("forced", "alice", "hotfix for tokenizer bug")
    # rollback walks back through forced moves too, and to an explicit earlier champion only
    v3 = reg(store, name, 3, m(text_math=0.20, ocr=0.60))
    registry.promote(name, v3, policy=POLICY)
    with pytest.raises(RegistryError, match="was not an earlier champion"):
        registry.rollback(name, to_version="99")
    assert registry.rollback(name, to_version=v1).version == v1
    assert registry.alias_stack(registry.describe(name)["events"]) == [v1]


def test_lock_is_mutually_exclusive(store, name):
    """Read-modify-write of a tag under the lock from 6 threads loses no update."""
    c = registry.client()
    c.create_registered_model(name)
    c.set_registered_model_tag(name, "counter", "0")

    def bump() -> None:
        for _ in range(3):
            with RegistryLock(registry.client(), name, "champion", timeout_s=60, poll_s=0.02):
                n = int(c.get_registered_model(name).tags["counter"])
                time.sleep(0.005)
                c.set_registered_model_tag(name, "counter", str(n + 1))

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.get_registered_model(name).tags["counter"] == "18"
    assert [rm.name for rm in c.search_registered_models() if name in rm.name] == [name], "locks released"


def test_stale_lock_is_broken_and_fresh_lock_times_out(store, name):
    c = registry.client()
    c.create_registered_model(name)
    dead = RegistryLock(c, name, "champion", actor="crashed-job", purpose="promote v9", lease_s=0.5)
    dead.acquire()  # never released: its holder "died"
    live = RegistryLock(c, name, "champion", actor="bob", purpose="promote v1", lease_s=60, timeout_s=30)
    t0 = time.monotonic()
    with live:
        assert time.monotonic() - t0 >= 0.3, "the dead holder's lease was honoured until it ran out"
        assert live.still_held() and not dead.still_held()
        with pytest.raises(registry.LockTimeout, match=r"locked by bob \(promote v1, since .*\); gave up after 0.3 s"):
            with RegistryLock(c, name, "champion", timeout_s=0.3):
                pass
    assert live.holder() is None
    assert [rm.name for rm in c.search_registered_models() if name in rm.name] == [name], "lock, marker gone"


def race(name: str, versions: list[str], monkeypatch) -> list[object]:
    """Promote ``versions`` concurrently; every thread reads the champion before any takes the lock."""
    barrier = threading.Barrier(len(versions))
    real = RegistryLock.acquire

    def acquire_after_all_read(self):
        barrier.wait(timeout=30)
        return real(self)

    monkeypatch.setattr(RegistryLock, "acquire", acquire_after_all_read)
    results: list[object] = [None] * len(versions)

    def one(i: int) -> None:
        try:
            results[i] = registry.promote(name, versions[i], policy=POLICY, actor=f"racer{i}")
        except Exception as e:  # noqa: BLE001 - collected for the assertions
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(versions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.setattr(RegistryLock, "acquire", real)
    return results


def test_racing_promotions_end_with_one_champion_and_the_loser_told_why(store, name, monkeypatch):
    v = reg(store, name, 0, m(text_math=0.40, ocr=0.60))
    registry.promote(name, v, policy=POLICY)
    for rnd in range(4):
        a = reg(store, name, 10 * rnd + 1, m(text_math=0.50 + rnd * 0.1, ocr=0.60))
        b = reg(store, name, 10 * rnd + 2, m(text_math=0.50 + rnd * 0.1, ocr=0.61))
        before = registry.describe(name)["aliases"]["champion"]
        res = race(name, [a, b], monkeypatch)
        wins = [r for r in res if isinstance(r, registry.PromotionResult) and r.promoted]
        losses = [r for r in res if isinstance(r, PromotionConflict)]
        assert len(wins) == 1 and len(losses) == 1, res
        champion = registry.describe(name)["aliases"]["champion"]
        assert champion == wins[0].version and wins[0].previous == before
        loser = b if champion == a else a
        msg = str(losses[0])
        assert f"version {champion} won" in msg and f"while promoting version {loser}" in msg
        info = registry.describe(name)
        gates = {x["version"]: registry.version_gate(x) for x in info["versions"]}
        assert gates[champion]["decision"] == "passed" and gates[loser]["decision"] == "conflict"
        last = [(e["action"], e["version"]) for e in info["events"][-2:]]
        assert sorted(last) == sorted([("promote", champion), ("conflict", loser)])


# --------------------------------------------------------------------------- CLI


def test_cli_register_promote_show_rollback(store, tmp_path):
    from step3vl.cli import app

    runner = CliRunner()
    conf = Path(__file__).resolve().parent / "conf" / "micro.yaml"
    metrics = tmp_path / "metrics.json"
    dm = tmp_path / "data_manifest.json"
    dm.write_text(json.dumps({"sets": {"eval": {"content_hash": "e1"}}}))
    uris = []
    for i, (tm, ocr) in enumerate([(0.4, 0.6), (0.5, 0.3), (0.5, 0.6)]):
        metrics.write_text(json.dumps(m(text_math=tm, ocr=ocr)))
        uris.append(ckpt(tmp_path, i))
        r = runner.invoke(app, ["register", "--model-uri", uris[-1], "--metrics", str(metrics), "--config", str(conf),
                                "--stage", "sft", "--data-manifest", str(dm), "--kfp-run-id", "kfp-1"])
        assert r.exit_code == 0, r.output
        assert f"version {i + 1}" in r.output and "candidate" in r.output
    r = runner.invoke(app, ["promote", "--model", "step3vl-micro", "--version", "1", "--config", str(conf)])
    assert r.exit_code == 0 and "promoted" in r.output, r.output
    r = runner.invoke(app, ["promote", "--model", "step3vl-micro", "--version", "2", "--config", str(conf)])
    assert r.exit_code == 1 and "refused" in r.output and "ocr" in r.output, r.output
    r = runner.invoke(app, ["promote", "--model", "step3vl-micro", "--version", "2", "--force"])
    assert isinstance(r.exception, RegistryError) and "needs --reason" in str(r.exception), r.output
    r = runner.invoke(app, ["promote", "--model", "step3vl-micro", "--version", "3", "--config", str(conf)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["registry", "rollback", "--model", "step3vl-micro", "--reason", "canary"])
    assert r.exit_code == 0 and "champion → version 1" in r.output, r.output
    r = runner.invoke(app, ["registry", "list"])
    assert r.exit_code == 0 and "step3vl-micro" in r.output and "step3vl-lock" not in r.output, r.output
    r = runner.invoke(app, ["registry", "show", "--model", "step3vl-micro", "--json"])
    info = json.loads(r.output)
    assert [e["action"] for e in info["events"]] == ["promote", "refuse", "promote", "rollback"]
    assert info["aliases"] == {"candidate": "3", "champion": "1"}
    r = runner.invoke(app, ["registry", "show", "--model", "step3vl-micro"], terminal_width=200)
    assert r.exit_code == 0 and "refused" in r.output and "passed, rolled back" in r.output, r.output
