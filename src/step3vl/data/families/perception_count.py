"""``perception_count``: count the shapes of a given colour and/or shape ("How many red circles?").

Difficulty grows by object count, number and confusability of distractors, smaller shapes and a
bigger palette; level 3 includes zero counts. Answer: the integer; verifier ``count``.
"""

from __future__ import annotations

import random

from step3vl.data import render
from step3vl.data.families import Sample, register_family, think, user

# grid: layout cells per side; side: shape side range at 64 px; count/distract: inclusive ranges.
LEVELS = {
    1: {"grid": 3, "side": (13, 17), "count": (1, 4), "distract": (0, 1)},
    2: {"grid": 4, "side": (9, 12), "count": (1, 6), "distract": (1, 4)},
    3: {"grid": 5, "side": (7, 10), "count": (0, 9), "distract": (2, 8)},
}


def count_trace(k: int) -> str:
    """Counting aloud: ``1 2 3`` (``none`` for zero)."""
    return " ".join(str(i) for i in range(1, k + 1)) if k else "none"


def query_specs(
    rng: random.Random, difficulty: int, k: int, n_distract: int
) -> tuple[str, list[tuple[str, str]], str, str | None, str | None]:
    """A count query and the scene's (shape, colour) specs: ``k`` matches plus distractors.

    Returns ``(noun phrase, specs, mode, colour, shape)`` where mode is ``both``, ``colour`` or
    ``shape`` (what the question names).
    """
    colours = render.COLOURS_BY_DIFFICULTY[difficulty]
    mode = "both" if difficulty == 1 else rng.choice(["both", "both", "colour", "shape"])
    colour, shape = rng.choice(colours), rng.choice(render.SHAPES)

    def matches(s: str, c: str) -> bool:
        return (mode == "shape" or c == colour) and (mode == "colour" or s == shape)

    specs = []
    for _ in range(k):
        s = shape if mode != "colour" else rng.choice(render.SHAPES)
        c = colour if mode != "shape" else rng.choice(colours)
        specs.append((s, c))
    for _ in range(n_distract):
        while True:
            # From level 2 on, distractors share the colour or the shape half of the time.
            if difficulty > 1 and mode == "both" and rng.random() < 0.5:
                s, c = (shape, rng.choice(colours)) if rng.random() < 0.5 else (rng.choice(render.SHAPES), colour)
            else:
                s, c = rng.choice(render.SHAPES), rng.choice(colours)
            if not matches(s, c):
                break
        specs.append((s, c))
    if mode == "both":
        noun = f"{colour} {render.PLURAL[shape]}"
    elif mode == "colour":
        noun = f"{colour} shapes"
    else:
        noun = render.PLURAL[shape]
    return noun, specs, mode, colour if mode != "shape" else None, shape if mode != "colour" else None


@register_family("perception_count", kind="verifiable", modality="image", reward="count")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Count shapes of a named colour/shape among distractors."""
    cfg = LEVELS[difficulty]
    k = rng.randint(*cfg["count"])
    n_distract = rng.randint(*cfg["distract"])
    noun, specs, mode, colour, shape = query_specs(rng, difficulty, k, n_distract)
    boxes = render.grid_boxes(
        rng, len(specs), cfg["grid"], size, render.px(cfg["side"][0], size), render.px(cfg["side"][1], size)
    )
    img, objs = render.draw_scene(specs, boxes, size)
    q = f"How many {noun}?" if difficulty == 1 or rng.random() < 0.5 else f"Count the {noun}."
    return Sample(
        prompt=[user(q, 1)],
        target=think(count_trace(k), str(k)),
        images=[img],
        answer=str(k),
        meta={"objects": [o.to_dict() for o in objs], "query": {"colour": colour, "shape": shape}},
    )
