"""``mm_math``: arithmetic over numbers read from the image.

Level 1: two single digits side by side, asked for their sum; the digits are in one near-black ink
(``render.INKS``) on a light paper (``render.PAPERS``), each shifted at random within its column
(up to 4 px up or down, and 0 or 2 px away from the other digit). Level 2: the same image, two
steps: a two-digit number given in the question plus, or minus, the digits' sum. Level 3: either
three digits, "multiply the first two and add the third", or a digit above a group of shapes, "the
number times the number of shapes". Verifier ``math_numeric``.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from step3vl.data import render
from step3vl.data.families import Sample, register_family, think, user

DIVIDER = (150, 150, 150)


def _columns(
    img: Image.Image, texts: list[str], inks: list[tuple[int, int, int]], size: int, rng: random.Random | None = None
) -> None:
    """Draw each text in its own vertical strip (so digits never read as one number).

    Centred, or with ``rng`` shifted at random: up to 4 px up or down, and sideways only outwards
    (the first text left, the last right) so the gap between texts never shrinks. Shifts are in
    whole steps of the global view's 2x downscale, so the texts keep the centred texts' alignment
    there.
    """
    m = render.px(2, size)
    w = (size - 2 * m) // len(texts)
    pad = max(m, w // 8)  # a clear gap between columns: "6 4" must not read as 64
    step = max(1, size // 32)
    for i, (t, ink) in enumerate(zip(texts, inks, strict=True)):
        x1, y1, x2, y2 = m + i * w + pad, m, m + (i + 1) * w - pad, size - m
        if rng is None:
            render.draw_centered_text(img, [t], ink, region=(x1, y1, x2, y2))
        else:
            scale = render.fit_scale([t], x2 - x1, y2 - y1)
            tw, th = render.text_extent([t], scale)
            outwards = -1 if i == 0 else 1 if i == len(texts) - 1 else 0
            x = x1 + (x2 - x1 - tw) // 2 + rng.choice((0, outwards)) * step
            y = y1 + (y2 - y1 - th) // 2 + rng.randint(-2, 2) * step
            x, y = min(max(x, x1), max(x1, x2 - tw)), min(max(y, y1), max(y1, y2 - th))
            render.draw_bitmap_text(img, (x, y), [t], scale, ink)
        if i > 0 and len(texts) > 2:  # narrow columns: a rule keeps "6 9 9" from reading as 699
            ImageDraw.Draw(img).rectangle((m + i * w - 1, 2 * m, m + i * w, size - 2 * m), fill=DIVIDER)


@register_family("mm_math", kind="verifiable", modality="image", reward="math_numeric")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Do arithmetic on numbers (and at level 3 a shape count) shown in the image."""
    meta: dict = {}
    if difficulty in (1, 2):
        paper, ink = rng.choice(list(render.PAPERS)), rng.choice(list(render.INKS))
        img = Image.new("RGB", (size, size), render.PAPERS[paper])
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        _columns(img, [str(a), str(b)], [render.INKS[ink]] * 2, size, rng)
        meta.update(numbers=[a, b], ink=ink, background=paper)
        if difficulty == 1:
            q = "What is the sum of the two numbers in the image?"
            trace, ans = f"{a} + {b} = {a + b}", a + b
        else:
            n = rng.randint(20, 99)
            meta["operand"] = n
            if rng.random() < 0.5:
                q = f"What is {n} plus the sum of the two numbers in the image?"
                trace, ans = f"{a} + {b} = {a + b}, {n} + {a + b} = {n + a + b}", n + a + b
            else:
                q = f"What is {n} minus the sum of the two numbers in the image?"
                trace, ans = f"{a} + {b} = {a + b}, {n} - {a + b} = {n - a - b}", n - a - b
        return Sample(prompt=[user(q, 1)], target=think(trace, str(ans)), images=[img], answer=str(ans), meta=meta)
    img = Image.new("RGB", (size, size), render.BACKGROUNDS["white"])
    if rng.random() < 0.5:
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        inks = [render.PALETTE[col] for col in rng.sample(render.TEXT_COLOURS, 3)]
        _columns(img, [str(a), str(b), str(c)], inks, size)
        meta["numbers"] = [a, b, c]
        q = "Multiply the first two numbers in the image and add the third."
        trace, ans = f"{a} * {b} = {a * b}, {a * b} + {c} = {a * b + c}", a * b + c
    else:
        a, k = rng.randint(2, 9), rng.randint(1, 5)
        split = size * 2 // 5
        render.draw_centered_text(img, [str(a)], render.PALETTE["black"], region=(0, render.px(2, size), size, split))
        colour = rng.choice(render.COLOURS_BY_DIFFICULTY[2])
        side = render.px(11, size)
        boxes = render.free_boxes(rng, [side] * k, size, gap=2, region=(0, split, size, size))
        _, objs = render.draw_scene([(rng.choice(render.SHAPES), colour) for _ in range(k)], boxes, size, img=img)
        meta.update(numbers=[a], objects=[o.to_dict() for o in objs])
        q = "What is the number times the number of shapes?"
        trace, ans = f"{k} shapes, {a} * {k} = {a * k}", a * k
    return Sample(prompt=[user(q, 1)], target=think(trace, str(ans)), images=[img], answer=str(ans), meta=meta)
