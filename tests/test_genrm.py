"""GenRM and RLHF: judge records (both orders, labels, length), the reward's terms, the stage end to end."""

from pathlib import Path

import pytest

from step3vl.rl.genrm import (
    GenRM,
    GenRMSettings,
    RLHFReward,
    Verdict,
    abstention,
    clean_response,
    genrm_records,
    is_unanswerable,
    length_discipline,
    pairwise_accuracy,
)
from step3vl.rl.rollout import Completion, Prompt


def pref(kind: str, chosen: str = "<think>40 + 16 = 56</think>56", rejected: str = "56 56 56 56", **meta):
    return {"id": f"p-{kind}", "task": "preference", "split": "train", "images": [],
            "messages": [{"role": "user", "content": "What is 40 plus 16?"}], "answer": "56",
            "chosen": chosen, "rejected": rejected, "meta": {"rejected_kind": kind, **meta}}


def test_records_come_in_both_orders_with_the_right_letter_and_labels():
    recs = list(genrm_records([pref("repetitive")], None))
    assert [r["answer"] for r in recs] == ["A", "B"]
    a_first, b_first = (r["messages"] for r in recs)
    assert "Response A: <think>40 + 16 = 56</think>56\nResponse B: 56 56 56 56" in a_first[0]["content"]
    assert "Response A: 56 56 56 56\nResponse B: <think>40 + 16 = 56</think>56" in b_first[0]["content"]
    assert a_first[0]["content"].startswith("What is 40 plus 16?\n")
    assert a_first[0]["content"].endswith("Which response is better? Answer A or B.")
    assert a_first[1] == {"role": "assistant", "content": "<think>A good, B repeats</think>A"}
    assert b_first[1] == {"role": "assistant", "content": "<think>A repeats, B good</think>B"}
    labels = {k: next(genrm_records([pref(k, **m)], None))["messages"][1]["content"]
              for k, m in [("wrong", {}), ("format", {}), ("unanswerable", {"detail": "text_unanswerable"})]}
    assert labels == {"wrong": "<think>A good, B wrong</think>A", "format": "<think>A good, B unclear</think>A",
                      "unanswerable": "<think>A good, B guesses</think>A"}
    absent = next(genrm_records([pref("unanswerable", detail="absent_count")], None))
    assert absent["messages"][1]["content"] == "<think>A good, B wrong</think>A"


def test_records_keep_images_and_markers(micro_data):
    from step3vl.data.io import iter_records

    pairs = [r.record for r in iter_records(micro_data.raw("preference"))]
    with_image = next(p for p in pairs if p["images"])
    recs = list(genrm_records([with_image], micro_data.raw("preference")))
    assert all(len(r["images"]) == 1 and r["messages"][0]["content"].count("<image>") == 1 for r in recs)


def test_judge_prompts_fit_twice_the_micro_sft_context(micro_cfg, micro_data, tmp_path):
    from step3vl.data.io import iter_records, write_dataset
    from step3vl.data.pack import tokenize_record
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import load_tokenizer

    tok, proc = load_tokenizer(micro_data.tokenizer_dir), ImageProcessor(micro_cfg.model.vision)
    s = GenRMSettings()
    pairs = [r.record for r in iter_records(micro_data.raw("preference"))]
    # the worst case: the longest prompt with both responses at the cut-off length
    longest = max(pairs, key=lambda p: len(p["messages"][0]["content"]))
    long_text = " ".join(["repeat"] * 4 * s.max_response_tokens)
    worst = {**longest, "chosen": long_text, "rejected": long_text}
    budget = 2 * micro_cfg.sft.seq_len
    ds = tmp_path / "genrm"
    written = write_dataset(ds, genrm_records([*pairs, worst], micro_data.raw("preference"), tok,
                                              s.max_response_tokens))
    assert written["n_records"] == 2 * (len(pairs) + 1)
    for raw in iter_records(ds):
        rec = raw.record
        sample = tokenize_record(rec, ds, tok, proc, "assistant")
        assert len(sample.input_ids) <= budget, rec["id"]
        # only the judgment (and its end token) is learned, and it fits the judge's generation budget
        assert 0 < sum(sample.loss_mask) <= s.max_judgment_tokens


def test_clean_response_drops_markup_and_cuts(micro_data):
    from step3vl.model.tokenizer import load_tokenizer

    assert clean_response("<image>x<|im_end|> <think>a</think>b<|endoftext|>") == "x <think>a</think>b"
    tok = load_tokenizer(micro_data.tokenizer_dir)
    cut = clean_response("one two three four five six seven eight nine ten " * 5, tok, 5)
    assert len(tok.encode(cut, add_special_tokens=False)) <= 5


