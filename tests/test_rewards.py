"""The verifiable rewards: hand-computed scores, adversarial completions, and the registry contract.

Every verifier meets the same nine adversarial completions (``ADVERSARIAL_CASES``) with the exact
reward each must give; a test checks no verifier skips one.
"""

from __future__ import annotations

import math
import random
import time

import pytest

from step3vl.errors import Step3VLError
from step3vl.rl import rewards
from step3vl.rl.rewards import (
    MAX_EDIT_LEN,
    REWARDS,
    UnknownRewardError,
    edit_distance,
    extract_final,
    get_reward,
    language_consistency,
    register_reward,
    repetition_penalty,
    score,
)

OPTIONS = {"meta": {"options": {"A": "red", "B": "blue", "C": "green"}}}
ALL_NUMBERS = " ".join(str(i) for i in range(201))
HUGE = "8" * 100_000
JUNK = bytes(range(256)).decode("latin-1") * 4 + "\x00" * 16


def think(trace: str, final: str) -> str:
    return f"<think>{trace}</think>{final}"


# --------------------------------------------------------------------------- extract_final


@pytest.mark.parametrize(
    ("completion", "final"),
    [
        ("<think>37 + 45 = 82</think>82", "82"),
        ("<think>a</think>b</think>c", "c"),  # the LAST </think>
        ("<think>a</think>  b \n<|im_end|>", "b"),
        ("b<|im_end|><|endoftext|>\n", "b"),
        ("<think>a</think>b <|im_end|> c", "b <|im_end|> c"),  # only a trailing EOS goes
        ("no reasoning at all ", "no reasoning at all"),
        ("</think>b", "b"),  # the generation prompt opened the block
        ("<think>the answer is 82", ""),  # never closed: no final answer
        ("<think>a</think>b<think>c", ""),  # a new block left open
        ("<think>a</think>", ""),
        ("", ""),
    ],
)
def test_extract_final(completion, final):
    assert extract_final(completion) == final


def test_extract_final_of_a_non_string_is_empty():
    assert extract_final(None) == ""  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hand-computed scores


