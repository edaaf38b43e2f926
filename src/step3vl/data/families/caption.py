"""``caption``: image descriptions for pre-training ("A red circle and a blue square on a white background.").

Level 1: one object; level 2: two; level 3: three objects with their left-to-right positions.
A fifth of the images are text images instead ('The number 37 in black on a white background.'),
drawn like ``ocr`` images. No answer and no verifier: the caption is the training target.
"""

from __future__ import annotations

import random

from step3vl.data import render
from step3vl.data.families import Sample, register_family, user
from step3vl.data.families.ocr import random_text, render_text

SIDES = {1: (20, 34), 2: (14, 26), 3: (10, 20)}
PROMPTS = ("Describe the image.", "What is in the image?")
POSITIONS = {2: ("on the left", "on the right"), 3: ("on the left", "in the middle", "on the right")}


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@register_family("caption", kind="pretrain", modality="image")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Describe the objects (or the text) in the image in one sentence."""
    prompt = [user(rng.choice(PROMPTS), 1)]
    if rng.random() < 0.2:
        text = random_text(rng, difficulty)
        img, meta = render_text(rng, text, difficulty, size)
        what = f"The number {text}" if text.isdigit() else f'The text "{text}"'
        caption = f"{what} in {meta['colour']} on a {meta['background']} background."
        return Sample(prompt=prompt, target=caption, images=[img], meta=meta)
    n = difficulty
    palette = render.COLOURS_BY_DIFFICULTY[difficulty]
    specs: list[tuple[str, str]] = []
    while len(specs) < n:
        cand = (rng.choice(render.SHAPES), rng.choice(palette))
        if cand not in specs:
            specs.append(cand)
    background = "white" if difficulty == 1 else rng.choice(list(render.BACKGROUNDS))
    lo, hi = SIDES[difficulty]
    sides = [rng.randint(render.px(lo, size), render.px(hi, size)) for _ in specs]
    if n > 1:  # one object per vertical strip so "left/middle/right" is never ambiguous
        w = size // n
        boxes = [
            render.free_boxes(rng, [s], size, region=(i * w, 0, (i + 1) * w, size))[0] for i, s in enumerate(sides)
        ]
    else:
        boxes = render.free_boxes(rng, sides, size)
    img, objs = render.draw_scene(specs, boxes, size, background=background)
    names = [o.name for o in objs]
    if difficulty == 3:
        parts = [f"{_article(nm).lower()} {nm} {pos}" for nm, pos in zip(names, POSITIONS[3], strict=True)]
    else:
        parts = [f"{_article(nm).lower()} {nm}" for nm in names]
    sentence = _join(parts)
    caption = sentence[0].upper() + sentence[1:] + f" on a {background} background."
    return Sample(
        prompt=prompt,
        target=caption,
        images=[img],
        meta={"objects": [o.to_dict() for o in objs], "background": background},
    )
