"""``preference``: (prompt, chosen, rejected) pairs for training the reward model.

The prompt comes from one of the verifiable families at the same difficulty; ``chosen`` is that
family's correct, well-formatted target. ``rejected`` is one of:

- ``wrong``: same format, wrong answer (level 3 picks near misses, e.g. off by one);
- ``repetitive``: a degenerate loop (the answer or the first reasoning step repeated);
- ``format``: the right answer in the wrong form (prose instead of the answer format, or a
  reasoning block with no final answer);
- ``unanswerable``: a question the input cannot answer, or a count of an absent colour, where
  ``chosen`` says so ("I cannot tell from the image." / 0) and ``rejected`` answers confidently.

Records hold the prompt only in ``messages``; ``answer`` is the chosen answer. No verifier.
"""

from __future__ import annotations

import random
import re

from step3vl.data import render
from step3vl.data.families import THINK_END, THINK_START, Sample, register_family, sample, think, user
from step3vl.data.families.chat import PREFIXES, SUFFIXES
from step3vl.data.families.perception_count import count_trace

SOURCES = ("perception_count", "perception_attr", "ocr", "grounding", "chart", "text_math", "mm_math", "chat")
KINDS = ("wrong", "repetitive", "format", "unanswerable")
CANNOT_IMAGE = "I cannot tell from the image."
CANNOT_TEXT = "I cannot tell."
# (question about an object, confident made-up answer)
IMAGE_UNANSWERABLE = (
    ("What is the name of the {obj}?", "Its name is Tom."),
    ("How heavy is the {obj}?", "It weighs 5 kg."),
    ("Who drew the {obj}?", "Ann drew it."),
    ("What is the {obj} made of?", "It is made of wood."),
    ("What time is it in the image?", "It is 3 o'clock."),
)
# Text questions only the asker can answer, built from parts: (template, {field: options}, made-up answers).
PEOPLE = ("mother", "father", "sister", "brother", "friend", "teacher", "neighbour", "cousin", "uncle", "aunt")
TEXT_UNANSWERABLE: tuple[tuple[str, dict[str, tuple[str, ...]], tuple[str, ...]], ...] = (
    ("What number am I thinking of?", {}, ("7", "3", "42")),
    ("What {thing} am I thinking of?", {"thing": ("colour", "animal", "word", "letter", "city", "fruit")},
     ("blue", "a cat", "apple", "B", "Paris")),
    ("What is my {who}'s favourite {thing}?",
     {"who": PEOPLE, "thing": ("colour", "number", "food", "animal", "song", "game", "fruit", "sport")},
     ("blue", "7", "pizza", "a dog", "chess", "football")),
    ("How old is my {who}?", {"who": PEOPLE}, ("42", "35 years old", "60")),
    ("How many {items} are in my {place}?",
     {"items": ("pens", "coins", "apples", "books", "keys", "cards", "shells", "stones", "socks", "cups"),
      "place": ("bag", "pocket", "box", "drawer", "desk", "car", "room", "basket", "fridge", "cupboard")},
     ("4", "7", "12", "2")),
    ("What did I {verb} {when}?",
     {"verb": ("eat", "drink", "buy", "read", "watch", "see", "lose", "cook"),
      "when": ("today", "yesterday", "this morning", "last night", "last week", "on Monday", "on Sunday")},
     ("an apple", "tea", "a new pen", "a book", "a film", "soup")),
    ("What is the name of my {pet}?", {"pet": ("dog", "cat", "fish", "bird", "rabbit", "horse", "hamster")},
     ("Max.", "Its name is Tom.", "Bella.")),
    ("Where did I put my {thing}?", {"thing": ("keys", "phone", "glasses", "book", "pen", "hat", "wallet", "bag")},
     ("On the table.", "In the kitchen.", "Under the bed.")),
    ("What is my {who}'s name?", {"who": PEOPLE}, ("Ann.", "Tom.", "Her name is Mia.")),
)  # fmt: skip


def text_unanswerable(rng: random.Random) -> tuple[str, str]:
    """A text question only the asker could answer, in a random phrasing, and a confident made-up answer."""
    template, fields, confident = rng.choice(TEXT_UNANSWERABLE)
    q = template.format(**{k: rng.choice(v) for k, v in fields.items()})
    return rng.choice(PREFIXES) + q + rng.choice(SUFFIXES), rng.choice(confident)


_BOX = re.compile(r"^\[(\d+),(\d+),(\d+),(\d+)\]$")
_INT = re.compile(r"^-?\d+$")


