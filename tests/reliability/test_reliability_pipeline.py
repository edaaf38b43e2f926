"""Two whole pipeline runs at once on one MLflow store and one artifact store, with secrets planted in
their environment: neither clobbers the other, and no secret appears in anything they leave behind.

The micro pipeline is cut further (tiny sets, 1-2 steps per stage) so that two runs on 2 cores stay
a few minutes; both use the same config, the case where they share cache keys and checkpoint locations.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from shrink import SHRINK

ROOT = Path(__file__).resolve().parents[2]
MICRO = ROOT / "tests" / "conf" / "micro.yaml"


def _planted() -> dict[str, str]:
    tag = secrets.token_hex(8).upper()
    return {"AWS_ACCESS_KEY_ID": f"AKIAPLANTED{tag}", "AWS_SECRET_ACCESS_KEY": f"planted-secret-{tag}-xyz",
            "AWS_SESSION_TOKEN": f"planted-session-{tag}", "MLFLOW_TRACKING_PASSWORD": f"planted-pw-{tag}",
            # not STEP3VL_API_KEY: it switches auth on in the deploy stage's `step3vl serve`, whose own test
            # request does not send it (deploy_serving then fails with 401)
            "MLFLOW_TRACKING_TOKEN": f"planted-token-{tag}"}


def _scan(root: Path, needles: dict[str, bytes]) -> list[str]:
    hits = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            hits += [f"{var} in {path.relative_to(root)}" for var, needle in needles.items() if needle in data]
    return hits


@pytest.mark.slow
def test_concurrent_runs_and_planted_secrets(tmp_path, reliability):
    import mlflow

    from step3vl.pipeline.local import load_outputs
    from step3vl.storage import verify_dir

    planted = _planted()
    env = {**os.environ, **planted, "STEP3VL_HOME": str(tmp_path / ".step3vl"), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [a for s in SHRINK for a in ("--set", s)]

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "step3vl.cli", "run", "--config", str(MICRO), "--run-name", name,
                               "--json", *sets], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip("ab", pool.map(run, ["run-a", "run-b"])))
    wall = time.perf_counter() - t0
    res = {name: json.loads(p.stdout) for name, p in procs.items()}
    # The registry's promotion lock decides a race for the champion alias: the loser's register stage fails
    # with PromotionConflict (told to re-gate against the winner) rather than overwrite the alias.
    losers = []
    for name, p in procs.items():
        log = Path(res[name]["log_path"])
        text = log.read_text() if log.is_file() else ""
        if p.returncode != 0:
            st = {s: v["status"] for s, v in res[name]["stages"].items()}
            assert st["register"] == "failed" and "PromotionConflict" in text, \
                f"run {name}: {p.stderr[-1500:]}\n{text[-6000:]}"
            assert all(v in ("done", "cached") for s, v in st.items() if s not in ("register", "deploy_serving"))
            losers.append(name)
    assert len(losers) < 2, "both runs failed"

    # 1. no clobbering: each parent run keeps its own record, every output it names verifies
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.step3vl' / 'mlflow.db'}")
    try:
        assert res["a"]["mlflow_run_id"] != res["b"]["mlflow_run_id"]
        for r in res.values():
            assert load_outputs(r["mlflow_run_id"]) == r
            for stage, st in r["stages"].items():
                model = st["outputs"].get("model")
                if model:
                    verify_dir(Path(model["uri"], model["metadata"].get("checkpoint", "model")))
        client = mlflow.MlflowClient()
        versions = client.search_model_versions("name = 'step3vl-micro'")
        parents = {v.tags.get("step3vl.mlflow_parent_run_id") for v in versions}
        # a run whose register task started after the other's finished is a KFP cache hit: it reuses that
        # version (the stages that train hold a lock per checkpoint root, so the second run trails the first)
        registering = {r["mlflow_run_id"] for r in res.values() if r["stages"]["register"]["status"] == "done"}
        assert parents == registering and len(versions) == len(registering) >= 1, \
            (f"one version per registering run, each with its lineage: {parents} vs {registering}",
             {n: {s: v["status"] for s, v in r["stages"].items()} for n, r in res.items()})
        cached = [n for n, r in res.items() if r["stages"]["register"]["status"] == "cached"]
        for v in versions:
            verify_dir(v.source)
        aliases = dict(client.get_registered_model("step3vl-micro").aliases)
        assert aliases and set(map(str, aliases.values())) <= {str(v.version) for v in versions}, aliases
    finally:
        mlflow.set_tracking_uri(None)
    statuses = {n: sorted({s["status"] for s in r["stages"].values()}) for n, r in res.items()}
    race = (f"run {losers[0]}'s register stage lost the champion race and failed loudly (PromotionConflict, "
            "alias untouched)" if losers else "both runs succeeded")
    if cached:
        race += (f"; run {cached[0]} waited on the other's checkpoint-root locks, resumed from its checkpoints and "
                 "took its later stages from the cache")
    reliability.record("concurrent-pipelines", outcome=f"{race} after {wall:.0f} s (stage statuses {statuses}); each "
                       f"parent run's pipeline_outputs.json intact; every model output verifies; {len(versions)} "
                       f"registered version(s), one per registering run with its own lineage; aliases {aliases}",
                       data_lost="none", seconds=round(wall))

    # 2. no secret anywhere: MLflow store (params, tags, metrics), artifacts, KFP outputs and logs, stdout/stderr
    needles = {k: v.encode() for k, v in planted.items()}
    hits = _scan(tmp_path, needles)
    for name, p in procs.items():
        hits += [f"{var} in run {name}'s {what}" for var, v in planted.items()
                 for what, text in (("stdout", p.stdout), ("stderr", p.stderr)) if v in text]
    assert not hits, hits
    scanned = sum(len(files) for _d, _s, files in os.walk(tmp_path))
    reliability.record("secrets", outcome=f"{len(planted)} planted values found in none of {scanned} files (MLflow "
                       "SQLite store, artifacts, KFP outputs and task logs, checkpoints) nor in stdout/stderr",
                       data_lost="n/a")
