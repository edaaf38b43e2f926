"""``chat``: text-only instruction following with exact answers ("Reverse the letters of 'cat'.").

Instructions: repeat a word, count from a to b, reverse, spell, upper-/lower-case, count letters,
first/last letter, next/previous number, double, the bigger/smaller number, opposites, legs of an
animal, one-word colour facts. Each kind has several phrasings, and a prompt may carry a short
lead-in ("Quick question: ") and/or sign-off ("Answer briefly."), so prompts vary as much as the
answers; answers stay short (at most ~8 tokens). Level 1 uses three-letter words and numbers up to
20; level 2 adds four/five-letter words and numbers up to 50; level 3 adds longer words, numbers up
to 99, two-step instructions and a system message that constrains the form ("Answer in capital
letters."). Verifier ``exact_match``.
"""

from __future__ import annotations

import random

from step3vl.data.families import Sample, register_family, user

WORDS = {
    1: tuple(
        "cat dog sun box red cup hat pen map bus bed egg fox pig cow hen ant bee owl bat car jam pan pot fan "
        "net log toy key bag cap fig nut pea rug van web jar ink ice arm leg lip ear eye toe hut mop tub dot "
        "gem lid sky sea day top hot big run sit win".split()
    ),
    2: tuple(
        "tree bird fish book star moon lamp door apple green frog milk cake ship rain snow leaf rock sand wind "
        "fire ball kite desk coat shoe sock hand foot nose bell drum king ring lion bear duck goat wolf corn "
        "rice salt soup note song game blue pink gold city park road farm lake hill".split()
    ),
    3: tuple(
        "house water table river circle square yellow garden planet window orange purple pencil basket "
        "bridge castle dragon forest guitar island jacket kitten ladder market monkey number office pepper "
        "rabbit silver spider ticket turtle violin winter candle carrot cookie doctor flower hammer letter "
        "mirror parrot pocket rocket shadow summer sunset tomato wallet".split()
    ),
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
    "a carrot": "orange",
    "a pumpkin": "orange",
    "a strawberry": "red",
    "a cherry": "red",
    "blood": "red",
    "a fire truck": "red",
    "a frog": "green",
    "a lime": "green",
    "a pea": "green",
    "lettuce": "green",
    "a crow": "black",
    "a raven": "black",
    "tar": "black",
    "salt": "white",
    "a polar bear": "white",
    "chocolate": "brown",
    "mud": "brown",
    "cocoa": "brown",
    "an eggplant": "purple",
    "a plum": "purple",
    "a flamingo": "pink",
    "the sea": "blue",
    "a sapphire": "blue",
    "a canary": "yellow",
    "a sunflower": "yellow",
    "an egg yolk": "yellow",
    "a ruby": "red",
    "an emerald": "green",
}
LEGS = {
    "dog": 4, "cat": 4, "cow": 4, "horse": 4, "pig": 4, "sheep": 4, "goat": 4, "mouse": 4, "lion": 4,
    "bird": 2, "duck": 2, "hen": 2, "owl": 2, "spider": 8, "ant": 6, "bee": 6, "beetle": 6, "fly": 6,
}  # fmt: skip
_PAIRS = (
    ("hot", "cold"), ("up", "down"), ("yes", "no"), ("day", "night"), ("fast", "slow"), ("wet", "dry"),
    ("full", "empty"), ("in", "out"), ("on", "off"), ("top", "bottom"), ("first", "last"),
    ("early", "late"), ("happy", "sad"), ("push", "pull"), ("buy", "sell"), ("true", "false"), ("win", "lose"),
    ("north", "south"), ("east", "west"), ("inside", "outside"), ("above", "below"), ("before", "after"),
)  # fmt: skip
OPPOSITES = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
TOP = {1: 20, 2: 50, 3: 99}  # largest number in a prompt

