"""The pure parts of the benchmark entries: the 10B plan's arithmetic by hand, the naive PaCoRe
baseline's generate calls, cost-ratio targets and computed tables in the report."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from bench import render  # noqa: E402
from bench.entries import model_plan  # noqa: E402
from bench.entries.pacore import naive_pacore  # noqa: E402
from bench.machine import timed  # noqa: E402
from bench.registry import Result  # noqa: E402


def test_train_days_by_hand():
    # 1.2e12 tokens x 6e10 FLOPs = 7.2e22 FLOPs; 64 GPUs x 1e15 x 0.5 = 3.2e16 FLOP/s -> 2.25e6 s = 26.04 days
    assert model_plan.train_days(1.2e12, 6e10, 64, 1e15, 0.5) == pytest.approx(2.25e6 / 86_400)
    # H200 peak at 40% MFU on 8 GPUs: 8 x 989e12 x 0.4 = 3.1648e15 FLOP/s
    assert model_plan.train_days(2.26e11, 1e11, 8, 989e12, 0.4) == pytest.approx(2.26e22 / 3.1648e15 / 86_400)
    with pytest.raises(ValueError):
        model_plan.train_days(1.0, 1.0, 0, 1.0, 0.5)
    with pytest.raises(ValueError):
        model_plan.train_days(1.0, 1.0, 1, 1.0, 0.0)


def test_plan_rows_from_model_info_by_hand():
    calls = []

    def info(cfg, *, gpus, seq_len, micro_batch):
        calls.append((cfg, gpus, seq_len, micro_batch))
        p = 10e9
        states = 16 * p / gpus / 1024**3  # ZeRO-3: 16 bytes per parameter over the GPUs
        return SimpleNamespace(total_params=int(p), flops_per_token=6 * p + seq_len * 1e6,
                               memory={"model_states_gib_per_gpu": states, "activations_gib_per_gpu": 4.0,
                                       "gathered_params_gib_per_gpu": 0.5, "total_gib_per_gpu": states + 4.5})

    phases = [model_plan.Phase("pretrain", 1.2e12, 4096, 1), model_plan.Phase("sft", 2.26e11, 32768, 1)]
    rows = model_plan.plan("cfg", phases, gpus=(8, 64), peak_flops=1e15, mfu=0.5, info=info)
    assert calls == [("cfg", 8, 4096, 1), ("cfg", 64, 4096, 1), ("cfg", 8, 32768, 1), ("cfg", 64, 32768, 1)]
    assert [(r["phase"], r["gpus"]) for r in rows] == [("pretrain", 8), ("pretrain", 64), ("sft", 8), ("sft", 64)]
    # 16 x 10e9 / 8 = 2e10 bytes = 18.63 GiB; over 64 GPUs 2.33 GiB
    assert rows[0]["states_gib"] == pytest.approx(18.626, abs=1e-3)
    assert rows[1]["states_gib"] == pytest.approx(2.328, abs=1e-3)
    assert rows[0]["total_gib"] == pytest.approx(18.626 + 4.5, abs=1e-3)
    # pre-training on 64 GPUs: 1.2e12 x (6e10 + 4.096e9) / (64 x 1e15 x 0.5) / 86400 = 2.4036e6 s = 27.819 days
    assert rows[1]["flops_per_token"] == 6.4096e10
    assert rows[1]["days"] == pytest.approx(1.2e12 * 6.4096e10 / 3.2e16 / 86_400)
    assert rows[1]["days"] == pytest.approx(27.819, abs=1e-3)
    assert rows[0]["days"] == pytest.approx(8 * rows[1]["days"])  # days scale as 1/GPUs


def test_recipe_phases_sum_the_10b_budgets():
    from step3vl import config
    from step3vl.config import PipelineConfig

    cfg = config.load(PipelineConfig, ROOT / "conf" / "pipeline" / "step3vl-10b.yaml")
    pre, sft = model_plan.recipe_phases(cfg)
    assert (pre.name, pre.tokens, pre.seq_len) == ("pretrain", 1.2e12, 4096)
    assert (sft.name, sft.tokens, sft.seq_len) == ("sft", 2.26e11, 32768)


class FakeEngine:
    """Records every generate call; answers '<think>…</think>' + a per-call conclusion."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n=1, params=None):
        from step3vl.rl.rollout import Completion

        self.calls.append((list(prompts), n, params))
        k = len(self.calls)
        return [[Completion(f"<think>x</think>answer {k}.{j}", [1, 2], [0.0, 0.0], "stop", 3) for j in range(n)]
                for _ in prompts]