class StubJudge:
    """compare() returns a fixed P(A better) and records what it was asked."""

    def __init__(self, p: float) -> None:
        self.p, self.calls = p, []

    def compare(self, prompts, a, b):
        self.calls.append((list(a), list(b)))
        return [self.p] * len(a)


def comp(text: str, n_tokens: int | None = None, finish: str = "stop") -> Completion:
    n = len(text.split()) if n_tokens is None else n_tokens
    return Completion(text, list(range(n)), [0.0] * n, finish, 5)


MATH = {"id": "m", "task": "text_math", "messages": [{"role": "user", "content": "What is 40 plus 16?"}],
        "answer": "56", "reward": "math_numeric"}
UNANSWERABLE = {"id": "u", "task": "preference", "messages": [{"role": "user", "content": "How old is my aunt?"}],
                "answer": "I cannot tell.", "meta": {"rejected_kind": "unanswerable", "detail": "text_unanswerable"}}


def test_reward_terms_on_hand_made_completions():
    judge = StubJudge(0.8)
    ref = {"m": comp("<think>40 + 16 = 56</think>56", 2), "u": comp("Max.", 2)}
    fn = RLHFReward(judge, lambda recs: [ref[r["id"]] for r in recs], lambda r: Prompt(r["messages"]),
                    genrm_weight=1.0, verifier_weight=0.5, language_weight=0.1, repetition_weight=0.2,
                    length_weight=0.1, abstention_weight=0.5, length_factor=2.0)
    recs = [MATH, MATH, MATH, MATH, UNANSWERABLE, UNANSWERABLE, MATH]
    comps = [
        comp("<think>40 + 16 = 56</think>56", 2),  # identical to the reference: a tie, judge not asked
        comp("56 56 56 56", 4),  # repetition 1 - 1/2; 4 tokens = 2 x reference: no length penalty
        comp("答案是56", 3),  # no Latin letters for a Latin prompt: language 0
        comp("57 and more and more and more", 24, "length"),  # hit max tokens; 3 distinct of 5 3-grams
        comp("I cannot tell.", 3),  # abstains where it should
        comp("Max.", 2),  # answers confidently where it cannot know (= the reference: a tie)
        comp("I cannot tell.", 3),  # abstains on an answerable prompt
    ]
    rewards, terms = fn(recs, comps)
    assert terms["pref"] == [0.5, 0.8, 0.8, 0.8, 0.8, 0.5, 0.8]
    assert sum(len(a) for a, _ in judge.calls) == 5 and fn.judge_calls == 5
    assert terms["verifier"] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert terms["repetition"] == [0.0, 0.5, 0.0, pytest.approx(1 - 3 / 5), 0.0, 0.0, 0.0]
    assert terms["language"] == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert terms["length"] == [0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]
    assert terms["abstention"] == [0.0, 0.0, 0.0, 0.0, 1.0, -1.0, -1.0]
    expected = [p + 0.5 * v + 0.1 * lang - 0.2 * rep + 0.1 * ln + 0.5 * ab for p, v, lang, rep, ln, ab in
                zip(*(terms[k] for k in ("pref", "verifier", "language", "repetition", "length", "abstention")))]
    assert rewards == pytest.approx(expected)
    assert rewards[0] == pytest.approx(0.5 + 0.5 + 0.1)
    assert rewards[1] == pytest.approx(0.8 + 0.1 - 0.1)


def test_length_discipline_and_abstention_by_hand():
    assert length_discipline(4, "stop", 2, 2.0) == 0.0
    assert length_discipline(6, "stop", 2, 2.0) == pytest.approx(-0.5)  # 2 over an allowance of 4
    assert length_discipline(100, "stop", 2, 2.0) == -1.0
    assert length_discipline(3, "length", 2, 2.0) == -1.0
    assert length_discipline(2, "stop", 0, 2.0) == 0.0  # an empty reference still allows 2 tokens
    assert is_unanswerable(UNANSWERABLE) and not is_unanswerable(MATH)
    assert is_unanswerable({"answer": "0", "meta": {"unanswerable": True}})
    # the preference family's absent-colour count is answerable: 0
    assert not is_unanswerable({"answer": "0", "meta": {"rejected_kind": "unanswerable", "detail": "absent_count"}})
    assert abstention(UNANSWERABLE, "<think>no way to know</think>I can't tell.") == 1.0
    assert abstention(UNANSWERABLE, "<think>I cannot tell</think>42") == -1.0  # only the final answer counts
    assert abstention(MATH, "56") == 0.0


