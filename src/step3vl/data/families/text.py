"""``text``: plain-text pre-training passages about shapes, numbers and colours.

Sentences restate what the other families test (arithmetic facts, shape properties, colour facts,
counting) so text-only pre-training gives the decoder the vocabulary and facts first. Level 1 has
one or two sentences and small numbers; level 3 three to five, with multiplication. The record's
only message is the assistant passage (the whole passage is the training target); no answer.
"""

from __future__ import annotations

import random

from step3vl.data import render
from step3vl.data.families import Sample, register_family
from step3vl.data.families.chat import FACTS

SIDES = {"triangle": "three sides", "square": "four sides", "circle": "no corners"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = ("next to", "above", "below", "left of", "right of")


def sentence(rng: random.Random, difficulty: int) -> str:
    """One true sentence."""
    kinds = ["scene", "add", "shape", "count", "after", "fact"] + (["times", "minus"] if difficulty > 1 else [])
    kind = rng.choice(kinds)
    hi = {1: 20, 2: 99, 3: 99}[difficulty]
    palette = render.COLOURS_BY_DIFFICULTY[difficulty]
    if kind == "scene":
        (c1, c2), (s1, s2) = rng.sample(palette, 2), (rng.choice(render.SHAPES), rng.choice(render.SHAPES))
        return f"The {c1} {s1} is {rng.choice(RELATIONS)} the {c2} {s2}."
    if kind == "add":
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        return f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{a} + {b} = {a + b}."
    if kind == "minus":
        a, b = sorted((rng.randint(1, hi), rng.randint(1, hi)), reverse=True)
        return f"{a} minus {b} is {a - b}."
    if kind == "times":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        return f"{a} times {b} is {a * b}."
    if kind == "shape":
        s = rng.choice(render.SHAPES)
        return f"A {s} has {SIDES[s]}."
    if kind == "count":
        k = rng.randint(2, 9)
        return f"There are {NUMBER_WORDS[k]} {rng.choice(palette)} {render.PLURAL[rng.choice(render.SHAPES)]}."
    if kind == "after":
        a = rng.randint(0, hi)
        return f"{a + 1} comes after {a}."
    thing = rng.choice(sorted(FACTS))
    return f"{thing[0].upper()}{thing[1:]} is {FACTS[thing]}."


@register_family("text", kind="pretrain", modality="text")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """A short passage of true sentences about shapes, numbers and colours."""
    n = rng.randint(*{1: (1, 2), 2: (2, 3), 3: (3, 5)}[difficulty])
    passage = " ".join(sentence(rng, difficulty) for _ in range(n))
    return Sample(prompt=[], target=passage, meta={"sentences": n})
