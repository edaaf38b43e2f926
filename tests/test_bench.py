"""The benchmark harness without benchmarking: its statistics by hand, its registry, and that the
generated BENCHMARKS.md matches bench/results.json (`make bench` regenerates both)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import render, stats  # noqa: E402
from bench.registry import Result  # noqa: E402


def test_benchmarks_md_matches_results_json():
    proc = subprocess.run([sys.executable, "bench/render.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_render_check_fails_on_a_hand_edit(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    render.write(render.RESULTS, md)
    assert render.check(render.RESULTS, md) is None
    text = md.read_text(encoding="utf-8")
    assert text.splitlines()[0] == render.HEADER
    md.write_text(text.replace("step3vl benchmarks", "step3vl benchmarks (edited)"), encoding="utf-8")
    assert "does not match" in render.check(render.RESULTS, md)
    proc = subprocess.run([sys.executable, "bench/render.py", "--check", "--markdown", str(md)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 1


def test_results_cover_every_registered_entry_and_only_those():
    from bench import registry

    entries = registry.discover()
    results = json.loads(render.RESULTS.read_text())
    assert {n for n, e in entries.items() if not e.opt_in} <= set(results["entries"]) <= set(entries)
    assert {"train_vs_hf", "mfu", "data_prep", "rl", "pacore", "pipeline_overhead", "serving",
            "model_plan"} <= set(entries)
    assert not results["quick"], "bench/results.json must come from a full `make bench` run"
    for name, e in results["entries"].items():
        assert "error" not in e, name
        for f in e["figures"].values():
            assert f["median"] == pytest.approx(stats.summarize(f["samples"])["median"])


def test_quantile_and_summarize_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]
    # sorted 1 2 3 4: position q*(n-1) interpolated, as numpy's default
    assert stats.quantile(xs, 0.25) == pytest.approx(1.75)
    assert stats.quantile(xs, 0.5) == pytest.approx(2.5)
    assert stats.quantile(xs, 1.0) == 4.0
    assert stats.summarize(xs) == {"median": 2.5, "p25": 1.75, "p75": 3.25, "min": 1.0, "max": 4.0, "n": 4}
    assert stats.summarize([7.0])["p75"] == 7.0
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.quantile(xs, 1.5)


def test_paired_ratio_is_the_median_of_round_ratios():
    # round 2 ran under load that slowed both arms: its pair still says 2x
    num, den = [10.0, 4.0, 12.0], [5.0, 2.0, 4.0]
    r = stats.paired_ratio(num, den)
    assert r["pairs"] == [2.0, 2.0, 3.0]
    assert r["value"] == 2.0
    assert r["of_medians"] == pytest.approx(10.0 / 4.0)
    assert (r["min"], r["max"], r["n"]) == (2.0, 3.0, 3)
    with pytest.raises(ValueError):
        stats.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        stats.paired_ratio([1.0], [0.0])


def _counting_arms(calls):
    def arm(name):
        def f():
            calls.append(name)
            return len(calls)
        return f

    return {"a": arm("a"), "b": arm("b")}


def test_interleave_alternates_order_and_drops_warmup():
    calls: list[str] = []
    out = stats.interleave(_counting_arms(calls), rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert out.kept == out.all == out.used == {"a": [4, 5, 8], "b": [3, 6, 7]}  # call numbers, rounds 1-3
    assert out.clean and out.rejected == 0
    with pytest.raises(ValueError):
        stats.interleave(_counting_arms([]), rounds=0)


def test_interleave_reruns_rejected_rounds_within_the_allowance():
    calls: list[str] = []
    now = [0.0]

    def clock():
        now[0] += 1.0  # every look at the clock is one second later
        return now[0]

    # round 1 (calls 3, 4) is rejected: a replacement round runs, and the result is clean
    out = stats.interleave(_counting_arms(calls), rounds=2, warmup=1, accept=lambda r: r["a"] != 4,
                           extra_s=10, clock=clock)
    assert out.kept == {"a": [5, 8], "b": [6, 7]} and out.all == {"a": [4, 5, 8], "b": [3, 6, 7]}
    assert out.clean and out.rejected == 1 and out.used == out.kept

    # every round rejected: extra rounds stop once the allowance is spent, and all rounds are used
    calls.clear()
    out = stats.interleave(_counting_arms(calls), rounds=2, warmup=0, accept=lambda r: False, extra_s=3,
                           clock=clock)
    assert not out.clean and out.kept == {"a": [], "b": []}
    assert 2 < len(out.all["a"]) <= 5 and out.used == out.all and out.rejected == len(out.all["a"])


def test_result_ratio_records_target():
    r = Result()
    r.ratio("x", "x", [3.0, 1.0], [2.0, 2.0], target=1.0)
    assert r.ratios["x"]["value"] == pytest.approx(1.0) and r.ratios["x"]["met"] is True
    r.ratio("y", "y", [1.0], [2.0], target=0.6, percent=True, rejected=2, contended=True)
    assert r.ratios["y"]["met"] is False and r.ratios["y"]["contended"] and r.ratios["y"]["rejected"] == 2
    assert r.figure("f", "f", "s", [3, 1, 2])["median"] == 2.0


def test_drift_is_max_over_min():
    from bench.stats import drift

    assert drift([300.0, 330.0, 310.0]) == pytest.approx(0.10)
    assert drift([250.0]) == 0.0


def test_repeated_rounds_decide_a_target_only_when_they_agree():
    r = Result()
    r.ratio("agree", "a", [1.04, 1.08], [1.0, 1.0], target=1.1, ceiling=True, by_rounds=True)
    r.ratio("split", "s", [1.04, 1.16], [1.0, 1.0], target=1.1, ceiling=True, by_rounds=True)
    r.ratio("missed", "m", [1.2, 1.3], [1.0, 1.0], target=1.1, ceiling=True, by_rounds=True)
    assert r.ratios["agree"]["met"] is True and not r.ratios["agree"]["undecided"]
    assert r.ratios["split"]["met"] is None and r.ratios["split"]["undecided"]
    assert r.ratios["missed"]["met"] is False
    assert render._target(r.ratios["split"])[1] == "**not decided**: its rounds fall on both sides of the target " \
        "(1.04×, 1.16×)"
    # one round decides by its value alone
    r.ratio("single", "o", [1.05], [1.0], target=1.1, ceiling=True)
    assert r.ratios["single"]["met"] is True and render._target(r.ratios["single"])[1] == "met"
    with pytest.raises(ValueError, match="at least two rounds"):
        r.ratio("one", "o", [1.0], [1.0], target=1.1, ceiling=True, by_rounds=True)