# Phrasings per instruction kind. Fields: {w} word, {W} word in capitals, {k} count in words,
# {a} {b} numbers (a before b: the range checks read them in that order), {t} thing, {x} animal.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "repeat": (
        "Repeat the word {w} {k} times.",
        "Say {w} {k} times.",
        "Write {w} {k} times.",
        "Write the word {w} {k} times, with spaces.",
        "Type {w} {k} times.",
        "Echo the word {w} {k} times.",
    ),
    "range": (
        "Write the numbers from {a} to {b}.",
        "Count from {a} to {b}.",
        "List the numbers from {a} to {b}.",
        "Count up from {a} to {b}.",
        "Write every number from {a} to {b}.",
        "Give the whole numbers from {a} to {b} in order.",
    ),
    "range_down": (
        "Count down from {a} to {b}.",
        "Write the numbers from {a} down to {b}.",
        "List the numbers from {a} down to {b}.",
        "Count backwards from {a} to {b}.",
    ),
    "reverse": (
        "Reverse the letters of '{w}'.",
        "Write '{w}' backwards.",
        "What is '{w}' reversed?",
        "Write the letters of '{w}' in reverse order.",
        "Reverse the word '{w}'.",
    ),
    "reverse_upper": (
        "Reverse '{w}' and write it in capital letters.",
        "Write '{w}' backwards in capital letters.",
        "Reverse the word '{w}', then make it upper case.",
    ),
    "spell": (
        "Spell '{w}' with spaces between the letters.",
        "Write the letters of '{w}' separated by spaces.",
        "Spell out '{w}' letter by letter, with spaces.",
        "Put a space between each letter of '{w}'.",
    ),
    "upper": (
        "Write '{w}' in capital letters.",
        "Write '{w}' in upper case.",
        "Capitalise every letter of '{w}'.",
        "Convert '{w}' to upper case.",
        "Make '{w}' all capitals.",
    ),
    "lower": (
        "Write '{W}' in small letters.",
        "Write '{W}' in lower case.",
        "Convert '{W}' to lower case.",
    ),
    "length": (
        "How many letters are in '{w}'?",
        "How many letters does '{w}' have?",
        "Count the letters in '{w}'.",
        "What is the length of the word '{w}'?",
    ),
    "first": (
        "What is the first letter of '{w}'?",
        "Which letter does '{w}' start with?",
        "Give the first letter of '{w}'.",
        "Which letter begins the word '{w}'?",
    ),
    "last": (
        "What is the last letter of '{w}'?",
        "Which letter does '{w}' end with?",
        "Give the final letter of '{w}'.",
    ),
    "next": (
        "What number comes after {a}?",
        "What comes after {a}?",
        "Which number follows {a}?",
        "What is {a} plus one?",
        "Add one to {a}.",
        "What is one more than {a}?",
        "Name the number after {a}.",
    ),
    "previous": (
        "What number comes before {a}?",
        "What is {a} minus one?",
        "What is one less than {a}?",
        "Which number is just before {a}?",
        "Take one away from {a}.",
    ),
    "double": (
        "What is double {a}?",
        "What is twice {a}?",
        "Double the number {a}.",
        "What is {a} times two?",
    ),
    "bigger": (
        "Which is bigger, {a} or {b}?",
        "Which is larger: {a} or {b}?",
        "What is the larger of {a} and {b}?",
        "Pick the bigger number: {a}, {b}.",
        "Which number is greater, {a} or {b}?",
    ),
    "smaller": (
        "Which is smaller, {a} or {b}?",
        "What is the smaller of {a} and {b}?",
        "Pick the smaller number: {a}, {b}.",
        "Which number is less, {a} or {b}?",
    ),
    "opposite": (
        "What is the opposite of {w}?",
        "Give the opposite of the word {w}.",
        "One word: the opposite of {w}?",
    ),
    "legs": (
        "How many legs does a {x} have?",
        "A {x} has how many legs?",
        "Count the legs of a {x}.",
    ),
    "fact": (
        "Answer in one word: what colour is {t}?",
        "What colour is {t}? One word.",
        "In one word, what colour is {t}?",
        "Name the colour of {t} in one word.",
    ),
}
# Optional lead-ins and sign-offs around any instruction (no digits and no quotes in them).
PREFIXES = ("", "", "", "Quick question: ", "Task: ", "Hi! ", "Easy one: ", "Question: ", "Try this: ", "Hello. ")
SUFFIXES = (
    "",
    "",
    "",
    " Answer briefly.",
    " Reply with just the answer.",
    " Be brief.",
    " Keep it short.",
    " No explanation needed.",
    " Give only the answer.",
    " Thanks!",
)
CAPS_SYSTEM = (
    "Answer in capital letters.",
    "Reply in capital letters only.",
    "Write your answer in upper case.",
    "Use only capital letters.",
)
KINDS = tuple(k for k in TEMPLATES if k not in ("reverse_upper", "range_down"))


