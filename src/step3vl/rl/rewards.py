"""Verifiable rewards: the registry of small pure verifiers that RL (RLVR) and evaluation score with.

A dataset record names its verifier in ``record["reward"]`` (the data families set it, see
``step3vl.data.families``) and carries the reference in ``record["answer"]``;
:func:`score` looks the verifier up in :data:`REWARDS` and calls it. Every verifier has the
signature ``(completion, answer, record) -> float`` in ``[0, 1]`` and is registered with
``@register_reward(name)``, in the style of verl's ``compute_score`` and TRL's reward functions.

Verifiers read only the *final answer* (:func:`extract_final`): the text after the last
``</think>``. They are pure and never raise on a completion, whatever it holds (empty, megabytes,
NUL bytes, any script); they raise ``ValueError`` on a malformed *reference*, which is a data bug.
They are strict on purpose, so that hedging does not pay: a numeric answer must contain exactly
one number, a multiple-choice answer exactly one letter, a box answer exactly one box.

Shared reading rules:

- Numbers are written with ASCII digits ``0-9``. A digit run touching an ASCII letter, ``_`` or
  any other digit (``1821``, ``82nd``, ``x82``, ``1e400``, ``82²``) is part of a word, not the
  number 82; punctuation and non-Latin text around it are fine (``答案是82。`` reads 82).
  Digits of other scripts (``٨٢``, fullwidth ``８２``) are not read as numbers.
- A number longer than :data:`MAX_NUMBER_CHARS` still counts as a number but never equals
  anything, so a 100k-digit answer costs linear time and scores 0.

:func:`repetition_penalty` and :func:`language_consistency` are not verifiers (they need no
reference): they are behaviour-regularisation terms the RLHF objective may add.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from step3vl.errors import Step3VLError

# The reasoning markers and end-of-turn tokens of step3vl.model.tokenizer, repeated here so that
# scoring needs neither transformers nor tokenizers.
THINK_START, THINK_END = "<think>", "</think>"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

MAX_NUMBER_CHARS = 64
MAX_EDIT_LEN = 1000
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()
LETTERS = "ABCDE"

RewardFn = Callable[[str, str, dict[str, Any]], float]
REWARDS: dict[str, RewardFn] = {}


class UnknownRewardError(Step3VLError, KeyError):
    """A record or config names a verifier that is not registered."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn(completion, answer, record) -> float`` as verifier ``name``."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """The verifier registered as ``name``."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise UnknownRewardError(f"unknown reward verifier {name!r}; registered: {sorted(REWARDS)}") from None


def score(completion: str, record: dict[str, Any]) -> float:
    """Score ``completion`` against ``record["answer"]`` with the verifier ``record["reward"]``."""
    if "reward" not in record:
        raise UnknownRewardError(f"record {record.get('id', '?')!r} names no reward verifier ('reward' is missing)")
    return get_reward(record["reward"])(completion, record["answer"], record)


# --------------------------------------------------------------------------- reading completions


def _strip_eos(text: str) -> str:
    text = text.strip()
    while text.endswith(EOS_TOKENS):
        text = text[: -len(next(t for t in EOS_TOKENS if text.endswith(t)))].rstrip()
    return text


def extract_final(completion: str) -> str:
    """The final answer: the text after the last ``</think>``, stripped of whitespace and EOS tokens.

    A ``<think>`` left open (no ``</think>`` after it) means the model never answered: ``""``.
    Without any think marker the whole completion is the final answer.
    """
    if not isinstance(completion, str):
        return ""
    if THINK_END in completion:
        final = completion.rsplit(THINK_END, 1)[1]
        if THINK_START in final:
            return ""
    elif THINK_START in completion:
        return ""
    else:
        final = completion
    return _strip_eos(final)


def _wordish(c: str) -> bool:
    """Whether ``c`` glues to a neighbouring number or letter (see the module docstring)."""
    return c.isdigit() or (c.isascii() and (c.isalnum() or c == "_"))


_RUN = re.compile(r"\.?[0-9][0-9.,/]*")
_NUMBER = re.compile(r"-?(?:(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+|[0-9]+/[0-9]+)")


def _numbers(text: str) -> list[tuple[str, Fraction | None]]:
    """The standalone numbers in ``text``: (as written with its sign, value or ``None`` if malformed).

    A malformed run (``1,2``, ``1.2.3``, ``3/0``, longer than MAX_NUMBER_CHARS) still counts as a
    number, so it cannot be used to hide a second answer.
    """
    out = []
    for m in _RUN.finditer(text):
        run = m.group().rstrip(".,/")  # "12." ends a sentence
        start, end = m.start(), m.start() + len(run)
        if (start and _wordish(text[start - 1])) or (end < len(text) and _wordish(text[end])):
            continue
        if start and text[start - 1] in "-\u2212" and not (start > 1 and _wordish(text[start - 2])):
            run = "-" + run
        value = None
        if len(run) <= MAX_NUMBER_CHARS and _NUMBER.fullmatch(run):
            try:
                value = Fraction(run.replace(",", ""))
            except ZeroDivisionError:
                pass
        out.append((run, value))
    return out


def _reference_number(answer: str) -> Fraction:
    nums = _numbers(answer) if isinstance(answer, str) else []
    if len(nums) != 1 or nums[0][1] is None:
        raise ValueError(f"reference {answer!r} is not exactly one number")
    return nums[0][1]


def _normalise(text: str, *, case_sensitive: bool = False) -> str:
    text = " ".join(text.split()).rstrip(".,!?;:").rstrip()
    return text if case_sensitive else text.casefold()


def _meta(record: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = record.get("meta") if isinstance(record, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


# --------------------------------------------------------------------------- verifiers


@register_reward("math_numeric")
def math_numeric(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 if the final answer holds exactly one number and it equals the reference.

    Integers, decimals, fractions (``3/4``), negatives and thousands separators (``1,234``) are
    read; an integer reference must match exactly (``12.0`` does, ``12.0000001`` does not), any
    other within a relative 1e-6. Values are Fractions, so nothing overflows or rounds.
    """
    ref = _reference_number(answer)
    nums = _numbers(extract_final(completion))
    if len(nums) != 1 or nums[0][1] is None:
        return 0.0
    pred = nums[0][1]
    if ref.denominator == 1:
        return float(pred == ref)
    return float(abs(pred - ref) <= abs(ref) * Fraction(1, 10**6))