NORMAL = [
    # math_numeric
    ("math_numeric", think("37 + 45 = 82", "82"), "82", {}, 1.0),
    ("math_numeric", "The answer is 82.", "82", {}, 1.0),
    ("math_numeric", think("a", "\n 82 \n<|endoftext|>"), "82", {}, 1.0),
    ("math_numeric", "x = 82", "82", {}, 1.0),
    ("math_numeric", "\\boxed{82}", "82", {}, 1.0),
    ("math_numeric", "答案是82。", "82", {}, 1.0),  # CJK around the number is not a word
    ("math_numeric", "82\x00", "82", {}, 1.0),  # NUL next to the number does not glue to it
    ("math_numeric", "83", "82", {}, 0.0),
    ("math_numeric", "82 or 83", "82", {}, 0.0),
    ("math_numeric", "1,234", "1234", {}, 1.0),
    ("math_numeric", "1234", "1,234", {}, 1.0),
    ("math_numeric", "1,23", "123", {}, 0.0),  # a malformed separator is no number
    ("math_numeric", "-7", "-7", {}, 1.0),
    ("math_numeric", "7", "-7", {}, 0.0),
    ("math_numeric", "\u22127", "-7", {}, 1.0),  # U+2212 MINUS SIGN
    ("math_numeric", "5-7", "-7", {}, 0.0),  # subtraction, two numbers
    ("math_numeric", "0.75", "3/4", {}, 1.0),
    ("math_numeric", "3/4", "0.75", {}, 1.0),
    ("math_numeric", "-.5", "-1/2", {}, 1.0),
    ("math_numeric", "12.0", "12", {}, 1.0),
    ("math_numeric", "12.0000001", "12", {}, 0.0),  # integers are exact
    ("math_numeric", "3.141593", "3.14159265", {}, 1.0),  # rel error 1.1e-7
    ("math_numeric", "3.1416", "3.14159265", {}, 0.0),  # rel error 2.3e-6
    ("math_numeric", "0.3333333", "1/3", {}, 1.0),  # rel error 1e-7
    ("math_numeric", "3/0", "82", {}, 0.0),
    ("math_numeric", "1e400", "82", {}, 0.0),  # no scientific notation: "1e400" is a word
    # exact_match
    ("exact_match", think("a yellow triangle", "yellow"), "yellow", {}, 1.0),
    ("exact_match", "Blue.", "blue", {}, 1.0),
    ("exact_match", "blue!", "blue", {}, 1.0),
    ("exact_match", "  cup \n\t cup ", "cup cup", {}, 1.0),
    ("exact_match", "CORN", "corn", {}, 1.0),
    ("exact_match", "corn", "CORN", {"meta": {"case_sensitive": True}}, 0.0),
    ("exact_match", "CORN", "CORN", {"meta": {"case_sensitive": True}}, 1.0),
    ("exact_match", "blue sky", "blue", {}, 0.0),
    ("exact_match", "bleu", "blue", {}, 0.0),
    ("exact_match", '"blue"', "blue", {}, 0.0),  # quotes are part of the answer
    ("exact_match", "3 4 5 6", "3 4 5 6", {}, 1.0),
    # count
    ("count", think("1 2 3 4", "4"), "4", {}, 1.0),
    ("count", "four", "4", {}, 1.0),
    ("count", "There are Four circles.", "4", {}, 1.0),
    ("count", "zero", "0", {}, 1.0),
    ("count", "seventeen", "17", {}, 1.0),
    ("count", "seventeen", "7", {}, 0.0),
    ("count", "twenty", "20", {}, 1.0),
    ("count", "twenty-one", "21", {}, 0.0),  # two number words (20 and 1), not 21
    ("count", "1,000", "1000", {}, 1.0),
    ("count", "4.0", "4", {}, 0.0),
    ("count", "-4", "4", {}, 0.0),
    ("count", "4 (four)", "4", {}, 0.0),  # exactly one number
    ("count", "someone", "1", {}, 0.0),  # "one" inside a word is no number
    ("count", "5", "4", {}, 0.0),
    # grounding_iou, reference [0,0,10,10] (area 100)
    ("grounding_iou", "[0,0,10,10]", "[0,0,10,10]", {}, 1.0),
    ("grounding_iou", "[5,0,15,10]", "[0,0,10,10]", {}, 50 / 150),
    ("grounding_iou", think("left", "The box is [ 0, 0, 10, 20 ]."), "[0,0,10,10]", {}, 100 / 200),
    ("grounding_iou", "[2.5,2.5,7.5,7.5]", "[0,0,10,10]", {}, 25 / 100),
    ("grounding_iou", "[10,0,20,10]", "[0,0,10,10]", {}, 0.0),  # touching, x2 exclusive
    ("grounding_iou", "[0,0,10]", "[0,0,10,10]", {}, 0.0),
    ("grounding_iou", "[10,0,0,10]", "[0,0,10,10]", {}, 0.0),  # x2 <= x1
    ("grounding_iou", "(0,0,10,10)", "[0,0,10,10]", {}, 0.0),
    ("grounding_iou", "[0,0,10,10] or [0,0,9,9]", "[0,0,10,10]", {}, 0.0),
    # grounding_point, reference [0,0,30,40] (diagonal 50)
    ("grounding_point", "[0,0,30,40]", "[0,0,30,40]", {}, 1.0),
    ("grounding_point", "[10,10,20,20]", "[0,0,30,40]", {}, 1.0),  # centre (15,15) inside
    ("grounding_point", "[30,0,50,80]", "[0,0,30,40]", {}, 1 - 10 / 50),  # centre (40,40), 10 from the edge
    ("grounding_point", "[33,44]", "[0,0,30,40]", {}, 1 - 5 / 50),  # a point, 5 from the corner
    ("grounding_point", "[30,40]", "[0,0,30,40]", {}, 1.0),  # on the corner
    ("grounding_point", "[100,100,110,110]", "[0,0,30,40]", {}, 0.0),
    ("grounding_point", "[1,2,3]", "[0,0,30,40]", {}, 0.0),
    ("grounding_point", "[20,0,10,10]", "[0,0,30,40]", {}, 0.0),  # x2 <= x1
    # ocr, reference T6DTR7 (6 characters)
    ("ocr", "T6DTR7", "T6DTR7", {}, 1.0),
    ("ocr", think("read it", " t6dtr7 "), "T6DTR7", {}, 1.0),
    ("ocr", "T6DTR1", "T6DTR7", {}, 1 - 1 / 6),
    ("ocr", "T6DTR", "T6DTR7", {}, 1 - 1 / 6),
    ("ocr", "XT6DTR7X", "T6DTR7", {}, 1 - 2 / 6),
    ("ocr", "T6DTR7T6DTR7", "T6DTR7", {}, 0.0),  # 2x long, distance 6
    ("ocr", "T6DTR7 T6DTR7", "T6DTR7", {}, 0.0),  # over 2x long
    ("ocr", "QQQQQQ", "T6DTR7", {}, 0.0),
    ("ocr", "WWXEE", "WWXE", {}, 1 - 1 / 4),
    ("ocr", "HELLO  WORLD", "hello world", {}, 1.0),
    # choice, reference B = blue
    ("choice", "B", "B", OPTIONS, 1.0),
    ("choice", "(B)", "B", OPTIONS, 1.0),
    ("choice", "B.", "B", OPTIONS, 1.0),
    ("choice", "b", "B", OPTIONS, 1.0),
    ("choice", "B. blue", "B", OPTIONS, 1.0),
    ("choice", "The answer is B", "B", OPTIONS, 1.0),
    ("choice", "选B", "B", OPTIONS, 1.0),
    ("choice", think("A or B? It is B", "B"), "B", OPTIONS, 1.0),
    ("choice", "blue", "B", OPTIONS, 1.0),
    ("choice", "Blue.", "B", OPTIONS, 1.0),
    ("choice", "It is blue", "B", OPTIONS, 1.0),
    ("choice", "blue", "B", {"meta": {"options": ["red", "blue", "green"]}}, 1.0),
    ("choice", "dark red", "B", {"meta": {"options": {"A": "red", "B": "dark red"}}}, 1.0),  # exact beats contains
    ("choice", "blue", "B", {}, 0.0),  # no options: text cannot pick a letter
    ("choice", "A", "B", OPTIONS, 0.0),
    ("choice", "B or C", "B", OPTIONS, 0.0),
    ("choice", "B, B", "B", OPTIONS, 0.0),
    ("choice", "blue or green", "B", OPTIONS, 0.0),
    ("choice", "red", "B", OPTIONS, 0.0),
    ("choice", "purple", "B", OPTIONS, 0.0),
    ("choice", "A blue one", "B", OPTIONS, 0.0),  # a capital A standing alone reads as letter A
    # format
    ("format", think("a", "82"), "", {}, 1.0),
    ("format", think("a", "82") + "<|im_end|>", "", {}, 1.0),
    ("format", "  " + think("", "82"), "", {}, 1.0),  # empty reasoning is still the format
    ("format", think("a", ""), "", {}, 0.0),
    ("format", think("a", " <|im_end|>"), "", {}, 0.0),
    ("format", "82", "", {}, 0.0),
    ("format", "x" + think("a", "82"), "", {}, 0.0),
    ("format", "</think>82", "", {}, 0.0),
    ("format", think("a", "82") + think("b", "83"), "", {}, 0.0),
]