def _word(rng: random.Random, difficulty: int) -> str:
    return rng.choice(WORDS[rng.randint(1, difficulty)])


def instruction(rng: random.Random, difficulty: int) -> tuple[str, str, str]:
    """One instruction: (kind, prompt, answer)."""
    kind = rng.choice(KINDS + (("reverse_upper", "range_down") if difficulty == 3 else ()))
    w = _word(rng, difficulty)
    top = TOP[difficulty]
    f: dict[str, object] = {"w": w}
    if kind == "repeat":
        k = rng.randint(2, 2 + difficulty)
        f["k"] = NUMBER_WORDS[k]
        ans = " ".join([w] * k)
    elif kind == "range":
        a = rng.randint(0, top)
        b = a + rng.randint(2, 2 + 2 * difficulty)
        f.update(a=a, b=b)
        ans = " ".join(str(i) for i in range(a, b + 1))
    elif kind == "range_down":
        b = rng.randint(0, top)
        a = b + rng.randint(2, 6)
        f.update(a=a, b=b)
        ans = " ".join(str(i) for i in range(a, b - 1, -1))
    elif kind == "reverse":
        ans = w[::-1]
    elif kind == "reverse_upper":
        ans = w[::-1].upper()
    elif kind == "spell":
        ans = " ".join(w)
    elif kind == "upper":
        ans = w.upper()
    elif kind == "lower":
        f["W"] = w.upper()
        ans = w
    elif kind == "length":
        ans = str(len(w))
    elif kind == "first":
        ans = w[0]
    elif kind == "last":
        ans = w[-1]
    elif kind in ("next", "previous", "double"):
        a = rng.randint(1, top)
        f["a"] = a
        ans = str(a + 1 if kind == "next" else a - 1 if kind == "previous" else 2 * a)
    elif kind in ("bigger", "smaller"):
        a, b = rng.sample(range(top + 1), 2)
        f.update(a=a, b=b)
        ans = str(max(a, b) if kind == "bigger" else min(a, b))
    elif kind == "opposite":
        w = f["w"] = rng.choice(sorted(OPPOSITES))
        ans = OPPOSITES[w]
    elif kind == "legs":
        animal = f["x"] = rng.choice(sorted(LEGS))
        ans = str(LEGS[animal])
    else:
        thing = f["t"] = rng.choice(sorted(FACTS))
        ans = FACTS[thing]
    q = rng.choice(TEMPLATES[kind]).format(**f)
    return kind, rng.choice(PREFIXES) + q + rng.choice(SUFFIXES), ans


@register_family("chat", kind="verifiable", modality="text", reward="exact_match")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Follow a short instruction whose answer is checkable exactly."""
    kind, q, ans = instruction(rng, difficulty)
    prompt = [user(q)]
    if difficulty == 3 and rng.random() < 0.25 and any(c.isalpha() for c in ans):
        prompt.insert(0, {"role": "system", "content": rng.choice(CAPS_SYSTEM)})
        ans = ans.upper()
        kind += "+caps"
    return Sample(prompt=prompt, target=ans, answer=ans, meta={"instruction": kind})
