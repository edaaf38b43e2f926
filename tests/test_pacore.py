"""PaCoRe inference (compaction, shuffling, controller template, rounds) and the PaCoRe training stage."""

from pathlib import Path

import pytest

from step3vl.pacore.inference import (
    PaCoReError,
    compact,
    controller_prompt,
    majority_vote,
    pacore_generate,
    render_controller,
    shuffled,
    validate_rounds,
)
from step3vl.rl.rollout import Completion, Prompt, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


def test_compaction_keeps_only_the_conclusion():
    assert compact("<think>12 + 30 = 42</think>42") == "42"
    assert compact("<think>a</think>x<think>b</think> 7 ") == "7"  # after the LAST </think>
    assert compact("plain answer") == "plain answer"
    assert compact("<think>cut off while reasoning") == ""  # no conclusion at all
    assert compact("<think>t</think>5<|im_end|>") == "5"


def test_shuffle_is_seeded_a_permutation_and_varies_with_prompt_and_round():
    xs = [str(i) for i in range(16)]
    a = shuffled(xs, seed=3, prompt_index=0, round_index=0)
    assert a == shuffled(xs, seed=3, prompt_index=0, round_index=0)
    assert sorted(a) == sorted(xs) and a != xs
    assert a != shuffled(xs, seed=3, prompt_index=1, round_index=0)
    assert a != shuffled(xs, seed=4, prompt_index=0, round_index=0)


def test_template_renders_the_problem_and_every_reference_in_order():
    text = render_controller("<image>\nWhat is 2 + 3?", ["5", "6", ""])
    assert text.endswith("<image>\nWhat is 2 + 3?")
    assert "5, 6, \n" in text  # every reference, in the order given (the empty one too)
    assert text.index("5") < text.index("6")


