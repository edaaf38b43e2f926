"""Pillow drawing helpers shared by the synthetic data families (``step3vl.data.families``).

Everything here is deterministic and cheap: shapes are drawn without anti-aliasing in exact
palette colours (so tests and verifiers can find an object's pixels by colour), and text is drawn
with a 5x7 bitmap font whose glyphs are scaled by an integer factor, so strokes stay ``scale``
pixels thick and survive the model's 2x-downscaled global view. Pillow's built-in font
(``ImageFont.load_default(size)``, a scalable FreeType font since Pillow 10.1) is offered as a
second, anti-aliased typeface for harder OCR; fonts are cached per size.

Boxes are ``(x1, y1, x2, y2)`` in pixels with ``x2``/``y2`` exclusive (width = ``x2 - x1``).
All pixel sizes in the families are given for a 64-pixel image and scaled by ``size / 64``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]

# Saturated and far apart in RGB, so a 2x downscale keeps them distinguishable.
PALETTE: dict[str, RGB] = {
    "red": (220, 20, 20),
    "green": (0, 150, 0),
    "blue": (20, 60, 230),
    "yellow": (240, 200, 0),
    "purple": (140, 30, 190),
    "orange": (255, 130, 0),
    "black": (0, 0, 0),
}
# Colours introduced by difficulty: level 1 uses the first four, level 3 all of them.
COLOURS_BY_DIFFICULTY: dict[int, tuple[str, ...]] = {
    1: ("red", "green", "blue", "yellow"),
    2: ("red", "green", "blue", "yellow", "purple", "orange"),
    3: tuple(PALETTE),
}
# Colours dark enough for text on a light background (luminance < 128).
TEXT_COLOURS: tuple[str, ...] = ("black", "blue", "red", "purple", "green")
BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "gray": (205, 205, 205)}
# Easy-level text: near-black inks (luminance < 30, so strokes stay solid at the 2x-downscaled
# global view) on light papers. They vary the pixels without making the text any harder to read.
INKS: dict[str, RGB] = {"black": (0, 0, 0), "navy": (10, 20, 80), "brown": (50, 25, 0), "dark green": (0, 45, 15)}
PAPERS: dict[str, RGB] = {"white": (255, 255, 255), "cream": (252, 246, 228), "pale blue": (234, 242, 252)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}

BASE_SIZE = 64


def px(value: float, size: int) -> int:
    """A pixel length given for a 64-pixel image, scaled to an image of side ``size``."""
    return max(1, round(value * size / BASE_SIZE))


# --------------------------------------------------------------------------- shapes


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: RGB, box: Box) -> None:
    """Fill ``shape`` inside ``box`` (x2/y2 exclusive); no anti-aliasing, exact ``colour``."""
    x1, y1, x2, y2 = box
    if shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class Obj:
    """One drawn object: its shape, colour name and tight pixel box (x2/y2 exclusive)."""

    shape: str
    colour: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "box": list(self.box)}


def grid_boxes(rng: random.Random, n: int, grid: int, size: int, lo: int, hi: int) -> list[Box]:
    """``n`` non-touching square boxes, one per random cell of a ``grid`` x ``grid`` layout.

    Side lengths are drawn from ``[lo, hi]`` (clamped so at least 2 pixels separate
    neighbouring cells' objects) and each box is jittered inside its cell.
    """
    if n > grid * grid:
        raise ValueError(f"{n} objects do not fit a {grid}x{grid} grid")
    cells = rng.sample(range(grid * grid), n)
    boxes = []
    for c in cells:
        r, k = divmod(c, grid)
        cx1, cx2 = k * size // grid, (k + 1) * size // grid
        cy1, cy2 = r * size // grid, (r + 1) * size // grid
        room = min(cx2 - cx1, cy2 - cy1) - 2
        side = min(rng.randint(lo, hi), room)
        x = rng.randint(cx1 + 1, cx2 - 1 - side)
        y = rng.randint(cy1 + 1, cy2 - 1 - side)
        boxes.append((x, y, x + side, y + side))
    return boxes


def free_boxes(
    rng: random.Random, sides: Sequence[int], size: int, gap: int = 2, margin: int = 1, region: Box | None = None
) -> list[Box]:
    """Square boxes of the given sides at uniformly random, non-overlapping positions.

    Boxes lie inside ``region`` (default: the whole ``size`` x ``size`` image) less ``margin``.
    Rejection sampling with a fixed attempt budget; when it runs out the layout restarts with all
    sides shrunk by 10 %, so the call always succeeds and stays deterministic for a given ``rng``.
    """
    rx1, ry1, rx2, ry2 = region if region is not None else (0, 0, size, size)
    room = min(rx2 - rx1, ry2 - ry1) - 2 * margin
    sides = [min(s, room) for s in sides]
    while True:
        boxes: list[Box] = []
        for side in sides:
            for _ in range(200):
                x = rng.randint(rx1 + margin, rx2 - margin - side)
                y = rng.randint(ry1 + margin, ry2 - margin - side)
                b = (x, y, x + side, y + side)
                if all(not _near(b, o, gap) for o in boxes):
                    boxes.append(b)
                    break
            else:
                break
        if len(boxes) == len(sides):
            return boxes
        sides = [max(3, int(s * 0.9)) for s in sides]


def _near(a: Box, b: Box, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def draw_scene(
    specs: Sequence[tuple[str, str]],
    boxes: Sequence[Box],
    size: int,
    background: str = "white",
    img: Image.Image | None = None,
) -> tuple[Image.Image, list[Obj]]:
    """Draw ``(shape, colour)`` specs into ``boxes``; return the image and the objects with tight boxes.

    Draws on ``img`` when given, else on a new ``size`` x ``size`` image of ``background``.
    The returned boxes come from the drawn pixels (not the requested box), so they are exactly
    what a grounding answer should be. Boxes must not overlap.
    """
    if img is None:
        img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    for (shape, colour), box in zip(specs, boxes, strict=True):
        draw_shape(draw, shape, PALETTE[colour], box)
    arr = np.asarray(img)
    objs = []
    for (shape, colour), box in zip(specs, boxes, strict=True):
        objs.append(Obj(shape, colour, tight_box(arr, PALETTE[colour], box)))
    return img, objs


def tight_box(arr: np.ndarray, colour: RGB, region: Box) -> Box:
    """The box of the pixels of ``colour`` inside ``region`` of an ``HxWx3`` array."""
    x1, y1, x2, y2 = region
    mask = (arr[y1:y2, x1:x2] == np.asarray(colour, dtype=arr.dtype)).all(axis=-1)
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        raise ValueError(f"nothing of colour {colour} drawn in {region}")
    return (x1 + int(xs[0]), y1 + int(ys[0]), x1 + int(xs[-1]) + 1, y1 + int(ys[-1]) + 1)


# --------------------------------------------------------------------------- bitmap font

GLYPH_W, GLYPH_H = 5, 7
# Classic 5x7 dot-matrix glyphs. OCR strings avoid I, O and Q (they read as 1, 0, 0).
_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "+": (".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."),
    "-": (".....", ".....", ".....", "#####", ".....", ".....", "....."),
    "=": (".....", ".....", "#####", ".....", "#####", ".....", "....."),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
    " ": (".....",) * 7,
}
FONT_CHARS = frozenset(_GLYPHS)
OCR_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q


@cache
def _glyph_mask(ch: str, scale: int) -> Image.Image:
    rows = _GLYPHS[ch]
    bits = np.array([[c == "#" for c in row] for row in rows], dtype=np.uint8) * 255
    return Image.fromarray(np.kron(bits, np.ones((scale, scale), dtype=np.uint8)), mode="L")


def text_extent(lines: Sequence[str], scale: int) -> tuple[int, int]:
    """Pixel width and height of ``lines`` in the bitmap font (1-unit letter gap, 2-unit line gap)."""
    cols = max(len(line) for line in lines)
    return (cols * (GLYPH_W + 1) - 1) * scale, (len(lines) * (GLYPH_H + 2) - 2) * scale


def fit_scale(lines: Sequence[str], width: int, height: int, max_scale: int = 8) -> int:
    """The largest integer glyph scale at which ``lines`` fit in ``width`` x ``height`` (at least 1)."""
    cols = max(len(line) for line in lines)
    sx = (width) // (cols * (GLYPH_W + 1) - 1)
    sy = (height) // (len(lines) * (GLYPH_H + 2) - 2)
    return max(1, min(sx, sy, max_scale))


def draw_bitmap_text(img: Image.Image, xy: tuple[int, int], lines: Sequence[str], scale: int, colour: RGB) -> Box:
    """Draw ``lines`` (left-aligned) with the top-left at ``xy``; return the text's box."""
    x0, y0 = xy
    for i, line in enumerate(lines):
        y = y0 + i * (GLYPH_H + 2) * scale
        for j, ch in enumerate(line):
            if ch not in _GLYPHS:
                raise ValueError(f"character {ch!r} is not in the bitmap font")
            if ch != " ":
                img.paste(colour, (x0 + j * (GLYPH_W + 1) * scale, y), _glyph_mask(ch, scale))
    w, h = text_extent(lines, scale)
    return (x0, y0, x0 + w, y0 + h)


def draw_centered_text(
    img: Image.Image,
    lines: Sequence[str],
    colour: RGB,
    region: Box | None = None,
    rng: random.Random | None = None,
    max_scale: int = 8,
    jitter: int | None = None,
) -> Box:
    """Draw ``lines`` as large as fits in ``region`` (default: the image less a 3 % margin).

    With ``rng`` the text is placed at a random position inside the region instead of centred;
    with ``rng`` and ``jitter`` it is shifted at most ``jitter`` pixels (each axis) from the centre,
    staying inside the region.
    """
    if region is None:
        m = px(2, img.width)
        region = (m, m, img.width - m, img.height - m)
    rx1, ry1, rx2, ry2 = region
    scale = fit_scale(lines, rx2 - rx1, ry2 - ry1, max_scale)
    w, h = text_extent(lines, scale)
    if rng is None:
        x, y = rx1 + (rx2 - rx1 - w) // 2, ry1 + (ry2 - ry1 - h) // 2
    elif jitter is None:
        x, y = rng.randint(rx1, max(rx1, rx2 - w)), rng.randint(ry1, max(ry1, ry2 - h))
    else:
        cx, cy = rx1 + (rx2 - rx1 - w) // 2, ry1 + (ry2 - ry1 - h) // 2
        x = rng.randint(max(rx1, cx - jitter), max(rx1, min(cx + jitter, rx2 - w)))
        y = rng.randint(max(ry1, cy - jitter), max(ry1, min(cy + jitter, ry2 - h)))
    return draw_bitmap_text(img, (x, y), lines, scale, colour)


# --------------------------------------------------------------------------- Pillow's default font


@lru_cache(maxsize=64)
def default_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels, loaded once per size (loading costs ~1 ms)."""
    return ImageFont.load_default(size=size)


def draw_default_text(img: Image.Image, lines: Sequence[str], colour: RGB, rng: random.Random | None = None) -> Box:
    """Draw ``lines`` with Pillow's default font, bold (stroked) and as large as fits; return their box."""
    draw = ImageDraw.Draw(img)
    text = "\n".join(lines)
    m = px(2, img.width)
    avail_w, avail_h = img.width - 2 * m, img.height - 2 * m
    stroke = max(1, img.width // 32)

    def measure(fs: int) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, int, Box]:
        font, spacing = default_font(fs), fs // 8
        return font, spacing, draw.multiline_textbbox((0, 0), text, font=font, spacing=spacing, stroke_width=stroke)

    # Text extent is close to linear in font size: guess from one measurement, then step down.
    _, _, (x1, y1, x2, y2) = measure(img.height)
    fsize = max(6, int(img.height * min(avail_w / (x2 - x1), avail_h / (y2 - y1))) + 1)
    while True:
        font, spacing, (x1, y1, x2, y2) = measure(fsize)
        if (x2 - x1 <= avail_w and y2 - y1 <= avail_h) or fsize <= 6:
            break
        fsize -= 1
    w, h = x2 - x1, y2 - y1
    if rng is None:
        ox, oy = (img.width - w) // 2, (img.height - h) // 2
    else:
        ox, oy = rng.randint(m, max(m, img.width - m - w)), rng.randint(m, max(m, img.height - m - h))
    draw.multiline_text(
        (ox - x1, oy - y1), text, font=font, fill=colour, spacing=spacing, stroke_width=stroke, stroke_fill=colour
    )
    return (ox, oy, ox + w, oy + h)