@pytest.mark.parametrize(("name", "completion", "answer", "record", "expected"), NORMAL)
def test_hand_computed(name, completion, answer, record, expected):
    assert REWARDS[name](completion, answer, record) == pytest.approx(expected, rel=1e-12, abs=0)


# --------------------------------------------------------------------------- adversarial completions

ADVERSARIAL_CASES = (
    "empty",
    "repeated",
    "all_numbers",
    "huge_number",
    "think_only",
    "unclosed_think",
    "embedded",
    "binary_junk",
    "unicode_digits",
)

# name -> (reference, record, {case: (completion, exact reward)})
ADVERSARIAL = {
    "math_numeric": (
        "82",
        {},
        {
            "empty": ("", 0.0),
            "repeated": ("82 82 82 82", 0.0),
            "all_numbers": (ALL_NUMBERS, 0.0),
            "huge_number": (think("big", HUGE), 0.0),
            "think_only": (think("45 + 37 = 82", "83"), 0.0),
            "unclosed_think": ("<think>45 + 37 = 82", 0.0),
            "embedded": ("1821", 0.0),
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("٨٢", 0.0),
        },
    ),
    "count": (
        "12",
        {},
        {
            "empty": ("", 0.0),
            "repeated": ("12 12 12 12", 0.0),
            "all_numbers": (ALL_NUMBERS, 0.0),
            "huge_number": (think("big", HUGE), 0.0),
            "think_only": (think("twelve", "11"), 0.0),
            "unclosed_think": ("<think>12", 0.0),
            "embedded": ("112 twelves", 0.0),
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("１２", 0.0),  # fullwidth
        },
    ),
    "exact_match": (
        "82",
        {},
        {
            "empty": ("", 0.0),
            "repeated": ("82 82 82 82", 0.0),
            "all_numbers": (ALL_NUMBERS, 0.0),
            "huge_number": (think("big", HUGE), 0.0),
            "think_only": (think("82", "83"), 0.0),
            "unclosed_think": ("<think>82", 0.0),
            "embedded": ("1821", 0.0),
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("٨٢", 0.0),
        },
    ),
    "ocr": (
        "82",
        {},
        {
            "empty": ("", 0.0),
            "repeated": ("82 82 82 82", 0.0),  # 11 chars > 2 x 2
            "all_numbers": (ALL_NUMBERS, 0.0),
            "huge_number": (think("big", HUGE), 0.0),
            "think_only": (think("82", "17"), 0.0),
            "unclosed_think": ("<think>82", 0.0),
            "embedded": ("1821", 0.0),  # distance 2 of 2
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("٨٢", 0.0),
        },
    ),
    "choice": (
        "B",
        OPTIONS,
        {
            "empty": ("", 0.0),
            "repeated": ("B B B B", 0.0),
            "all_numbers": (ALL_NUMBERS, 0.0),
            "huge_number": (think("big", HUGE), 0.0),
            "think_only": (think("B", "C"), 0.0),
            "unclosed_think": ("<think>B", 0.0),
            "embedded": ("Blueprint ABC", 0.0),
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("Ｂ ٢", 0.0),  # fullwidth B, Arabic-Indic 2
        },
    ),
    "grounding_iou": (
        "[0,0,10,10]",
        {},
        {
            "empty": ("", 0.0),
            "repeated": (" ".join(["[0,0,10,10]"] * 4), 0.0),
            "all_numbers": ("[" + ALL_NUMBERS.replace(" ", ",") + "]", 0.0),
            "huge_number": (think("big", "[" + HUGE + ",0,10,10]"), 0.0),
            "think_only": (think("[0,0,10,10]", "[20,20,30,30]"), 0.0),
            "unclosed_think": ("<think>[0,0,10,10]", 0.0),
            "embedded": ("[0,0,10,100]", 100 / 1000),  # 100 is read as 100, not 10
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("[٠,٠,١٠,١٠]", 0.0),
        },
    ),
    "grounding_point": (
        "[0,0,10,10]",
        {},
        {
            "empty": ("", 0.0),
            "repeated": (" ".join(["[0,0,10,10]"] * 4), 0.0),
            "all_numbers": ("[" + ALL_NUMBERS.replace(" ", ",") + "]", 0.0),
            "huge_number": (think("big", "[" + HUGE + ",0,10,10]"), 0.0),
            "think_only": (think("[0,0,10,10]", "[40,40,50,50]"), 0.0),
            "unclosed_think": ("<think>[0,0,10,10]", 0.0),
            "embedded": ("[0,0,10,100]", 0.0),  # centre (5,50): 40 from the box, diagonal 14.1
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": ("[٥,٥]", 0.0),
        },
    ),
    # format checks structure only, so a well-formed completion with a wrong answer still scores 1.
    "format": (
        "82",
        {},
        {
            "empty": ("", 0.0),
            "repeated": (think("a", "82") * 4, 0.0),
            "all_numbers": (ALL_NUMBERS, 0.0),
            "huge_number": (think("big", HUGE), 1.0),
            "think_only": (think("82", "83"), 1.0),
            "unclosed_think": ("<think>82", 0.0),
            "embedded": ("<think>a<think>b</think>82", 0.0),
            "binary_junk": (JUNK, 0.0),
            "unicode_digits": (think("a", "٨٢"), 1.0),
        },
    ),
}


