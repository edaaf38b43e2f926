"""``text``: plain-text pre-training passages about shapes, numbers and colours.

Sentences restate what the other families test (arithmetic facts, shape properties, colour facts,
counting, comparisons) so text-only pre-training gives the decoder the vocabulary and facts first;
each kind of sentence has several phrasings. Level 1 has one or two sentences and small numbers;
level 3 three to five, with multiplication. The record's only message is the assistant passage (the
whole passage is the training target); no answer.
"""

from __future__ import annotations

import random
import re

from step3vl.data import render
from step3vl.data.families import Sample, register_family
from step3vl.data.families.chat import FACTS

# True things to say about each shape.
SHAPE_FACTS = {
    "triangle": ("three sides", "three corners", "three straight sides"),
    "square": ("four sides", "four corners", "four equal sides"),
    "circle": ("no corners", "no straight sides", "one curved edge"),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RELATIONS = (
    "next to", "above", "below", "left of", "right of", "to the left of", "to the right of", "beside",
    "near", "under", "over",
)  # fmt: skip
# Phrasings per sentence kind; every one states the same true fact.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "scene": (
        "The {c1} {s1} is {rel} the {c2} {s2}.",
        "A {c1} {s1} is {rel} a {c2} {s2}.",
        "There is a {c1} {s1} {rel} the {c2} {s2}.",
    ),
    "add": (
        "{a} plus {b} is {r}.",
        "{a} + {b} = {r}.",
        "{a} and {b} make {r}.",
        "Adding {a} and {b} gives {r}.",
        "The sum of {a} and {b} is {r}.",
    ),
    "minus": (
        "{a} minus {b} is {r}.",
        "{a} - {b} = {r}.",
        "Taking {b} from {a} leaves {r}.",
        "The difference of {a} and {b} is {r}.",
    ),
    "times": (
        "{a} times {b} is {r}.",
        "{a} * {b} = {r}.",
        "{a} groups of {b} make {r}.",
        "The product of {a} and {b} is {r}.",
    ),
    "shape": (
        "A {s} has {f}.",
        "Every {s} has {f}.",
        "Each {s} has {f}.",
        "Any {s} has {f}.",
        "A {s} always has {f}.",
        "A {c} {s} has {f}.",
        "The {c} {s} has {f}.",
        "Every {c} {s} has {f}.",
        "This {c} {s} has {f}.",
        "A {c} {s} always has {f}.",
    ),
    "count": (
        "There are {k} {c} {p}.",
        "I can see {k} {c} {p}.",
        "The picture shows {k} {c} {p}.",
        "{K} {c} {p} are in the image.",
        "The image has {k} {c} {p}.",
        "We count {k} {c} {p}.",
    ),
    "after": (
        "{r} comes after {a}.",
        "After {a} comes {r}.",
        "The number after {a} is {r}.",
        "{a} is followed by {r}.",
        "{a} comes just before {r}.",
        "One more than {a} is {r}.",
        "The next number after {a} is {r}.",
        "Before {r} comes {a}.",
        "The number before {r} is {a}.",
        "{r} is one more than {a}.",
        "{a} is one less than {r}.",
        "Counting up, {a} is followed by {r}.",
    ),
    "compare": (
        "{a} is bigger than {b}.",
        "{b} is smaller than {a}.",
        "{a} is more than {b}.",
        "{b} is less than {a}.",
        "{a} is greater than {b}.",
        "{a} is larger than {b}.",
    ),
    "fact": (
        "{T} is {c}.",
        "The colour of {t} is {c}.",
        "{T} is {c} in colour.",
        "{T} is {c}, and {t2} is {c2}.",
        "{T} is {c} and {t2} is {c2}.",
    ),
}
_AN = re.compile(r"\b([Aa]) (?=[aeiou])")  # "a orange" -> "an orange"
# Kinds with few distinct sentences (shape facts, colour facts, "after") are drawn less often.
WEIGHTS = {"scene": 3, "add": 3, "minus": 2, "times": 2, "shape": 1, "count": 2, "after": 1, "compare": 2, "fact": 1}


def sentence(rng: random.Random, difficulty: int) -> str:
    """One true sentence."""
    kinds = [k for k in WEIGHTS if difficulty > 1 or k not in ("times", "minus")]
    kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
    hi = {1: 20, 2: 99, 3: 99}[difficulty]
    palette = render.COLOURS_BY_DIFFICULTY[difficulty]
    f: dict[str, object] = {}
    if kind == "scene":
        (c1, c2), (s1, s2) = rng.sample(palette, 2), (rng.choice(render.SHAPES), rng.choice(render.SHAPES))
        f.update(c1=c1, c2=c2, s1=s1, s2=s2, rel=rng.choice(RELATIONS))
    elif kind == "add":
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        f.update(a=a, b=b, r=a + b)
    elif kind == "minus":
        a, b = sorted((rng.randint(1, hi), rng.randint(1, hi)), reverse=True)
        f.update(a=a, b=b, r=a - b)
    elif kind == "times":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        f.update(a=a, b=b, r=a * b)
    elif kind == "shape":
        s = rng.choice(render.SHAPES)
        f.update(s=s, f=rng.choice(SHAPE_FACTS[s]), c=rng.choice(palette))
    elif kind == "count":
        k = rng.randint(2, 9)
        word = NUMBER_WORDS[k] if rng.random() < 0.5 else str(k)
        f.update(k=word, K=word.capitalize(), c=rng.choice(palette))
        f["p"] = render.PLURAL[rng.choice(render.SHAPES)]
    elif kind == "after":
        a = rng.randint(0, hi)
        f.update(a=a, r=a + 1)
    elif kind == "compare":
        a, b = sorted(rng.sample(range(hi + 1), 2), reverse=True)
        f.update(a=a, b=b)
    else:
        thing, other = rng.sample(sorted(FACTS), 2)
        f.update(t=thing, T=thing[0].upper() + thing[1:], c=FACTS[thing], t2=other, c2=FACTS[other])
    text = _AN.sub(r"\1n ", rng.choice(TEMPLATES[kind]).format(**f))
    return text[0].upper() + text[1:]


@register_family("text", kind="pretrain", modality="text")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """A short passage of true sentences about shapes, numbers and colours."""
    n = rng.randint(*{1: (1, 2), 2: (2, 3), 3: (3, 5)}[difficulty])
    passage = " ".join(sentence(rng, difficulty) for _ in range(n))
    return Sample(prompt=[], target=passage, meta={"sentences": n})