@register_reward("exact_match")
def exact_match(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 if the final answer equals the reference up to case, runs of whitespace and trailing ``.,!?;:``.

    ``record["meta"]["case_sensitive"]`` (true) keeps case, for instructions about case.
    """
    cs = bool(_meta(record).get("case_sensitive", False))
    ref = _normalise(answer, case_sensitive=cs) if isinstance(answer, str) else ""
    if not ref:
        raise ValueError(f"reference {answer!r} is empty after normalisation")
    return float(_normalise(extract_final(completion), case_sensitive=cs) == ref)


_NUMBER_WORD = re.compile(
    r"(?<![A-Za-z])(" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")(?![A-Za-z])", re.IGNORECASE
)
_COUNT = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+")


@register_reward("count")
def count(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 if the final answer holds exactly one number, a non-negative integer equal to the reference.

    The number may be digits (``7``, ``1,000``) or a word ``zero`` .. ``twenty``; a sign, decimal
    point or fraction makes it no count (``-4``, ``4.0`` score 0).
    """
    if not (isinstance(answer, str) and _COUNT.fullmatch(answer.strip())):
        raise ValueError(f"reference {answer!r} is not a non-negative integer")
    ref = int(answer.strip().replace(",", ""))
    final = extract_final(completion)
    found: list[int | None] = []
    for text, value in _numbers(final):
        ok = value is not None and _COUNT.fullmatch(text)
        found.append(int(value) if ok else None)
    found += [NUMBER_WORDS.index(w.lower()) for w in _NUMBER_WORD.findall(final)]
    return float(len(found) == 1 and found[0] == ref)


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_COORD = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _bracket(text: str) -> tuple[float, ...] | None:
    """The numbers of the only ``[...]`` group in ``text``; ``None`` if there is not exactly one or it is malformed."""
    groups = _BRACKETS.findall(text)
    if len(groups) != 1:
        return None
    parts = [p.strip() for p in groups[0].split(",")]
    if any(len(p) > MAX_NUMBER_CHARS or not _COORD.fullmatch(p) for p in parts):
        return None
    return tuple(float(p) for p in parts)


def _is_box(v: tuple[float, ...] | None) -> bool:
    return v is not None and len(v) == 4 and v[0] < v[2] and v[1] < v[3]


def _reference_box(answer: str) -> tuple[float, ...]:
    box = _bracket(answer) if isinstance(answer, str) else None
    if not _is_box(box):
        raise ValueError(f"reference {answer!r} is not a box [x1,y1,x2,y2] with x1<x2, y1<y2")
    return box  # type: ignore[return-value]


@register_reward("grounding_iou")
def grounding_iou(completion: str, answer: str, record: dict[str, Any]) -> float:
    """IoU of the one box ``[x1,y1,x2,y2]`` in the final answer with the reference box.

    Boxes have x2/y2 exclusive, so their area is ``(x2-x1)*(y2-y1)``. No box, two boxes, a box of
    other than four numbers or with x2<=x1 / y2<=y1 score 0.
    """
    ref = _reference_box(answer)
    box = _bracket(extract_final(completion))
    if box is None or not _is_box(box):
        return 0.0
    iw = min(box[2], ref[2]) - max(box[0], ref[0])
    ih = min(box[3], ref[3]) - max(box[1], ref[1])
    inter = max(0.0, iw) * max(0.0, ih)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (ref[2] - ref[0]) * (ref[3] - ref[1]) - inter
    return inter / union


@register_reward("grounding_point")
def grounding_point(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 if the predicted point lies in the reference box, else ``max(0, 1 - dist/diag)``.

    The point is the centre of the one box ``[x1,y1,x2,y2]`` in the final answer, or a point
    ``[x,y]``. ``dist`` is to the nearest point of the reference box (not its centre), so the
    reward is continuous at the box edge; ``diag`` is the reference box's diagonal.
    """
    ref = _reference_box(answer)
    pred = _bracket(extract_final(completion))
    if pred is not None and len(pred) == 4:
        pred = ((pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2) if _is_box(pred) else None
    if pred is None or len(pred) != 2:
        return 0.0
    x, y = pred
    dx = max(ref[0] - x, 0.0, x - ref[2])
    dy = max(ref[1] - y, 0.0, y - ref[3])
    if dx == 0 and dy == 0:
        return 1.0
    return max(0.0, 1.0 - math.hypot(dx, dy) / math.hypot(ref[2] - ref[0], ref[3] - ref[1]))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert/delete/substitute), O(len(a)*len(b)).

    Refuses (``ValueError``) strings over MAX_EDIT_LEN characters, which keeps a call under about
    a second of pure Python; callers check lengths first.
    """
    if len(a) > MAX_EDIT_LEN or len(b) > MAX_EDIT_LEN:
        raise ValueError(f"edit_distance takes strings of at most {MAX_EDIT_LEN} characters")
    # A shared prefix or suffix never changes the distance; trimming it makes near-matches cheap.
    lo = 0
    while lo < min(len(a), len(b)) and a[lo] == b[lo]:
        lo += 1
    hi = 0
    while hi < min(len(a), len(b)) - lo and a[-1 - hi] == b[-1 - hi]:
        hi += 1
    a, b = a[lo : len(a) - hi], b[lo : len(b) - hi]
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@register_reward("ocr")
def ocr(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 on a match up to case and runs of whitespace, else ``max(0, 1 - edit_distance/len(reference))``.

    Partial credit only for a final answer at most twice the reference's length (so repeating the
    text scores 0) and both at most MAX_EDIT_LEN characters (longer ones get exact-match only).
    """
    ref = " ".join(answer.split()).casefold() if isinstance(answer, str) else ""
    if not ref:
        raise ValueError(f"reference {answer!r} is empty")
    pred = " ".join(extract_final(completion).split()).casefold()
    if pred == ref:
        return 1.0
    if len(pred) > 2 * len(ref) or len(ref) > MAX_EDIT_LEN or len(pred) > MAX_EDIT_LEN:
        return 0.0
    return max(0.0, 1.0 - edit_distance(pred, ref) / len(ref))


_LETTER_ONLY = re.compile(r"\(?([A-Ea-e])[).:]?")
_LETTER = re.compile(r"(?<![A-Za-z0-9_])[A-E](?![A-Za-z0-9_])")


def _options(record: Mapping[str, Any]) -> dict[str, str]:
    opts = _meta(record).get("options")
    if isinstance(opts, Mapping):
        return {str(k).upper(): str(v) for k, v in opts.items()}
    if isinstance(opts, list | tuple):
        return {LETTERS[i]: str(v) for i, v in enumerate(opts[: len(LETTERS)])}
    return {}


@register_reward("choice")
def choice(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 if the final answer picks the reference letter (``A``..``E``).

    Read as a letter: ``B``, ``(B)``, ``B.``, ``b``, or exactly one capital A-E standing alone in
    a longer answer (``B. blue``, ``The answer is B``). With no letter, the text of exactly one
    option in ``record["meta"]["options"]`` (``{"A": "red", ...}`` or a list) picks that option.
    Two letters (even the same one twice) or two options named score 0.
    """
    ref = answer.strip().upper() if isinstance(answer, str) else ""
    if len(ref) != 1 or ref not in LETTERS:
        raise ValueError(f"reference {answer!r} is not a letter A-E")
    final = extract_final(completion)
    m = _LETTER_ONLY.fullmatch(final)
    if m:
        return float(m.group(1).upper() == ref)
    letters = _LETTER.findall(final)
    if letters:
        return float(len(letters) == 1 and letters[0] == ref)
    opts = {k: _normalise(v) for k, v in _options(record).items()}
    said = _normalise(final)
    if not said or not any(opts.values()):
        return 0.0
    exact = [k for k, v in opts.items() if v and v == said]
    named = exact or [k for k, v in opts.items() if v and re.search(rf"(?<!\w){re.escape(v)}(?!\w)", said)]
    return float(len(named) == 1 and named[0] == ref)


@register_reward("format")
def format_reward(completion: str, answer: str, record: dict[str, Any]) -> float:
    """1.0 for exactly ``<think>…</think>`` then a non-empty final answer, else 0 (a shaping term).

    The completion may have surrounding whitespace and a trailing EOS token; the reasoning may be
    empty. ``answer`` is not used.
    """
    if not isinstance(completion, str):
        return 0.0
    text = _strip_eos(completion)
    if not text.startswith(THINK_START) or text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return 0.0
    return float(bool(extract_final(text)))


# --------------------------------------------------------------------------- behaviour regularisers


def repetition_penalty(text: str, n: int = 3) -> float:
    """The share of word n-grams (whitespace-split) that repeat an earlier one: 0 = none, → 1 = a loop.

    ``1 - distinct/total`` over the n-grams of ``text``; 0.0 for texts of fewer than ``n`` words.
    The RLHF objective subtracts it, so degenerate repetition is penalised whatever the verifier says.
    """
    words = text.split() if isinstance(text, str) else []
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


_MARKUP = re.compile(r"</?\|?[A-Za-z_]+\|?>")


def _is_latin(c: str) -> bool:
    return c.isascii() or unicodedata.name(c, "").startswith("LATIN")


def language_consistency(prompt: str, completion: str) -> float:
    """The share of the completion's letters in the prompt's script, Latin or non-Latin.

    The prompt's script is that of the majority of its letters. Markup tokens (``<think>``,
    ``<|im_end|>``, ``<image>``) are ignored. 1.0 when the completion has no letters (a digit-only
    answer) or the prompt has none (nothing to be consistent with). Penalises drifting into
    another language mid-answer, a known failure of multilingual RL.
    """
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        return 1.0
    p = [_is_latin(c) for c in _MARKUP.sub("", prompt) if c.isalpha()]
    c = [_is_latin(ch) for ch in _MARKUP.sub("", completion) if ch.isalpha()]
    if not p or not c:
        return 1.0
    latin = sum(p) * 2 >= len(p)
    return sum(x == latin for x in c) / len(c)


__all__ = [
    "EOS_TOKENS",
    "MAX_EDIT_LEN",
    "MAX_NUMBER_CHARS",
    "REWARDS",
    "RewardFn",
    "UnknownRewardError",
    "choice",
    "count",
    "edit_distance",
    "exact_match",
    "extract_final",
    "format_reward",
    "get_reward",
    "grounding_iou",
    "grounding_point",
    "language_consistency",
    "math_numeric",
    "ocr",
    "register_reward",
    "repetition_penalty",
    "score",
]