class ScriptedGenRM(GenRM):
    """A GenRM whose judge() returns scripted P(A) per (a, b) pair: no model."""

    def __init__(self, script):
        self.script = script

    def judge(self, prompts, a, b):
        return [Verdict(self.script(x, y), "", True) for x, y in zip(a, b)]


def test_compare_averages_both_orders_so_position_bias_cancels():
    always_a = ScriptedGenRM(lambda a, b: 0.9)
    assert always_a.compare([Prompt([])] * 2, ["x", "y"], ["y", "x"]) == pytest.approx([0.5, 0.5])
    knows = ScriptedGenRM(lambda a, b: 0.7 if a == "good" else 0.2)
    assert knows.compare([Prompt([])], ["good"], ["bad"]) == pytest.approx([0.5 * (0.7 + 0.8)])


def test_pairwise_accuracy_needs_both_orders():
    pairs = [{**pref("wrong"), "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(4)]
    judge = ScriptedGenRM(lambda a, b: 0.9 if a.startswith("good") else 0.2)
    assert pairwise_accuracy(judge, pairs)["accuracy"] == 1.0
    biased = ScriptedGenRM(lambda a, b: 0.9)  # always picks the first response
    m = pairwise_accuracy(biased, pairs)
    assert m["accuracy"] == 0.0 and m["order_consistency"] == 0.0 and m["picks_first"] == 1.0
    assert m["soft_accuracy"] == 0.0  # the order-averaged P is exactly 0.5: not better


def test_letter_probabilities_of_a_real_model(micro_cfg, micro_data):
    from step3vl.model.loading import new_model
    from step3vl.model.processor import ImageProcessor
    from step3vl.model.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_data.tokenizer_dir)
    g = GenRM(new_model(micro_cfg.model, tok, 0).eval(), tok, ImageProcessor(micro_cfg.model.vision),
              max_judgment_tokens=4)
    prompts = [Prompt([{"role": "user", "content": "What is 2 plus 2?"}])] * 2
    v = g.judge(prompts, ["4", "5"], ["5", "4"])
    comps = [Completion("", [g.think_end, 5], [0.0, 0.0], "stop", 0), Completion("", [5], [0.0], "stop", 0)]
    forced = g._letter_probs(g.prompts(prompts, ["4", "5"], ["5", "4"]), comps)
    assert forced[0].valid and 0.0 < forced[0].p_a < 1.0
    assert forced[1] == Verdict(0.5, "", False)  # no </think>: no verdict, and it says so
    assert all(0.0 <= x.p_a <= 1.0 for x in v)


def test_heldout_pairs_never_share_a_prompt_with_training(micro_cfg, micro_data):
    from step3vl.data.gate import content_hash, dataset_hashes
    from step3vl.stages.rlhf import heldout_pairs

    held = heldout_pairs(micro_cfg, micro_data.out_dir, 12)
    assert len(held) == 12 and {r["split"] for r in held} == {"eval"}
    assert not {content_hash(r) for r in held} & dataset_hashes(micro_data.raw("preference"))


@pytest.mark.slow
def test_rlhf_stage_end_to_end_and_resume(micro_cfg, micro_data, init_model, tmp_path):
    from step3vl.stages import rlhf

    init = str(init_model)
    s = GenRMSettings(steps=3, batch_size=4, warmup_steps=1, heldout_pairs=6, winrate_per_family=2)
    out = rlhf.run(micro_cfg, micro_data.out_dir, init, str(tmp_path / "rlhf"), progress=False, settings=s)
    m = out.metrics
    assert m["genrm_steps"] == 3 and m["genrm_records"] == 2 * 60 and m["genrm_dropped_too_long"] == 0
    assert m["rl/iterations"] == micro_cfg.rlhf.iterations
    for k in ("genrm_accuracy", "genrm_order_consistency", "win_rate", "win_rate_greedy", "accuracy_before",
              "accuracy_after"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["n"] == 2 * 4  # two prompts of each of the four eval families
    assert (tmp_path / "rlhf/genrm/model/MANIFEST.json").exists() and (tmp_path / "rlhf/model/MANIFEST.json").exists()
    hist = out.rl.result.history
    assert {"pref_mean", "verifier_mean", "language_mean", "repetition_mean", "length_mean",
            "abstention_mean"} <= set(hist[0])
    # a rerun finds the judge and the policy done: nothing is trained again
    again = rlhf.run(micro_cfg, micro_data.out_dir, init, str(tmp_path / "rlhf"), progress=False, settings=s)
    assert again.rl.result.resumed_from == micro_cfg.rlhf.iterations
    assert again.metrics["genrm_accuracy"] == m["genrm_accuracy"]
    assert Path(again.genrm_uri).name == "model"
