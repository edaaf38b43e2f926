"""``perception_attr``: name the colour or shape of one object ("What colour is the largest shape?").

Level 1 shows a single object; level 2 asks about the largest of 2-3 objects; level 3 about the
largest/smallest of 3-4 objects or the one picked out by its unique shape or colour. Sides grow by
1.6x per rank so "largest" agrees with area whatever the shapes. From level 2 a third of the
questions are multiple choice (answer: the option letter, verifier ``choice``); otherwise the
answer is one word (verifier ``exact_match``).
"""

from __future__ import annotations

import random

from step3vl.data import render
from step3vl.data.families import Sample, register_family, think, user

# At 64 px; each rank ~1.6x the previous, so even a triangle (half its box) outweighs the square
# one rank below it: "largest" means the same by side, by box and by pixel area.
SIDE_LADDER = (7, 11, 18, 29)
LETTERS = "ABCD"


@register_family("perception_attr", kind="verifiable", modality="image", reward="exact_match")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Name the colour or shape of the single, largest, smallest or uniquely described object."""
    palette = render.COLOURS_BY_DIFFICULTY[difficulty]
    n = 1 if difficulty == 1 else rng.randint(2, 3) if difficulty == 2 else rng.randint(3, 4)
    colours = rng.sample(palette, n)  # distinct colours: "the blue object" is unique
    target = 0
    if n == 1:
        sides = [rng.randint(render.px(22, size), render.px(40, size))]
        shapes = [rng.choice(render.SHAPES)]
        selector = "single"
    else:
        ranks = sorted(rng.sample(range(len(SIDE_LADDER)), n))
        sides = [render.px(SIDE_LADDER[r], size) for r in ranks]
        shapes = [rng.choice(render.SHAPES) for _ in range(n)]
        selector = "largest" if difficulty == 2 else rng.choice(["largest", "smallest", "by_shape", "by_colour"])
        target = 0 if selector == "smallest" else n - 1
        if selector == "by_shape":
            target = rng.randrange(n)
            others = [s for s in render.SHAPES if s != shapes[target]]
            shapes = [s if i == target else rng.choice(others) for i, s in enumerate(shapes)]
        elif selector == "by_colour":
            target = rng.randrange(n)
    order = list(range(n))
    rng.shuffle(order)  # placement order, so the largest is not always placed first
    boxes_in_order = render.free_boxes(rng, [sides[i] for i in order], size, gap=3)
    boxes = [None] * n
    for i, b in zip(order, boxes_in_order, strict=True):
        boxes[i] = b
    img, objs = render.draw_scene(list(zip(shapes, colours, strict=True)), boxes, size)
    t = objs[target]

    attr = rng.choice(["colour", "shape"])
    if selector == "by_shape":
        attr = "colour"
    elif selector == "by_colour":
        attr = "shape"
    answer_word = t.colour if attr == "colour" else t.shape
    if selector == "single":
        q = "What colour is the shape?" if attr == "colour" else "What shape is it?"
        trace = f"a {t.name}"
    elif selector in ("largest", "smallest"):
        q = f"What colour is the {selector} shape?" if attr == "colour" else f"What shape is the {selector} object?"
        trace = f"{selector}: {t.name}"
    elif selector == "by_shape":
        q = f"What colour is the {t.shape}?"
        trace = f"the {t.shape} is {t.colour}"
    else:
        q = f"What shape is the {t.colour} object?"
        trace = f"the {t.colour} object is a {t.shape}"

    reward = None
    answer = answer_word
    meta = {"objects": [o.to_dict() for o in objs], "target": target, "selector": selector, "attribute": attr}
    if difficulty > 1 and rng.random() < 1 / 3:
        pool = list(palette) if attr == "colour" else list(render.SHAPES)
        wrong = rng.sample([w for w in pool if w != answer_word], min(2, len(pool) - 1))
        options = [answer_word, *wrong]
        rng.shuffle(options)
        answer = LETTERS[options.index(answer_word)]
        q += "\n" + " ".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        trace += f", so {answer}"
        reward = "choice"
        meta["options"] = {LETTERS[i]: o for i, o in enumerate(options)}
    return Sample(
        prompt=[user(q, 1)], target=think(trace, answer), images=[img], answer=answer, reward=reward, meta=meta
    )
