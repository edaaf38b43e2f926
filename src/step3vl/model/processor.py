"""Multi-crop image processor: PIL images → normalised views and the placeholder tokens they fill.

Each image becomes up to ``max_crops`` *local crops* of ``crop_size``² cut row-major from the image
resized to a ``rows × cols`` tile grid (no crops when the image's larger side is at most
``image_size``), plus one *global view* (the whole image resized to ``image_size``²). In the text,
the i-th ``<image>`` marker is replaced by image i's placeholder, laid out exactly as StepFun's
Step3-VL processor (vLLM's ``step3_vl``, ``Step3VLProcessor.get_image_repl_feature_ids``) lays it
out: first the patch (crop) replacements, then the image (global) replacement::

    for each crop, row-major:  <patch_start> + n × <im_patch> + <patch_end>
                               [+ <patch_newline> after the last crop of every crop-grid row
                                  except the last row]
    then the global view:      <im_start> + n × <im_patch> + <im_end>

where ``n = side // patch_size // 4`` squared for the view's ``side`` (the projector's two stride-2
convs downsample the patch grid 4x per side). There are no newline tokens inside a view, and
``<patch_newline>`` separates crop-grid rows only: Step3's ``ImagePatcher`` drops the one after the
final crop, so a ``rows × cols`` grid gets ``rows - 1`` of them (``patch_newline_mask``). An image
with no crops gets just the global block.

Contract with the model: ``ProcessedImages.global_pixels`` and ``ProcessedImages.crop_pixels`` are
encoded as two batches (they differ in size), projected, and each view's projected grid is
flattened row-major to ``rows * cols`` embeddings. Concatenating those per-view sequences in
``ProcessedImages.view_order`` order (for each image: its crops row-major, then its global view)
gives exactly one embedding per ``<im_patch>`` token of the expanded text, to be scattered into the
``<im_patch>`` positions of ``input_ids`` left to right (``<patch_start>``, ``<patch_end>``,
``<patch_newline>``, ``<im_start>`` and ``<im_end>`` keep their ordinary token embeddings). With
several sequences in a batch, the views follow the sequences' order, images in text order.

Pixels are RGB in [0, 1], normalised per channel with the CLIP constants ``MEAN``/``STD`` (the
ones vLLM's step3_vl processor uses). Images with transparency are composited onto white.
Images above ``MAX_PIXELS`` are refused. Decoding untrusted bytes (size checked from the header,
before any pixel is decompressed) is ``step3vl.data.io.decode_image``'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image

from step3vl.config import VisionConfig
from step3vl.model.tokenizer import (
    IMAGE_END,
    IMAGE_PATCH,
    IMAGE_START,
    IMAGE_TOKEN,
    PATCH_END,
    PATCH_NEWLINE,
    PATCH_START,
)

MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

MAX_PIXELS = 40_000_000
"""Largest image (width × height) the processor accepts."""



class ImageTooLargeError(ValueError):
    """The image exceeds ``MAX_PIXELS``."""


class ViewRef(NamedTuple):
    """Where one view's pixels are: ``global_pixels[index]`` or ``crop_pixels[index]``."""

    kind: Literal["global", "crop"]
    index: int


@dataclass(frozen=True)
class ProcessedImages:
    """A batch of images as model inputs; see the module docstring for how ``view_order`` is used."""

    global_pixels: torch.Tensor  # (N, 3, image_size, image_size), one per image
    crop_pixels: torch.Tensor  # (M, 3, crop_size, crop_size), M >= 0
    view_order: tuple[ViewRef, ...]  # order of the views' <im_patch> runs in the text: per image, crops then global
    crops_per_image: tuple[int, ...]


