"""``grounding``: the bounding box of a named object among 1-3 objects.

The answer is ``[x1,y1,x2,y2]`` in pixels of the image, measured from the drawn pixels, with x2/y2
exclusive (so the box of a 10-pixel-wide square at x=5 is ``[5,..,15,..]``). Every object has a
distinct (colour, shape) pair so the name is unambiguous; from level 2, distractors share the
target's colour or shape. Verifier ``grounding_iou``.
"""

from __future__ import annotations

import random

from step3vl.data import render
from step3vl.data.families import Sample, register_family, user

LEVELS = {1: {"n": (1, 1), "side": (18, 30)}, 2: {"n": (2, 2), "side": (12, 22)}, 3: {"n": (3, 3), "side": (8, 18)}}


def format_box(box: tuple[int, int, int, int] | list[int]) -> str:
    """``[x1,y1,x2,y2]`` without spaces."""
    return "[" + ",".join(str(int(v)) for v in box) + "]"


@register_family("grounding", kind="verifiable", modality="image", reward="grounding_iou")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Give the pixel box of the named object."""
    cfg = LEVELS[difficulty]
    n = rng.randint(*cfg["n"])
    colours = render.COLOURS_BY_DIFFICULTY[difficulty]
    specs = [(rng.choice(render.SHAPES), rng.choice(colours))]
    while len(specs) < n:
        shape, colour = specs[0]
        if rng.random() < 0.5:  # share one attribute with the target: the name must be read in full
            cand = (shape, rng.choice(colours)) if rng.random() < 0.5 else (rng.choice(render.SHAPES), colour)
        else:
            cand = (rng.choice(render.SHAPES), rng.choice(colours))
        if cand not in specs:
            specs.append(cand)
    rng.shuffle(specs)
    target = rng.randrange(n)
    sides = [rng.randint(render.px(cfg["side"][0], size), render.px(cfg["side"][1], size)) for _ in specs]
    boxes = render.free_boxes(rng, sides, size, gap=2)
    img, objs = render.draw_scene(specs, boxes, size)
    t = objs[target]
    answer = format_box(t.box)
    q = f"Find the {t.name}. Answer [x1,y1,x2,y2]."
    return Sample(
        prompt=[user(q, 1)],
        target=answer,
        images=[img],
        answer=answer,
        meta={"objects": [o.to_dict() for o in objs], "target": target, "box_convention": "x2,y2 exclusive"},
    )