def corrupt(answer: str, rng: random.Random, difficulty: int, size: int = 64) -> str:
    """A plausible wrong answer of the same type as ``answer`` (never equal to it)."""
    if m := _BOX.match(answer):
        x1, y1, x2, y2 = (int(v) for v in m.groups())
        w, h = x2 - x1, y2 - y1
        while True:
            dx = rng.choice([-1, 1]) * rng.randint(max(2, w // 2), max(3, w))
            dy = rng.choice([-1, 1]) * rng.randint(0, max(1, h))
            nx1, ny1 = min(max(0, x1 + dx), size - w), min(max(0, y1 + dy), size - h)
            if (nx1, ny1) != (x1, y1):
                return f"[{nx1},{ny1},{nx1 + w},{ny1 + h}]"
    if _INT.match(answer):
        v = int(answer)
        spread = 2 if difficulty == 3 else 10
        cands = [v + d for d in range(-spread, spread + 1) if d and v + d >= 0]
        return str(rng.choice(cands))
    for pool in (tuple(render.PALETTE), render.SHAPES, ("A", "B", "C")):
        if answer in pool:
            return rng.choice([p for p in pool if p != answer])
    if " " in answer:
        toks = answer.split(" ")
        return " ".join(toks[:-1]) if len(toks) > 2 and rng.random() < 0.5 else " ".join([*toks, toks[-1]])
    i = rng.randrange(len(answer))
    ch = answer[i]
    pool = "0123456789" if ch.isdigit() else "abcdefghijklmnopqrstuvwxyz" if ch.islower() else render.OCR_LETTERS
    new = rng.choice([p for p in pool if p != ch])
    return answer[:i] + new + answer[i + 1 :]


def _split(target: str) -> tuple[str | None, str]:
    """(reasoning trace or None, final answer) of a target."""
    if THINK_END not in target:
        return None, target
    trace, ans = target.rsplit(THINK_END, 1)
    return trace.removeprefix(THINK_START), ans


def rejected_for(kind: str, target: str, answer: str, rng: random.Random, difficulty: int, size: int) -> str:
    """A bad response of ``kind`` (``wrong``, ``repetitive`` or ``format``) to a prompt whose good one is ``target``."""
    trace, _ = _split(target)
    if kind == "wrong":
        wrong = corrupt(answer, rng, difficulty, size)
        if trace is None:
            return wrong
        head, sep, tail = trace.rpartition(answer)
        return think(head + wrong + tail if sep else trace, wrong)
    if kind == "repetitive":
        if trace is not None and rng.random() < 0.5:
            step = trace.split(", ")[0]
            return THINK_START + " ".join([step] * 4)
        return " ".join([answer] * rng.randint(4, 8))
    if kind == "format":
        if trace is not None and rng.random() < 0.5:
            return think(trace, "")
        return f"The answer is {answer}, I think."
    raise ValueError(f"unknown rejection kind {kind!r}")


def _unanswerable(rng: random.Random, difficulty: int, size: int) -> tuple[Sample, str]:
    which = rng.randrange(3)
    if which == 0:  # count of a colour that is absent: the right answer is 0, not a guess
        while True:
            src = sample("perception_count", rng, difficulty, size)
            present = {o["colour"] for o in src.meta["objects"]}
            absent = [c for c in render.COLOURS_BY_DIFFICULTY[difficulty] if c not in present]
            if absent:
                break
        colour, shape = rng.choice(absent), rng.choice(render.SHAPES)
        noun = f"{colour} {render.PLURAL[shape]}"
        k = rng.randint(1, 4)
        s = Sample(
            prompt=[user(f"How many {noun}?", 1)],
            target=None,
            images=src.images,
            answer="0",
            chosen=think(count_trace(0), "0"),
            rejected=think(count_trace(k), str(k)),
            meta={"source": "perception_count", "objects": src.meta["objects"]},
        )
        return s, "absent_count"
    if which == 1:  # the image cannot answer it
        src = sample("perception_attr", rng, difficulty, size)
        obj = src.meta["objects"][src.meta["target"]]
        q, confident = rng.choice(IMAGE_UNANSWERABLE)
        s = Sample(
            prompt=[user(q.format(obj=f"{obj['colour']} {obj['shape']}"), 1)],
            target=None,
            images=src.images,
            answer=CANNOT_IMAGE,
            chosen=CANNOT_IMAGE,
            rejected=confident,
            meta={"source": "perception_attr", "objects": src.meta["objects"]},
        )
        return s, "image_unanswerable"
    q, confident = text_unanswerable(rng)
    s = Sample(
        prompt=[user(q)],
        target=None,
        answer=CANNOT_TEXT,
        chosen=CANNOT_TEXT,
        rejected=confident,
        meta={"source": "chat"},
    )
    return s, "text_unanswerable"


@register_family("preference", kind="preference", modality="mixed")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """A prompt with a chosen (correct, well-formed) and a rejected response."""
    kind = rng.choice(KINDS)
    if kind == "unanswerable":
        s, detail = _unanswerable(rng, difficulty, size)
        s.meta.update(rejected_kind=kind, detail=detail)
        return s
    source = rng.choice(SOURCES)
    src = sample(source, rng, difficulty, size)
    assert src.target is not None and src.answer is not None
    rejected = rejected_for(kind, src.target, src.answer, rng, difficulty, size)
    if source == "perception_count" and kind == "wrong":  # keep the counting trace consistent
        wrong = rejected.rsplit(THINK_END, 1)[-1]
        rejected = think(count_trace(int(wrong)), wrong)
    return Sample(
        prompt=src.prompt,
        target=None,
        images=src.images,
        answer=src.answer,
        chosen=src.target,
        rejected=rejected,
        meta={"source": source, "rejected_kind": kind, "source_meta": src.meta},
    )
