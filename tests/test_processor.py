"""The multi-crop image processor: views, placeholders, view order, determinism and the pixel budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from step3vl.config import TokenizerConfig, VisionConfig
from step3vl.model.processor import (
    MAX_PIXELS,
    MEAN,
    STD,
    ImageProcessor,
    ImageTooLargeError,
    ViewRef,
)
from step3vl.model.tokenizer import (
    IMAGE_END,
    IMAGE_PATCH,
    IMAGE_START,
    IMAGE_TOKEN,
    PATCH_END,
    PATCH_NEWLINE,
    PATCH_START,
    build_tokenizer,
)

VISION = VisionConfig(image_size=32, crop_size=32, patch_size=4, max_crops=4, width=32, layers=1, heads=2)


@pytest.fixture(scope="module")
def proc() -> ImageProcessor:
    return ImageProcessor(VISION)


def _noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB").convert(mode)


# --------------------------------------------------------------------------- views


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        ((20, 12), (0, 0)),  # smaller than the global view
        ((32, 32), (0, 0)),  # larger side == image_size: still no crops
        ((33, 10), (1, 2)),
        ((64, 64), (2, 2)),
        ((200, 200), (2, 2)),  # 7x7 tiles shrunk to the budget of 4
        ((300, 20), (1, 4)),  # wide: 1x10 tiles, capped at 4 columns
        ((20, 300), (4, 1)),  # tall
        ((100, 40), (1, 2)),  # 2x4 tiles scaled by sqrt(4/8) -> 1x2
    ],
)
def test_crop_grid_and_view_count(proc, size, grid):
    image = _noise(*size)
    assert proc.crop_grid(image) == grid
    views = proc.views(image)
    assert len(views) == 1 + grid[0] * grid[1]
    for view in views:
        assert view.shape == (3, 32, 32) and view.dtype == torch.float32


def test_crop_budget_is_never_exceeded():
    for max_crops in range(1, 10):
        p = ImageProcessor(dataclasses.replace(VISION, max_crops=max_crops))
        for width in (33, 70, 130, 400, 1000):
            for height in (10, 33, 70, 130, 400):
                rows, cols = p.crop_grid(Image.new("L", (width, height)))
                assert 1 <= rows * cols <= max_crops, (max_crops, width, height)


def test_no_crops_when_max_crops_is_zero():
    p = ImageProcessor(dataclasses.replace(VISION, max_crops=0))
    assert len(p.views(_noise(200, 100))) == 1


def test_views_have_their_own_sizes():
    p = ImageProcessor(dataclasses.replace(VISION, image_size=32, crop_size=16))
    views = p.views(_noise(48, 16))
    # Crops first, then the global view: the placeholder order.
    assert [tuple(v.shape) for v in views] == [(3, 16, 16), (3, 16, 16), (3, 16, 16), (3, 32, 32)]


def test_crops_are_row_major_tiles_of_the_resized_image(proc):
    # 64x64 splits exactly into 2x2 tiles of 32, so each crop must be that quadrant, unresampled.
    image = _noise(64, 64, seed=1)
    *crops, _ = proc.views(image)
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        quadrant = image.crop((j * 32, i * 32, (j + 1) * 32, (i + 1) * 32))
        assert torch.equal(crops[k], proc.views(quadrant)[-1])


def test_global_view_is_last(proc):
    image = _noise(64, 40, seed=7)
    assert torch.equal(proc.views(image)[-1], proc.views(image.resize((32, 32), Image.Resampling.BICUBIC))[-1])


def test_normalisation_constants(proc):
    rgb = (255, 128, 0)
    (view,) = proc.views(Image.new("RGB", (8, 8), rgb))
    for c in range(3):
        expected = (rgb[c] / 255.0 - MEAN[c]) / STD[c]
        assert torch.allclose(view[c], torch.full((32, 32), expected), atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(proc, mode):
    views = proc.views(_noise(40, 24, mode=mode))
    assert len(views) == 1 + 2 and all(v.shape == (3, 32, 32) for v in views)


def test_transparent_pixels_become_white(proc):
    transparent = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert torch.equal(proc.views(transparent)[-1], proc.views(Image.new("RGB", (16, 16), "white"))[-1])


def test_views_are_deterministic(proc):
    a = proc([_noise(100, 40, seed=2), _noise(20, 20, seed=3)])
    b = proc([_noise(100, 40, seed=2), _noise(20, 20, seed=3)])
    assert torch.equal(a.global_pixels, b.global_pixels)
    assert torch.equal(a.crop_pixels, b.crop_pixels)
    assert a.view_order == b.view_order


# --------------------------------------------------------------------------- placeholders


def test_grid_is_a_quarter_of_the_patch_grid(proc):
    assert proc.grid(32) == (2, 2)
    assert ImageProcessor(VisionConfig()).grid(728) == (13, 13)


GLOBAL_BLOCK = IMAGE_START + IMAGE_PATCH * 4 + IMAGE_END  # 32px view, patch 4 -> 2x2 grid
CROP_BLOCK = PATCH_START + IMAGE_PATCH * 4 + PATCH_END


def test_placeholder_without_crops_is_the_global_block(proc):
    assert proc.placeholder(_noise(10, 10)) == GLOBAL_BLOCK
    assert proc.patch_newline_mask(_noise(10, 10)) == []


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 2x2 grid: a newline between the rows, none after the last crop (Step3's ImagePatcher).
        ((64, 64), CROP_BLOCK * 2 + PATCH_NEWLINE + CROP_BLOCK * 2 + GLOBAL_BLOCK),
        ((300, 20), CROP_BLOCK * 4 + GLOBAL_BLOCK),  # 1x4: a single row, no newline
        ((20, 300), (CROP_BLOCK + PATCH_NEWLINE) * 3 + CROP_BLOCK + GLOBAL_BLOCK),  # 4x1
    ],
)
def test_placeholder_matches_step3_layout(proc, size, expected):
    assert proc.placeholder(_noise(*size)) == expected


@pytest.mark.parametrize("size", [(10, 10), (33, 10), (64, 64), (200, 200), (300, 20), (20, 300), (100, 40)])
def test_placeholder_counts(proc, size):
    image = _noise(*size)
    rows, cols = proc.crop_grid(image)
    n_crops = rows * cols
    text = proc.placeholder(image)
    assert text.count(IMAGE_START) == text.count(IMAGE_END) == 1
    assert text.endswith(GLOBAL_BLOCK)
    assert text.count(PATCH_START) == text.count(PATCH_END) == n_crops
    assert text.count(PATCH_NEWLINE) == max(rows - 1, 0) == sum(proc.patch_newline_mask(image))
    assert text.count(IMAGE_PATCH) == 4 * (1 + n_crops) == proc.num_patch_tokens(image)
    assert "<im_newline>" not in text


def test_patch_newline_mask_matches_step3(proc):
    # Step3-VL's ImagePatcher: newline after every (patch_id + 1) % x_num == 0, minus the final one.
    for size in [(64, 64), (300, 20), (20, 300), (33, 10), (100, 40)]:
        image = _noise(*size)
        rows, cols = proc.crop_grid(image)
        newlines = [k for k in range(rows * cols) if (k + 1) % cols == 0]
        if newlines and newlines[-1] == rows * cols - 1:
            newlines.pop()
        assert proc.patch_newline_mask(image) == [k in newlines for k in range(rows * cols)]


def test_expand_text_replaces_markers_in_order(proc):
    a, b = _noise(10, 10), _noise(64, 64)
    text = f"{IMAGE_TOKEN}\nCompare with {IMAGE_TOKEN}?"
    assert proc.expand_text(text, [a, b]) == f"{proc.placeholder(a)}\nCompare with {proc.placeholder(b)}?"
    assert proc.expand_text("no images", []) == "no images"


@pytest.mark.parametrize(("text", "n_images"), [(f"{IMAGE_TOKEN} and {IMAGE_TOKEN}", 1), ("none", 1), (IMAGE_TOKEN, 2)])
def test_expand_text_count_mismatch_is_an_error(proc, text, n_images):
    with pytest.raises(ValueError, match=r"marker\(s\) but \d image\(s\)"):
        proc.expand_text(text, [_noise(8, 8)] * n_images)


def test_view_order_fills_placeholders_in_text_order():
    p = ImageProcessor(dataclasses.replace(VISION, image_size=32, crop_size=16))
    tok = build_tokenizer(TokenizerConfig(vocab_size=512))
    images = [_noise(48, 40, seed=4), _noise(20, 20, seed=5), _noise(80, 16, seed=6)]
    out = p(images)

    assert out.global_pixels.shape == (3, 3, 32, 32)
    assert out.crop_pixels.shape == (sum(out.crops_per_image), 3, 16, 16)
    assert out.crops_per_image == (4, 0, 4)
    expected_views = [view for image in images for view in p.views(image)]
    pixels = {"global": out.global_pixels, "crop": out.crop_pixels}
    assert len(out.view_order) == len(expected_views)
    for ref, view in zip(out.view_order, expected_views):
        assert torch.equal(pixels[ref.kind][ref.index], view)

    # Play the model's part: each view yields rows*cols embeddings tagged with (view, row, col); they
    # must land inside that view's own block (<patch_start>..<patch_end> for a crop,
    # <im_start>..<im_end> for a global view), row-major.
    ids = tok.encode(p.expand_text(f"{IMAGE_TOKEN} a {IMAGE_TOKEN}{IMAGE_TOKEN} b", images))
    embeddings = []
    for k, ref in enumerate(out.view_order):
        rows, cols = p.grid(pixels[ref.kind].shape[-1])
        embeddings.extend((k, r, c) for r in range(rows) for c in range(cols))
    patch_id, im_start, im_end, p_start, p_end, p_newline = tok.convert_tokens_to_ids(
        [IMAGE_PATCH, IMAGE_START, IMAGE_END, PATCH_START, PATCH_END, PATCH_NEWLINE]
    )
    assert ids.count(patch_id) == len(embeddings) == sum(p.num_patch_tokens(i) for i in images)
    openers = {im_start: "global", p_start: "crop"}
    closers = {im_end: "global", p_end: "crop"}
    fill = iter(embeddings)
    block, n, kind, inside = -1, 0, None, False
    for token in ids:
        if token in openers:
            assert not inside
            block, n, kind, inside = block + 1, 0, openers[token], True
            assert out.view_order[block].kind == kind
        elif token == patch_id:
            assert inside
            cols = p.grid(32 if kind == "global" else 16)[1]
            assert next(fill) == (block, n // cols, n % cols)
            n += 1
        elif token in closers:
            assert inside and closers[token] == kind
            rows, cols = p.grid(32 if kind == "global" else 16)
            assert n == rows * cols
            inside = False
        elif token == p_newline:
            assert not inside and kind == "crop"
    assert block == len(out.view_order) - 1
    assert next(fill, None) is None
    # 48x40 and 80x16 give 2x2 and 1x4 crop grids (crop_size 16, budget 4): one newline in all.
    assert ids.count(p_newline) == 1


def test_view_order_is_crops_then_global_per_image(proc):
    out = proc([_noise(64, 64, seed=8), _noise(10, 10, seed=9), _noise(300, 20, seed=10)])
    assert out.view_order == (
        ViewRef("crop", 0), ViewRef("crop", 1), ViewRef("crop", 2), ViewRef("crop", 3), ViewRef("global", 0),
        ViewRef("global", 1),
        ViewRef("crop", 4), ViewRef("crop", 5), ViewRef("crop", 6), ViewRef("crop", 7), ViewRef("global", 2),
    )


def test_no_images_gives_empty_batches(proc):
    out = proc([])
    assert out.global_pixels.shape == (0, 3, 32, 32)
    assert out.crop_pixels.shape == (0, 3, 32, 32)
    assert out.view_order == () and out.crops_per_image == ()


def test_small_images_only_have_global_views(proc):
    out = proc([_noise(10, 10), _noise(12, 30)])
    assert out.crop_pixels.shape[0] == 0
    assert out.view_order == (ViewRef("global", 0), ViewRef("global", 1))


# --------------------------------------------------------------------------- safety


def test_image_above_the_pixel_budget_is_refused(proc):
    huge = Image.new("1", (10_000, MAX_PIXELS // 10_000 + 1))
    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        proc.views(huge)
    with pytest.raises(ImageTooLargeError):
        proc.placeholder(huge)
    with pytest.raises(ValueError):
        proc.expand_text(IMAGE_TOKEN, [huge])


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="multiple of 4\\*patch_size"):
        ImageProcessor(dataclasses.replace(VISION, crop_size=20))