def test_naive_pacore_makes_one_call_per_sample_and_per_synthesis():
    from step3vl.rl.rollout import Prompt, SamplingParams

    prompts = [Prompt([{"role": "user", "content": f"problem {i}"}]) for i in range(3)]
    eng = FakeEngine()
    out = naive_pacore(eng, prompts, 4, SamplingParams(max_tokens=8, seed=5), seed=0)
    assert len(eng.calls) == 3 * (4 + 1)
    assert all(len(p) == 1 and n == 1 for p, n, _ in eng.calls)
    # per prompt: 4 samples of the prompt itself, then the synthesis over their conclusions
    for i in range(3):
        block = eng.calls[i * 5:(i + 1) * 5]
        assert all(p[0] is prompts[i] for p, _, _ in block[:4])
        synth = block[4][0][0].messages[-1]["content"]
        assert f"problem {i}" in synth
        assert all(f"answer {i * 5 + j + 1}.0" in synth for j in range(4))
    assert [c.text for c in out] == [f"<think>x</think>answer {i * 5 + 5}.0" for i in range(3)]
    assert len({p.seed for _, _, p in eng.calls}) == 15  # every call its own seed


def test_ceiling_targets_and_tables_render():
    r = Result()
    r.ratio("cost", "PaCoRe / single", [3.0, 5.0, 3.5], [1.0, 1.0, 1.0], target=4.0, ceiling=True)
    assert r.ratios["cost"]["value"] == 3.5 and r.ratios["cost"]["met"] is True
    r.ratio("over", "over budget", [50.0], [30.0], target=1.0, ceiling=True)
    assert r.ratios["over"]["met"] is False
    r.table("plan", ["stage", "days"], [["pretrain", 231.07], ["sft", 85.5]])
    res = {"generated_at": "t", "seconds": 1.0, "quiet_share": 0.1, "load_average_start": [1.0],
           "load_average_end": [1.0],
           "machine": {"cpu_model": "c", "cores_usable": 2, "cores_logical": 2, "torch_threads": 2, "python": "3",
                       "torch": "t", "transformers": "t", "accelerate": "a", "step3vl": "s", "platform": "p"},
           "entries": {"e": {"title": "E", "seconds": 1.0, **r.to_dict()}}}
    md = render.render(res)
    assert "| PaCoRe / single (`e`) | 3.50× | ≤ 4.00× | met |" in md
    assert "| over budget (`e`) | 1.67× | ≤ 1.00× | **missed** |" in md
    assert "**plan**\n\n| stage | days |\n|---|---|\n| pretrain | 231 |\n| sft | 85.5 |" in md


def test_timed_repeats_short_calls_until_min_s():
    calls = []
    t = timed(lambda: calls.append(1) or len(calls), min_s=0.05)
    assert t.calls == len(calls) >= 2 and t.value == len(calls)
    assert t.seconds * t.calls >= 0.05 and 0.0 <= t.others <= 1.0
    assert timed(lambda: 7).calls == 1


def test_update_replaces_only_the_remeasured_entries_and_says_so():
    from bench.run import _merged

    old = {"generated_at": "t0", "entries": {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 3}}}
    new = {"generated_at": "t1", "entries": {"c": {"v": 30}, "d": {"v": 4}}, "seconds": 9.0,
           "load_average_start": [5.0], "load_average_end": [6.0], "others_cpu_share": 0.5, "machine": {}}
    out = _merged(old, new, ["a", "b", "c", "d"])
    assert out["entries"] == {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 30}, "d": {"v": 4}}
    assert list(out["entries"]) == ["a", "b", "c", "d"] and out["generated_at"] == "t0"
    assert out["updates"][0]["entries"] == ["c", "d"] and out["updates"][0]["load_average_start"] == [5.0]


def test_cpu_of_a_finished_subprocess_counts_as_our_own():
    import subprocess

    from bench.machine import CpuSnapshot

    # the child spends 0.3 CPU-seconds whatever the machine's speed (a fixed loop took 0.09 s on a fast host)
    burn = "import time\nwhile time.process_time() < 0.3:\n    sum(i * i for i in range(10_000))"
    a = CpuSnapshot.take()
    subprocess.run([sys.executable, "-c", burn], check=True)
    b = CpuSnapshot.take()
    assert b.own - a.own >= 0.25  # the child's CPU seconds, reaped by subprocess.run (os.times ticks at 10 ms)