def test_every_verifier_meets_every_adversarial_case():
    assert set(ADVERSARIAL) == set(REWARDS)
    for name, (_, _, cases) in ADVERSARIAL.items():
        assert tuple(cases) == ADVERSARIAL_CASES, name


@pytest.mark.parametrize(
    ("name", "case"), [(n, c) for n in ADVERSARIAL for c in ADVERSARIAL_CASES], ids=lambda x: str(x)
)
def test_adversarial(name, case):
    answer, record, cases = ADVERSARIAL[name]
    completion, expected = cases[case]
    t0 = time.perf_counter()
    got = REWARDS[name](completion, answer, record)
    elapsed = time.perf_counter() - t0
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert elapsed < 0.1, f"{name} took {elapsed:.3f}s on {case}"


# Inputs built to make a backtracking regex or a quadratic loop blow up.
PATHOLOGICAL = [
    "1," + "234," * 25_000 + "x",
    "[" * 100_000,
    "[" + "1," * 50_000,
    "." * 100_000,
    "-" * 100_000,
    "<think>" * 20_000,
    "</think>" * 20_000,
    "x" + "9" * 100_000,
    "B " * 50_000,
    "one " * 25_000,
]


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("completion", PATHOLOGICAL, ids=lambda c: repr(c[:12]))
def test_pathological_inputs_are_fast_and_score_zero(name, completion):
    answer, record, _ = ADVERSARIAL[name]
    t0 = time.perf_counter()
    assert REWARDS[name](completion, answer, record) == 0.0
    assert time.perf_counter() - t0 < 0.1


