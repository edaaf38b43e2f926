"""``chart``: read a bar chart ("What is the value of bar B?").

Bars are labelled A, B, ... left to right under the axis, with a light gridline at every unit,
so a value is read by counting gridlines. Level 1: 2-3 bars, values 1-5; level 2: 3-4 bars,
values 1-8; level 3: 4-5 bars, values 1-10, and also sums, differences and the maximum. Bar
colours, bar width and the chart's left/right margins vary per chart.
Verifier ``math_numeric``.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from step3vl.data import render
from step3vl.data.families import Sample, register_family, think, user

LEVELS = {1: {"bars": (2, 3), "vmax": 5}, 2: {"bars": (3, 4), "vmax": 8}, 3: {"bars": (4, 5), "vmax": 10}}
GRID = (200, 200, 200)
BAR_COLOURS = ("red", "green", "blue", "orange", "purple", "yellow")
BAR_WIDTHS = (0.45, 0.55, 0.65, 0.75)  # fraction of a bar's slot


def draw_chart(rng: random.Random, values: list[int], vmax: int, size: int) -> tuple[Image.Image, list[list[int]]]:
    """Draw the chart; return it and each bar's box."""
    img = Image.new("RGB", (size, size), render.BACKGROUNDS["white"])
    draw = ImageDraw.Draw(img)
    scale = max(1, size // 64)
    left, right, top = render.px(rng.randint(2, 6), size), size - render.px(rng.randint(1, 3), size), render.px(3, size)
    base = size - (render.GLYPH_H + 3) * scale  # axis row; labels below it
    unit = (base - top) // vmax
    for v in range(1, vmax + 1):
        draw.line([(left, base - v * unit), (right - 1, base - v * unit)], fill=GRID)
    slot = (right - left) / len(values)
    width = max(2, int(slot * rng.choice(BAR_WIDTHS)))
    colours = rng.sample(BAR_COLOURS, len(values))
    boxes = []
    for i, (v, c) in enumerate(zip(values, colours, strict=True)):
        x1 = left + int(i * slot + (slot - width) / 2)
        draw.rectangle((x1, base - v * unit, x1 + width - 1, base - 1), fill=render.PALETTE[c])
        boxes.append([x1, base - v * unit, x1 + width, base])
        lx = x1 + (width - render.GLYPH_W * scale) // 2
        render.draw_bitmap_text(img, (lx, base + 2 * scale), [chr(65 + i)], scale, render.PALETTE["black"])
    draw.line([(left, base), (right - 1, base)], fill=render.PALETTE["black"])
    return img, boxes


@register_family("chart", kind="verifiable", modality="image", reward="math_numeric")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Read a value (or at level 3 a sum, difference or maximum) off a labelled bar chart."""
    cfg = LEVELS[difficulty]
    n = rng.randint(*cfg["bars"])
    values = [rng.randint(1, cfg["vmax"]) for _ in range(n)]
    img, boxes = draw_chart(rng, values, cfg["vmax"], size)
    labels = [chr(65 + i) for i in range(n)]
    kind = "value" if difficulty < 3 else rng.choice(["value", "value", "sum", "difference", "max"])
    i, j = sorted(rng.sample(range(n), 2))
    a, b = values[i], values[j]
    if kind == "value":
        q = f"What is the value of bar {labels[i]}?"
        trace, ans = f"{labels[i]} = {a}", a
    elif kind == "sum":
        q = f"What is {labels[i]} plus {labels[j]}?"
        trace, ans = f"{labels[i]} = {a}, {labels[j]} = {b}, {a} + {b} = {a + b}", a + b
    elif kind == "difference":
        q = f"How much taller is the taller of bars {labels[i]} and {labels[j]}?"
        hi, lo = max(a, b), min(a, b)
        trace, ans = f"{labels[i]} = {a}, {labels[j]} = {b}, {hi} - {lo} = {hi - lo}", hi - lo
    else:
        q = "What is the largest value?"
        trace = ", ".join(f"{lab} = {v}" for lab, v in zip(labels, values, strict=True)) + f", max = {max(values)}"
        ans = max(values)
    return Sample(
        prompt=[user(q, 1)],
        target=think(trace, str(ans)),
        images=[img],
        answer=str(ans),
        meta={"labels": labels, "values": values, "bars": boxes, "question": kind},
    )