def check_size(image: Image.Image) -> None:
    """Raise ``ImageTooLargeError`` if the image has more than ``MAX_PIXELS`` pixels."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {MAX_PIXELS} pixels"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels are composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """Turns images into local crops + global views, and ``<image>`` markers into placeholder tokens."""

    def __init__(self, vision: VisionConfig) -> None:
        for name in ("image_size", "crop_size"):
            side = getattr(vision, name)
            if side <= 0 or side % (vision.patch_size * 4):
                raise ValueError(f"{name}={side} must be a positive multiple of 4*patch_size={4 * vision.patch_size}")
        if vision.max_crops < 0:
            raise ValueError(f"max_crops must be >= 0, got {vision.max_crops}")
        self.vision = vision
        self._mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

    def grid(self, side: int) -> tuple[int, int]:
        """``(rows, cols)`` of image tokens for a square view of ``side`` pixels."""
        n = side // self.vision.patch_size // 4
        return n, n

    def crop_grid(self, image: Image.Image) -> tuple[int, int]:
        """``(rows, cols)`` of local crops for ``image``; ``(0, 0)`` when it gets none.

        Starts from enough tiles to cover the image at native resolution, then scales both counts
        by the same factor ``sqrt(max_crops / (rows * cols))`` (rounded down, at least 1) so the
        tile grid keeps the image's aspect ratio within the crop budget.
        """
        check_size(image)
        width, height = image.size
        v = self.vision
        if v.max_crops == 0 or max(width, height) <= v.image_size:
            return 0, 0
        rows, cols = math.ceil(height / v.crop_size), math.ceil(width / v.crop_size)
        if rows * cols > v.max_crops:
            # floor(sqrt(a / b)) == isqrt(a // b): exact, unlike float sqrt at perfect squares.
            rows, cols = (
                max(1, math.isqrt(rows * v.max_crops // cols)),
                max(1, math.isqrt(cols * v.max_crops // rows)),
            )
            # Only a count clamped up to 1 can push the product over budget; cap the other one.
            if rows * cols > v.max_crops:
                if rows == 1:
                    cols = v.max_crops
                else:
                    rows = v.max_crops
        return rows, cols

    def raw_views(self, image: Image.Image) -> list[np.ndarray]:
        """The local crops row-major, then the global view (placeholder order), as uint8 ``(3, side, side)``.

        Packed training shards store these (4x smaller than floats); ``normalise`` turns them into
        model inputs, so training and inference see identical pixels.
        """
        rows, cols = self.crop_grid(image)
        rgb = to_rgb(image)
        v = self.vision
        out: list[np.ndarray] = []
        if rows:
            c = v.crop_size
            tiled = rgb.resize((cols * c, rows * c), Image.Resampling.BICUBIC)
            out.extend(
                _chw(tiled.crop((j * c, i * c, (j + 1) * c, (i + 1) * c)))
                for i in range(rows)
                for j in range(cols)
            )
        out.append(_chw(rgb.resize((v.image_size, v.image_size), Image.Resampling.BICUBIC)))
        return out

    def views(self, image: Image.Image) -> list[torch.Tensor]:
        """``raw_views`` normalised: float32 ``(3, side, side)`` tensors, the global view last."""
        return [self.normalise(torch.from_numpy(v)) for v in self.raw_views(image)]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, H, W)`` → float32 normalised with ``MEAN``/``STD``."""
        x = pixels.to(torch.float32) / 255.0
        return ((x - self._mean) / self._std).contiguous()

    def patch_newline_mask(self, image: Image.Image) -> list[bool]:
        """Per crop (row-major): whether a ``<patch_newline>`` follows it, as Step3-VL's ``ImagePatcher``.

        True for the last crop of every crop-grid row except the last row.
        """
        rows, cols = self.crop_grid(image)
        return [(k + 1) % cols == 0 and k + 1 < rows * cols for k in range(rows * cols)]

    def max_placeholder_tokens(self) -> int:
        """Upper bound on the tokens one image's placeholder takes (every crop used, newlines included)."""
        v = self.vision
        crop = len(self._patch_run(v.crop_size)) // len(IMAGE_PATCH) + 2
        glob = len(self._patch_run(v.image_size)) // len(IMAGE_PATCH) + 2
        return v.max_crops * crop + max(0, v.max_crops - 1) + glob

    def placeholder(self, image: Image.Image) -> str:
        """The token string that stands for ``image`` in the text: crop blocks, then the global block."""
        patch = self._patch_run(self.vision.crop_size)
        parts: list[str] = []
        for newline in self.patch_newline_mask(image):
            parts.append(PATCH_START + patch + PATCH_END)
            if newline:
                parts.append(PATCH_NEWLINE)
        parts.append(IMAGE_START + self._patch_run(self.vision.image_size) + IMAGE_END)
        return "".join(parts)

    def expand_text(self, text: str, images: list[Image.Image]) -> str:
        """Replace the i-th ``<image>`` in ``text`` with ``placeholder(images[i])``."""
        pieces = text.split(IMAGE_TOKEN)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"text has {len(pieces) - 1} {IMAGE_TOKEN} marker(s) but {len(images)} image(s) were given"
            )
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            out.append(self.placeholder(image))
            out.append(piece)
        return "".join(out)

    def num_patch_tokens(self, image: Image.Image) -> int:
        """How many ``<im_patch>`` tokens (= projected embeddings) ``image`` takes."""
        rows, cols = self.crop_grid(image)
        g_rows, g_cols = self.grid(self.vision.image_size)
        c_rows, c_cols = self.grid(self.vision.crop_size)
        return g_rows * g_cols + rows * cols * c_rows * c_cols

    def __call__(self, images: list[Image.Image]) -> ProcessedImages:
        """Views of all ``images``, batched by kind, with the order their placeholders appear in."""
        v = self.vision
        globals_: list[torch.Tensor] = []
        crops: list[torch.Tensor] = []
        order: list[ViewRef] = []
        per_image: list[int] = []
        for image in images:
            *image_crops, global_view = self.views(image)
            order.extend(ViewRef("crop", len(crops) + k) for k in range(len(image_crops)))
            crops.extend(image_crops)
            order.append(ViewRef("global", len(globals_)))
            globals_.append(global_view)
            per_image.append(len(image_crops))
        return ProcessedImages(
            global_pixels=_stack(globals_, v.image_size),
            crop_pixels=_stack(crops, v.crop_size),
            view_order=tuple(order),
            crops_per_image=tuple(per_image),
        )

    def _patch_run(self, side: int) -> str:
        rows, cols = self.grid(side)
        return IMAGE_PATCH * (rows * cols)



def _chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _stack(views: list[torch.Tensor], side: int) -> torch.Tensor:
    if not views:
        return torch.empty(0, 3, side, side, dtype=torch.float32)
    return torch.stack(views)