def test_direct_stages_follow_the_pipeline_and_reject_unknown_names(tmp_path):
    """The overhead benchmark's direct and cold arms run the DAG's nine stages, in its order; a stage the
    DAG gains without the benchmark learning it is a failure here, not a silently shorter direct arm."""
    from bench import direct_stages
    from step3vl.pipeline.dag import pipeline_module

    assert list(direct_stages.STAGES) == list(pipeline_module().STAGES)
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        direct_stages.run_stage("nope", None, tmp_path, {"data": str(tmp_path)})


def _fake_arms(monkeypatch, walls):
    """The overhead entry's arms replaced by instant fakes: each call takes the next wall time of its arm
    from ``walls``; returns the order in which the arms ran."""
    from bench.entries import pipeline_overhead as po
    from bench.machine import Timed

    order = []
    left = {k: list(v) for k, v in walls.items()}

    def stage_secs(arm):
        total = left[arm].pop(0)
        return {s: total / len(po.STAGES) for s in po.STAGES}

    def fake_run(work, run_name, config=po.CONFIG, *extra):
        arm = "pipeline_cold_tasks" if "--cold-tasks" in extra else ("cached" if run_name == "again" else "pipeline")
        order.append(arm)
        secs = stage_secs(arm)
        status = "cached" if arm == "cached" else "done"
        return {"stages": {s: {"status": status, "seconds": v} for s, v in secs.items()}, "_wall": sum(secs.values())}

    def fake_direct(cfg, work):
        order.append("direct")
        return stage_secs("direct")

    def fake_timed(fn, *, min_s=0.0):
        value = fn()
        return Timed(value["_wall"] if "_wall" in value else sum(value.values()), 0.0, value)

    monkeypatch.setattr(po, "direct", fake_direct)
    monkeypatch.setattr(po, "cold", lambda config, work: (order.append("cold"), stage_secs("cold"))[1])
    monkeypatch.setattr(po, "step3vl_run", fake_run)
    monkeypatch.setattr(po, "timed", fake_timed)
    monkeypatch.setattr(po, "speed_probe", lambda: 300.0)
    return order


@pytest.mark.parametrize(("pipe", "verdict"), [((104.0, 108.0), "met"), ((104.0, 116.0), "**not decided**"),
                                               ((112.0, 118.0), "**missed**")])
def test_tiny_overhead_runs_two_abba_rounds_and_decides_only_when_they_agree(monkeypatch, tmp_path, pipe, verdict):
    from bench.context import Context
    from bench.entries import pipeline_overhead as po

    order = _fake_arms(monkeypatch, {"direct": [100.0, 100.0], "pipeline": list(pipe), "cached": [5.0, 6.0]})
    r = po.pipeline_overhead_tiny(Context(tmp_path))
    assert order == ["direct", "pipeline", "cached", "pipeline", "cached", "direct"]  # ABBA
    ratio = r.ratios["pipeline_over_direct"]
    assert ratio["pairs"] == pytest.approx([p / 100.0 for p in pipe]) and ratio["by_rounds"]
    assert render._target(ratio)[1].startswith(verdict)
    assert r.figures["cached_s"]["samples"] == pytest.approx([5.0, 6.0]) and r.ratios["cached_over_budget"]["met"] is True
    whole = r.tables[0]["rows"][-1]
    assert whole == ["**whole run**", 100.0, round(sum(pipe) / 2, 1), round(sum(pipe) / 2 - 100.0, 1)]


def test_nano_overhead_runs_one_round_of_four_arms(monkeypatch, tmp_path):
    from bench.context import Context
    from bench.entries import pipeline_overhead as po

    order = _fake_arms(monkeypatch, {"direct": [20.0], "cold": [60.0], "pipeline": [50.0], "cached": [7.0],
                                     "pipeline_cold_tasks": [90.0]})
    r = po.pipeline_overhead(Context(tmp_path))
    assert order == ["direct", "cold", "pipeline", "cached", "pipeline_cold_tasks"]
    assert r.ratios["pipeline_over_direct"]["value"] == pytest.approx(2.5)
    # nano's stages last seconds: its overhead ratio is shown, the 10% target is tiny's
    assert r.ratios["pipeline_over_direct"]["target"] is None and not r.ratios["pipeline_over_direct"]["by_rounds"]
    assert r.ratios["warm_over_cold_tasks"]["value"] == pytest.approx(50 / 90)
    assert r.tables[0]["columns"][2] == "cold" and r.tables[0]["rows"][-1][1:4] == [20.0, 60.0, 50.0]
