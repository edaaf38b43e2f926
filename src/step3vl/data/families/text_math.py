"""``text_math``: arithmetic in text, one to three steps.

Level 1: two-digit addition ("What is 37 + 45?", in one of a few phrasings). Level 2:
``a + b - c`` or ``a - b + c`` with two-digit numbers and a non-negative result. Level 3: word
problems with 2-3 steps including a multiplication. The trace writes each step as ``x op y = z``.
Verifier ``math_numeric``.
"""

from __future__ import annotations

import random

from step3vl.data.families import Sample, register_family, think, user

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva")
ITEMS = ("pens", "apples", "cards", "stones", "books", "eggs", "coins", "shells")
ADD_QUESTIONS = (
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "{a} + {b} = ?",
    "What is the sum of {a} and {b}?",
)


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    """A 2-3 step word problem: (question, trace, answer)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(4, 19)
    ab = a * b
    kind = rng.randrange(4)
    if kind == 0:
        c = rng.randint(1, ab - 1)
        q = f"{name} has {a} bags of {b} {item} and gives away {c}. How many {item} are left?"
        return q, f"{a} * {b} = {ab}, {ab} - {c} = {ab - c}", ab - c
    if kind == 1:
        c = rng.randint(1, 20)
        q = f"A box holds {b} {item}. How many {item} are in {a} boxes and {c} more?"
        return q, f"{a} * {b} = {ab}, {ab} + {c} = {ab + c}", ab + c
    if kind == 2:
        c = ab + rng.randint(1, 30)
        q = f"{name} buys {a} {item} at {b} coins each and pays {c} coins. What is the change?"
        return q, f"{a} * {b} = {ab}, {c} - {ab} = {c - ab}", c - ab
    s = rng.randint(5, 30)
    d = rng.randint(1, s + ab - 1)
    q = f"{name} has {s} {item}, buys {a} packs of {b}, then gives away {d}. How many now?"
    return q, f"{a} * {b} = {ab}, {s} + {ab} = {s + ab}, {s + ab} - {d} = {s + ab - d}", s + ab - d


@register_family("text_math", kind="verifiable", modality="text", reward="math_numeric")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Solve a text arithmetic problem."""
    if difficulty == 1:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        q = rng.choice(ADD_QUESTIONS).format(a=a, b=b)
        trace, ans = f"{a} + {b} = {a + b}", a + b
    elif difficulty == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            c = rng.randint(10, min(99, a + b))
            q, trace, ans = f"What is {a} + {b} - {c}?", f"{a} + {b} = {a + b}, {a + b} - {c} = {a + b - c}", a + b - c
        else:
            a, b = max(a, b), min(a, b)
            c = rng.randint(10, 99)
            q, trace, ans = f"What is {a} - {b} + {c}?", f"{a} - {b} = {a - b}, {a - b} + {c} = {a - b + c}", a - b + c
    else:
        q, trace, ans = word_problem(rng)
    return Sample(prompt=[user(q)], target=think(trace, str(ans)), answer=str(ans), meta={"steps": trace.count("=")})
