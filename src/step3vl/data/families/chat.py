"""``chat``: text-only instruction following with exact answers ("Reverse the letters of 'cat'.").

Instructions: repeat a word, count from a to b, reverse, spell, upper-case, count letters, first
letter, next number, the bigger number, one-word colour facts. Level 1 uses short words and small
ranges; level 2 longer ones; level 3 longer still and adds two-step instructions and a system
message that constrains the form ("Answer in capital letters."). Verifier ``exact_match``.
"""

from __future__ import annotations

import random

from step3vl.data.families import Sample, register_family, user

WORDS = {
    1: ("cat", "dog", "sun", "box", "red", "cup", "hat", "pen", "map", "bus"),
    2: ("tree", "bird", "fish", "book", "star", "moon", "lamp", "door", "apple", "green"),
    3: ("house", "water", "table", "river", "circle", "square", "yellow", "garden", "planet", "window"),
}
FACTS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a lemon": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "milk": "white",
    "a leaf": "green",
}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _word(rng: random.Random, difficulty: int) -> str:
    return rng.choice(WORDS[rng.randint(1, difficulty)])


def instruction(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """One instruction: (kind, prompt, answer)."""
    kind = rng.choice(
        ["repeat", "range", "reverse", "spell", "upper", "length", "first", "next", "bigger", "fact"]
        + (["reverse_upper", "range_down"] if difficulty == 3 else [])
    )
    w = _word(rng, difficulty)
    top = {1: 9, 2: 30, 3: 99}[difficulty]
    if kind == "repeat":
        k = rng.randint(2, 2 + difficulty)
        return kind, f"Repeat the word {w} {NUMBER_WORDS[k]} times.", " ".join([w] * k)
    if kind == "range":
        a = rng.randint(0, top)
        b = a + rng.randint(2, 2 + 2 * difficulty)
        return kind, f"Write the numbers from {a} to {b}.", " ".join(str(i) for i in range(a, b + 1))
    if kind == "range_down":
        b = rng.randint(0, top)
        a = b + rng.randint(2, 6)
        return kind, f"Count down from {a} to {b}.", " ".join(str(i) for i in range(a, b - 1, -1))
    if kind == "reverse":
        return kind, f"Reverse the letters of '{w}'.", w[::-1]
    if kind == "reverse_upper":
        return kind, f"Reverse '{w}' and write it in capital letters.", w[::-1].upper()
    if kind == "spell":
        return kind, f"Spell '{w}' with spaces between the letters.", " ".join(w)
    if kind == "upper":
        return kind, f"Write '{w}' in capital letters.", w.upper()
    if kind == "length":
        return kind, f"How many letters are in '{w}'?", str(len(w))
    if kind == "first":
        return kind, f"What is the first letter of '{w}'?", w[0]
    if kind == "next":
        a = rng.randint(0, top)
        return kind, f"What number comes after {a}?", str(a + 1)
    if kind == "bigger":
        a, b = rng.sample(range(top + 1), 2)
        return kind, f"Which is bigger, {a} or {b}?", str(max(a, b))
    thing = rng.choice(sorted(FACTS))
    return kind, f"Answer in one word: what colour is {thing}?", FACTS[thing]


@register_family("chat", kind="verifiable", modality="text", reward="exact_match")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Follow a short instruction whose answer is checkable exactly."""
    kind, q, ans = instruction(rng, difficulty)
    prompt = [user(q)]
    if difficulty == 3 and rng.random() < 0.25 and any(c.isalpha() for c in ans):
        prompt.insert(0, {"role": "system", "content": "Answer in capital letters."})
        ans = ans.upper()
        kind += "+caps"
    return Sample(prompt=prompt, target=ans, answer=ans, meta={"instruction": kind})