def test_verifiers_never_raise_on_random_completions():
    rng = random.Random(0)
    pieces = [
        "<think>", "</think>", "<|im_end|>", "<|endoftext|>", "[", "]", ",", ".", "-", "/", " ", "\n",
        "82", "0", "1,234", "3/4", "B", "(A)", "blue", "four", "\x00", "\ud800", "٨", "８", "é", "中", "😀",
    ]  # fmt: skip
    for _ in range(500):
        completion = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for name, (answer, record, _) in ADVERSARIAL.items():
            r = REWARDS[name](completion, answer, record)
            assert isinstance(r, float) and 0.0 <= r <= 1.0, (name, completion)


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("math_numeric", "eighty-two"),
        ("math_numeric", "1 2"),
        ("math_numeric", ""),
        ("count", "4.5"),
        ("count", "-1"),
        ("exact_match", " . "),
        ("ocr", ""),
        ("choice", "F"),
        ("choice", "AB"),
        ("grounding_iou", "[0,0,10]"),
        ("grounding_point", "[10,0,0,10]"),
    ],
)
def test_malformed_reference_is_a_data_error(name, answer):
    with pytest.raises(ValueError, match="reference"):
        REWARDS[name]("82", answer, {})


# --------------------------------------------------------------------------- edit distance


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("kitten", "sitting", 3), ("", "ab", 2), ("ab", "", 2), ("flaw", "lawn", 2), ("abc", "abc", 0), ("ab", "ba", 2)],
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d
    assert edit_distance(b, a) == d


def test_edit_distance_refuses_long_inputs():
    assert edit_distance("a" * MAX_EDIT_LEN, "a" * MAX_EDIT_LEN) == 0
    with pytest.raises(ValueError, match="at most"):
        edit_distance("a" * (MAX_EDIT_LEN + 1), "a")


def test_ocr_partial_credit_stops_at_the_edit_distance_cap():
    ref = "x" * 600
    assert REWARDS["ocr"]("y" + ref, ref, {}) == 1 - 1 / 600
    # Under 2x the reference but over MAX_EDIT_LEN: exact match only (401 edits would give 1/3).
    assert REWARDS["ocr"]("y" * 401 + ref, ref, {}) == 0.0
    long_ref = "x" * (MAX_EDIT_LEN + 1)
    assert REWARDS["ocr"](long_ref.upper(), long_ref, {}) == 1.0
    assert REWARDS["ocr"](long_ref[:-1], long_ref, {}) == 0.0