def test_controller_prompt_replaces_only_the_last_user_turn_and_keeps_images():
    img = object()
    p = Prompt([{"role": "system", "content": "sys"}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": "<image>\nsum?"}], [img])
    c = controller_prompt(p, ["3", "4"])
    assert [m["content"] for m in c.messages[:3]] == ["sys", "first", "ok"]
    assert c.messages[3]["content"].endswith("<image>\nsum?") and "3, 4" in c.messages[3]["content"]
    assert c.images == [img]
    assert p.messages[3]["content"] == "<image>\nsum?"  # the input prompt is not mutated


def test_rounds_are_validated_and_end_with_one():
    assert validate_rounds([16]) == [16, 1]
    assert validate_rounds([32, 4]) == [32, 4, 1]
    for bad in ([], [0], [2.5], [True], [10_000]):
        with pytest.raises(PaCoReError):
            validate_rounds(bad)


class FakeEngine:
    """Answers ``<think>…</think>{k}`` with k = call-local index; records every generate call."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, n=1, params=SamplingParams()):
        self.calls.append((list(prompts), n, params))
        out = []
        for pi, p in enumerate(prompts):
            group = []
            for j in range(n):
                text = f"<think>r{len(self.calls)}</think>{pi * 100 + j}"
                group.append(Completion(text, list(range(3 + j)), [0.0] * (3 + j), "stop", 10 + pi))
            out.append(group)
        return out


def test_rounds_run_as_one_batch_each_and_count_tokens_per_round():
    eng = FakeEngine()
    prompts = [Prompt([{"role": "user", "content": "q0"}]), Prompt([{"role": "user", "content": "q1"}])]
    res = pacore_generate(eng, prompts, [4, 2], SamplingParams(seed=5), seed=1)
    assert [n for _, n, _ in eng.calls] == [4, 2, 1]  # one batched call per round, final width 1
    assert all(len(ps) == 2 for ps, _, _ in eng.calls)
    # generated tokens per round for one prompt: sum over its width of (3 + j)
    assert res[0].round_tokens == [3 + 4 + 5 + 6, 3 + 4, 3]
    assert res[1].prompt_tokens == [11, 11, 11]
    # round 2's prompts carry round 1's conclusions (compacted, shuffled), not the traces
    r2 = eng.calls[1][0][1].messages[-1]["content"]
    assert r2.endswith("q1") and "<think>" not in r2
    assert sorted(res[1].conclusions[0]) == ["100", "101", "102", "103"]
    assert res[0].completion.text == "<think>r3</think>0"
    # seeds differ per round, deterministically
    seeds = [sp.seed for _, _, sp in eng.calls]
    assert len(set(seeds)) == 3 and seeds == [5 * 1009, 5 * 1009 + 1, 5 * 1009 + 2]


def test_round_seeds_stay_in_a_generators_range_for_the_largest_seed():
    eng = FakeEngine()
    pacore_generate(eng, [Prompt([{"role": "user", "content": "q"}])], [4, 2], SamplingParams(seed=2**63 - 1), seed=1)
    seeds = [sp.seed for _, _, sp in eng.calls]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)


def test_majority_vote_picks_the_most_common_conclusion_and_never_an_empty_one():
    assert majority_vote(["<think>a</think>3", "<think>b</think>4", "<think>c</think>4"]) == 1
    assert majority_vote(["<think>x", "<think>y", "<think>z</think>9"]) == 2
    assert majority_vote(["1", "2"]) == 0  # tie: the earliest


def test_pacore_generate_on_a_real_model_with_an_image(micro_cfg, micro_data):
    from PIL import Image

    from step3vl.model.loading import new_model
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.rl.rollout import TorchEngine

    tok = load_tokenizer(micro_data.tokenizer_dir)
    eng = TorchEngine(new_model(micro_cfg.model, tok, 0), tok, ImageProcessor(micro_cfg.model.vision))
    p = [Prompt([{"role": "user", "content": "<image>\nHow many?"}], [Image.new("RGB", (64, 64), (9, 99, 9))]),
         Prompt([{"role": "user", "content": "2 + 2 = ?"}])]
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=0)
    a = pacore_generate(eng, p, [3], sp, seed=0)
    b = pacore_generate(eng, p, [3], sp, seed=0)
    assert [x.completion.token_ids for x in a] == [x.completion.token_ids for x in b]
    assert all(len(x.round_tokens) == 2 and len(x.conclusions) == 1 and len(x.conclusions[0]) == 3 for x in a)
    assert a[0].prompt_tokens[1] > a[0].prompt_tokens[0]  # the controller prompt is longer than the problem


def test_scaling_curve_shapes_and_hand_checked_values(tmp_path):
    from step3vl.eval.scaling import plot_scaling, scaling_curve

    recs = [{"id": f"r{i}", "task": "text_math", "reward": "math_numeric", "answer": a,
             "messages": [{"role": "user", "content": f"q{i}"}]} for i, a in enumerate(["0", "101"])]
    curves = scaling_curve(FakeEngine(), recs, tmp_path, [1, 2, 4], SamplingParams(seed=0))
    c = curves["text_math"]
    assert c["k"] == [1.0, 2.0, 4.0]
    # the fake answers prompt i's sample j with i*100+j: record 0 (answer 0) is right at j=0, record 1
    # (answer 101) only at j=1, so pass@K and voting (ties go to the earliest sample) differ by K
    assert c["pass"] == [0.5, 1.0, 1.0]
    assert c["majority"] == [0.5, 0.5, 0.5]
    assert c["pacore"] == [0.5, 0.5, 0.5]  # the final round (width 1) answers i*100+0
    assert plot_scaling(curves, tmp_path / "s.png").stat().st_size > 1000


def test_warmup_solver_problems_come_from_the_configured_pool(micro_data):
    """``pacore.solver_data``: the warm-up's plain problems are a seeded draw from another set (every family),
    not only the PaCoRe set's own math problems; with no pool they are the step's problems."""
    from step3vl.eval.suite import load_records
    from step3vl.stages.pacore import _solver_records

    rl_dir = micro_data.out_dir / "raw" / "rl"
    pool = load_records(rl_dir)
    own = [r for r in pool if r["task"] == "text_math"][:4]
    drawn = _solver_records(own, rl_dir, 2.0, seed=0, step=1, pool=pool)
    assert len(drawn) == 8 and len({r["id"] for r in drawn}) == 8
    assert {r["id"].split("-", 3)[3] for r in drawn} <= {r["id"] for r in pool}
    assert len({r["task"] for r in drawn}) > 1, "the pool's other families were never drawn"
    assert drawn == _solver_records(own, rl_dir, 2.0, seed=0, step=1, pool=pool)  # seeded
    assert drawn != _solver_records(own, rl_dir, 2.0, seed=0, step=2, pool=pool)  # fresh per curriculum step
    for r, src in ((r, next(p for p in pool if p["id"] == r["id"].split("-", 3)[3])) for r in drawn):
        assert len(r["images"]) == len(src.get("images", []))  # images loaded for the warm-up dataset
        assert all(hasattr(im, "size") for im in r["images"])
    plain = _solver_records(own, rl_dir, 1.0, seed=0, step=1)
    assert {r["id"].split("-", 3)[3] for r in plain} == {r["id"] for r in own}


def test_synthesis_filter_keeps_solved_or_disagreeing_message_sets():
    """``pacore.synthesis_filter``: a set no reference solves teaches the synthesis to ignore its
    references ("solved" drops it); a unanimous one teaches only copying ("informative" drops it too)."""
    from step3vl.stages.pacore import _filtered

    recs = [{"id": str(k), "meta": {"references_correct": k, "width": 4}} for k in range(5)]
    assert [r["id"] for r in _filtered(recs, "all")] == ["0", "1", "2", "3", "4"]
    assert [r["id"] for r in _filtered(recs, "solved")] == ["1", "2", "3", "4"]
    assert [r["id"] for r in _filtered(recs, "informative")] == ["1", "2", "3"]


class _FixedEngine:
    """Every prompt's ``n`` responses: the given texts, in order (no model); a text without a final
    answer after ``</think>`` is reported as cut at the token limit."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def generate(self, prompts, n, params):  # type: ignore[no-untyped-def]
        out = []
        for _ in prompts:
            row = []
            for j in range(n):
                t = self.texts[j % len(self.texts)]
                row.append(Completion(text=t, token_ids=[1], logprobs=[0.0], prompt_tokens=1,
                                      finish_reason="stop" if t.partition("</think>")[2] else "length"))
            out.append(row)
        return out


def test_synthesis_records_count_references_cut_at_the_token_limit(tmp_path):
    """A reference cut at ``max_response_tokens`` shows no conclusion to the synthesis: the message
    set's statistics say how many were cut (what hid session 4's level-2 references)."""
    from step3vl.config import PaCoReConfig
    from step3vl.stages.pacore import synthesis_records

    rec = {"id": "p0", "task": "text_math", "split": "train", "reward": "math_numeric", "answer": "135",
           "messages": [{"role": "user", "content": "What is 85 + 46 + 4?"},
                        {"role": "assistant", "content": "<think>85 + 46 = 131, 131 + 4 = 135</think>135"}]}
    eng = _FixedEngine(["<think>85 + 46 = 131, 131 + 4 = 135</think>135", "<think>85 + 46 = 131, 131 +"])
    _, stats = synthesis_records(eng, [rec, rec], tmp_path, 4, PaCoReConfig(), seed=0, step=1)
    assert stats["references_clip_ratio"] == 0.5 and stats["references_accuracy"] == 0.5


@pytest.mark.parametrize("target", ["trace", "answer"])
def test_synthesis_records_target_and_reference_statistics(tmp_path, target):
    """The controller prompt carries the references' conclusions; the assistant turn is the reference
    trace ("trace") or only its answer after an empty think ("answer"); the statistics count right ones."""
    from step3vl.config import PaCoReConfig
    from step3vl.stages.pacore import synthesis_records

    rec = {"id": "p0", "task": "text_math", "split": "train", "reward": "math_numeric", "answer": "7",
           "messages": [{"role": "user", "content": "What is 3 + 4?"},
                        {"role": "assistant", "content": "<think>3 + 4 = 7</think>7"}]}
    eng = _FixedEngine(["<think>x</think>7", "<think>y</think>8", "<think>z</think>8", "<think>w</think>9"])
    out, stats = synthesis_records(eng, [rec], tmp_path, 4, PaCoReConfig(synthesis_target=target), seed=0, step=1)
    (r,) = out
    assert r["meta"]["references_correct"] == 1 and r["meta"]["width"] == 4
    assert stats["references_accuracy"] == 0.25 and stats["references_pass"] == 1.0
    assert stats["references_majority"] == 0.0  # "8" wins the vote
    assert stats["references_clip_ratio"] == 0.0
    prompt = r["messages"][-2]["content"]
    assert "What is 3 + 4?" in prompt and all(a in prompt for a in ("7", "8", "9")) and "<think>" not in prompt
    want = "<think>3 + 4 = 7</think>7" if target == "trace" else "<think></think>7"
    assert r["messages"][-1] == {"role": "assistant", "content": want}


def test_subset_share_shows_a_seeded_smaller_subset_of_the_references(tmp_path):
    """``pacore.subset_share``: that share of the message sets shows 1 .. width-1 of its references (a
    seeded draw), so the synthesis learns to read any PaCoRe width; the set's ``width`` and
    ``references_correct`` describe what it shows, the statistics every generated reference."""
    from step3vl.config import ConfigError, PaCoReConfig, PipelineConfig, from_dict
    from step3vl.stages.pacore import _shown, synthesis_records

    assert _shown(8, 0.0, 0, 1, 3) == list(range(8)) and _shown(1, 1.0, 0, 1, 3) == [0]
    draws = [_shown(8, 0.5, 0, 1, i) for i in range(400)]
    assert draws == [_shown(8, 0.5, 0, 1, i) for i in range(400)]  # seeded
    partial = [d for d in draws if len(d) < 8]
    assert 160 <= len(partial) <= 240  # about half of the sets
    assert {len(d) for d in partial} == set(range(1, 8))
    assert all(d == sorted(set(d)) and set(d) <= set(range(8)) for d in draws)
    assert all(len(_shown(8, 1.0, 0, 1, i)) < 8 for i in range(50))

    rec = {"id": "p0", "task": "text_math", "split": "train", "reward": "math_numeric", "answer": "7",
           "messages": [{"role": "user", "content": "What is 3 + 4?"},
                        {"role": "assistant", "content": "<think>3 + 4 = 7</think>7"}]}
    texts = [f"<think>t</think>{a}" for a in (7, 8, 9, 10, 11, 12, 13, 14)]
    out, stats = synthesis_records(_FixedEngine(texts), [rec] * 40, tmp_path, 8, PaCoReConfig(subset_share=1.0),
                                   seed=0, step=1)
    assert stats["references_accuracy"] == 0.125 and stats["references_pass"] == 1.0  # all 8 generated
    for r in out:
        shown = r["messages"][-2]["content"].splitlines()[0].removeprefix("Answers: ").split(", ")
        assert 1 <= r["meta"]["width"] == len(shown) < 8
        assert r["meta"]["references_correct"] == shown.count("7")
    assert any(r["meta"]["references_correct"] == 0 for r in out)
    with pytest.raises(ConfigError, match="'pacore.subset_share' must be a share in"):
        from_dict(PipelineConfig, {"pacore": {"subset_share": 1.5}})


def test_message_sets_are_reused_across_runs_that_change_only_their_training(micro_cfg, micro_data, init_model,
                                                                            tmp_path):
    """With a message cache, a run that changed only training settings copies step 1's message sets (and warm-up
    set) from an earlier run instead of generating them; a generation setting, another policy, a tampered cache
    entry or no cache at all means generating."""
    import time
    from dataclasses import replace

    from step3vl.checkpoint import save_checkpoint
    from step3vl.model.loading import checkpoint_config, new_model
    from step3vl.model.tokenizer import load_tokenizer
    from step3vl.stages import pacore
    from step3vl.storage import read_manifest

    cache = tmp_path / "cache"
    sets = pacore._set_hashes(micro_data.out_dir)

    def run(name: str, cfg=micro_cfg, message_cache=str(cache), init=init_model):
        out = tmp_path / name
        res = pacore.run(cfg, micro_data.out_dir, str(init), str(out), message_cache=message_cache, progress=False,
                         stop_after=(1, "messages"))
        files = read_manifest(out / "step-1" / "messages")["files"]
        return res.metrics, files, read_manifest(out / "step-1" / "warmup")["files"]

    first, msgs, warm = run("first")
    assert first["step1/messages_reused"] == 0.0
    (key,) = [p.name for p in cache.iterdir()]
    assert key == pacore.messages_key(micro_cfg, 1, str(init_model), sets)[:32]
    assert read_manifest(cache / key / "messages")["files"] == msgs

    assert not (cache / key / pacore.USED_MARKER).exists()  # stored just now: its files say when
    _date_back(cache / key, 40)  # stored 40 days ago, then reused below: prune then ages it from the reuse
    assert [e.key for e in pacore.prune_cache(str(cache), 30 * 86400, dry_run=True)] == [key]

    trained_otherwise = replace(micro_cfg, pacore=replace(micro_cfg.pacore, lr_start=1e-2, seq_len=192,
                                                          rl=replace(micro_cfg.pacore.rl, kl_coef=0.5)))
    again, msgs2, warm2 = run("again", trained_otherwise)
    assert again["step1/messages_reused"] == 1.0 and (msgs2, warm2) == (msgs, warm)
    assert (cache / key / pacore.USED_MARKER).is_file()
    (entry,) = pacore.cache_entries(str(cache))
    assert time.time() - entry.used < 600 and entry.whole
    assert pacore.prune_cache(str(cache), 30 * 86400) == []  # used today: kept
    assert again["step1/references_accuracy"] == first["step1/references_accuracy"]  # its statistics came along

    hotter = replace(micro_cfg, pacore=replace(micro_cfg.pacore, temperature=0.5))
    assert run("hotter", hotter)[0]["step1/messages_reused"] == 0.0
    assert len(list(cache.iterdir())) == 2

    tok = load_tokenizer(micro_data.tokenizer_dir)
    other = tmp_path / "other-policy"
    save_checkpoint(str(other), model_state=new_model(micro_cfg.model, tok, 1).state_dict(),
                    config=checkpoint_config(micro_cfg.model, tok, stage="sft"), tokenizer_dir=micro_data.tokenizer_dir)
    assert pacore.messages_key(micro_cfg, 1, str(other), sets) != pacore.messages_key(micro_cfg, 1, str(init_model),
                                                                                      sets)
    assert pacore.messages_key(micro_cfg, 2, str(init_model), sets) != pacore.messages_key(micro_cfg, 1,
                                                                                           str(init_model), sets)

    assert run("uncached", message_cache=None)[0]["step1/messages_reused"] == 0.0
    assert len(list(cache.iterdir())) == 2

    shard = next((cache / key / "messages").glob("*.jsonl"))
    shard.write_text(shard.read_text().replace("pacore-s1", "pacore-sX", 1))  # tampered: not reused, and replaced
    tampered, msgs3, _ = run("tampered")
    assert tampered["step1/messages_reused"] == 0.0 and msgs3 == msgs
    assert read_manifest(cache / key / "messages")["files"] == msgs
    assert run("after", trained_otherwise)[0]["step1/messages_reused"] == 1.0


def _cache_entry(cache, key: str, *, whole: bool = True, age_days: float = 0.0) -> None:
    """A message-cache entry as pacore stores it (warm-up set, then the message sets), last used ``age_days``
    ago."""
    from step3vl.storage import publish_dir

    parts = ("warmup", "messages") if whole else ("warmup",)
    for name in parts:
        src = Path(cache).parent / f"src-{key}-{name}"
        src.mkdir(parents=True)
        (src / "part-0000.jsonl").write_text('{"id": "a"}\n' * 10)
        publish_dir(src, f"{cache}/{key}/{name}")
    _date_back(Path(cache, key), age_days)


def _date_back(entry: Path, days: float) -> None:
    """Date every file of a cache entry ``days`` back, as if last written then."""
    import os
    import time

    stamp = time.time() - days * 86400
    for f in entry.rglob("*"):
        os.utime(f, (stamp, stamp))


def test_message_cache_prune_removes_entries_older_than_asked(tmp_path):
    """``step3vl cache prune`` lists the cache's entries and removes those last used before --older-than days,
    a half-stored one included; --dry-run removes nothing; an entry written since stays."""
    import subprocess
    import sys

    from step3vl.errors import Step3VLError
    from step3vl.stages import pacore

    cache = tmp_path / "root" / pacore.MESSAGE_CACHE
    _cache_entry(cache, "a" * 32, age_days=40)
    _cache_entry(cache, "b" * 32, whole=False, age_days=10)  # its message sets never stored (the writer died)
    _cache_entry(cache, "c" * 32, age_days=1)
    entries = pacore.cache_entries(str(cache))
    assert [(e.key[0], e.whole, e.files) for e in entries] == [("a", True, 4), ("b", False, 2), ("c", True, 4)]
    assert entries[0].size == entries[2].size == 2 * entries[1].size > 0

    assert [e.key[0] for e in pacore.prune_cache(str(cache), 5 * 86400, dry_run=True)] == ["a", "b"]
    assert len(pacore.cache_entries(str(cache))) == 3  # a dry run removes nothing

    cmd = [sys.executable, "-m", "step3vl.cli", "cache", "prune", "--older-than", "5"]
    p = subprocess.run([*cmd, "--config", str(ROOT / "tests" / "conf" / "micro.yaml"), "--set",
                        f"storage.root={tmp_path / 'root'}", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "would remove 2 of 3 entries" in p.stdout and p.stdout.count("would remove") == 3
    p = subprocess.run([*cmd, "--cache", str(cache)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "removed 2 of 3 entries" in p.stdout
    assert [e.key[0] for e in pacore.cache_entries(str(cache))] == ["c"]
    assert sorted(p.name for p in cache.iterdir()) == ["c" * 32]  # no empty folders left behind

    p = subprocess.run([*cmd], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "--config" in p.stderr + p.stdout and "Traceback" not in p.stderr
    assert pacore.prune_cache(str(tmp_path / "none"), 0) == []  # no cache yet: nothing to remove
    with pytest.raises(Step3VLError, match="older_than_s must be >= 0"):
        pacore.prune_cache(str(cache), -1)
