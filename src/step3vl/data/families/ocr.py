"""``ocr``: read a rendered number or short string ("What is written in the image?").

Level 1: a two-digit number in a near-black ink (``render.INKS``) on a light paper
(``render.PAPERS``), as large as fits (5 px strokes at 64 px) and near the centre (shifted up to
4 px each way). Level 2:
3-4 digits/letters in a dark palette colour at a random position, on one or two lines. Level 3:
5-6 characters, half in the thick bitmap font on two lines, half in Pillow's anti-aliased default
font, on a white or gray background. Lines are read left to right, top to bottom, and
the answer has no spaces. Verifier ``ocr``.
"""

from __future__ import annotations

import random

from PIL import Image

from step3vl.data import render
from step3vl.data.families import Sample, register_family, user

CHARS = "0123456789" + render.OCR_LETTERS
QUESTIONS = ("What is written in the image?", "Read the text in the image.")


def random_text(rng: random.Random, difficulty: int) -> str:
    """The string to render: two digits at level 1, else 3-4 / 5-6 digits and letters."""
    if difficulty == 1:
        return str(rng.randint(10, 99))
    n = rng.randint(3, 4) if difficulty == 2 else rng.randint(5, 6)
    return "".join(rng.choice(CHARS) for _ in range(n))


def layout(text: str, width: int, height: int) -> list[str]:
    """Split ``text`` into one or two lines, whichever lets the bitmap font be larger."""
    one = [text]
    half = (len(text) + 1) // 2
    two = [text[:half], text[half:]]
    return two if render.fit_scale(two, width, height) > render.fit_scale(one, width, height) else one


def render_text(rng: random.Random, text: str, difficulty: int, size: int) -> tuple[Image.Image, dict]:
    """The OCR image for ``text`` at ``difficulty`` and how it was drawn."""
    m = render.px(2, size)
    lines = layout(text, size - 2 * m, size - 2 * m)
    if difficulty == 1:
        background = rng.choice(list(render.PAPERS))
        colour = rng.choice(list(render.INKS))
        paper, ink = render.PAPERS[background], render.INKS[colour]
    else:
        background = "white" if difficulty < 3 else rng.choice(list(render.BACKGROUNDS))
        colour = rng.choice(render.TEXT_COLOURS)
        paper, ink = render.BACKGROUNDS[background], render.PALETTE[colour]
    img = Image.new("RGB", (size, size), paper)
    if difficulty == 3 and rng.random() < 0.5:
        box = render.draw_default_text(img, lines, ink, rng)
        font = "default"
    elif difficulty == 1:
        box = render.draw_centered_text(img, lines, ink, rng=rng, jitter=render.px(4, size))
        font = "bitmap"
    else:
        box = render.draw_centered_text(img, lines, ink, rng=rng)
        font = "bitmap"
    return img, {
        "text": text,
        "lines": lines,
        "font": font,
        "colour": colour,
        "ink": list(ink),
        "background": background,
        "box": list(box),
    }


@register_family("ocr", kind="verifiable", modality="image", reward="ocr")
def make(rng: random.Random, difficulty: int, size: int) -> Sample:
    """Read a rendered number or short string of digits and capital letters."""
    text = random_text(rng, difficulty)
    img, meta = render_text(rng, text, difficulty, size)
    q = QUESTIONS[0] if difficulty == 1 else rng.choice(QUESTIONS)
    return Sample(prompt=[user(q, 1)], target=text, images=[img], answer=text, meta=meta)