# --------------------------------------------------------------------------- regularisers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b c a b c", 1 / 4),  # trigrams abc, bca, cab, abc
        ("82 82 82 82", 1 / 2),
        ("the cat sat on the mat", 0.0),
        ("a b", 0.0),
        ("", 0.0),
        ("a " * 1000, 1 - 1 / 998),
    ],
)
def test_repetition_penalty(text, expected):
    assert repetition_penalty(text) == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(
    ("prompt", "completion", "expected"),
    [
        ("What colour is it?", "<think>it is blue</think>blue<|im_end|>", 1.0),
        ("这是什么颜色?", "<think>蓝色</think>蓝色<|im_end|>", 1.0),
        ("这是什么颜色?", "blue", 0.0),
        ("What colour is it?", "蓝色 blue", 4 / 6),
        ("Quelle couleur?", "bleu, évidemment", 1.0),
        ("How many?", "42", 1.0),  # no letters
        ("<image>\n42 + 1", "fourty-three", 1.0),  # prompt without letters
        # Latin-1 has 52 ASCII + 62 accented Latin letters, and 3 letters that are not Latin (ª µ º).
        ("What?", JUNK, 114 / 117),
    ],
)
def test_language_consistency(prompt, completion, expected):
    assert language_consistency(prompt, completion) == pytest.approx(expected, rel=1e-12, abs=0)


def test_regularisers_are_fast_on_huge_text():
    t0 = time.perf_counter()
    assert repetition_penalty(HUGE) == 0.0  # one word
    assert language_consistency("What?", "中" * 100_000) == 0.0
    assert time.perf_counter() - t0 < 0.5


# --------------------------------------------------------------------------- registry


def test_get_reward_names_the_unknown_verifier_and_the_registered_ones():
    with pytest.raises(UnknownRewardError) as e:
        get_reward("math_numerc")
    msg = str(e.value)
    assert "'math_numerc'" in msg and "math_numeric" in msg and "grounding_iou" in msg
    assert isinstance(e.value, Step3VLError) and isinstance(e.value, KeyError)


def test_register_reward_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_reward("ocr")(lambda c, a, r: 0.0)


def test_register_reward_adds_to_the_registry(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))

    @rewards.register_reward("always_half")
    def half(completion, answer, record):
        return 0.5

    assert rewards.get_reward("always_half") is half
    assert "always_half" not in REWARDS


def test_score_dispatches_on_the_record():
    rec = {"id": "r1", "reward": "math_numeric", "answer": "82"}
    assert score(think("37 + 45", "82"), rec) == 1.0
    assert score("83", rec) == 0.0
    assert score("B", {"reward": "choice", "answer": "B", **OPTIONS}) == 1.0
    with pytest.raises(UnknownRewardError, match="'nope'"):
        score("82", {**rec, "reward": "nope"})
    with pytest.raises(UnknownRewardError, match="'r1'"):
        score("82", {"id": "r1", "answer": "82"})


def test_family_rewards_are_registered():
    from step3vl.data import families

    used = {f.reward for f in families.FAMILIES.values() if f.reward} | {"choice"}
    assert used <= set(REWARDS)
    assert set(families.REWARDS) <= set(REWARDS)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_family_targets_score_full_reward(split):
    """A verifiable record's own target is a correct completion: every verifier must agree."""
    from step3vl.data.families import FAMILIES, generate

    seen = set()
    for name, fam in sorted(FAMILIES.items()):
        if fam.kind != "verifiable":
            continue
        for difficulty in (1, 2, 3):
            for rec in generate(name, 12, seed=3, difficulty=difficulty, split=split):
                target = rec["messages"][-1]["content"]
                assert score(target, rec) == 1.0, (rec["id"], target, rec["answer"])
                seen.add(rec["reward"])
    assert {"math_numeric", "exact_match", "count", "grounding_iou", "ocr", "choice"} <= seen


def test_grounding_point_scores_family_targets():
    from step3vl.data.families import generate

    for rec in generate("grounding", 5, seed=0, difficulty=3):
        assert REWARDS["grounding_point"](rec["answer"], rec["answer"], rec) == 1.0
        assert math.isclose(REWARDS["grounding_iou"](rec["answer"], rec["answer"], rec), 1.0)
