"""Registry of the synthetic data families and the one function that turns a family into records.

A family is a pure function ``make(rng, difficulty, size) -> Sample`` registered with
``@register_family``. ``generate(family, n, seed, difficulty, split)`` gives every record its own
``random.Random`` keyed by (family, split, seed, index, difficulty), so records are deterministic,
independent of ``n`` (the first k of ``generate(n=100)`` equal ``generate(n=k)``) and different
between splits even at the same seed. Records are plain dicts in the dataset record format; images
are ``PIL.Image.Image`` objects until ``step3vl.data.io.write_dataset`` saves them as PNG.

Reasoning targets look like ``<think>37 + 45 = 82</think>82``: the text after the last ``</think>``
(or the whole target when there is none) equals ``answer``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

IMAGE_TOKEN = "<image>"
THINK_START, THINK_END = "<think>", "</think>"
REWARDS = frozenset({"math_numeric", "exact_match", "count", "grounding_iou", "ocr", "choice"})
SPLITS = ("train", "eval")
DIFFICULTIES = (1, 2, 3)

Kind = Literal["verifiable", "pretrain", "preference"]
Modality = Literal["image", "text", "mixed"]


@dataclass
class Sample:
    """What a family's ``make`` returns; ``generate`` wraps it into a record.

    ``prompt`` holds the messages before the assistant turn; ``target`` is the assistant turn
    (``None`` for preference samples, which carry ``chosen`` / ``rejected`` instead).
    ``reward`` overrides the family's default verifier for this sample.
    """

    prompt: list[dict[str, str]]
    target: str | None
    images: list[Image.Image] = field(default_factory=list)
    answer: str | None = None
    reward: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


Maker = Callable[[random.Random, int, int], Sample]


@dataclass(frozen=True)
class Family:
    """A registered data family: its generator and how its records are used and verified."""

    name: str
    make: Maker
    kind: Kind
    modality: Modality
    reward: str | None
    description: str


FAMILIES: dict[str, Family] = {}


def register_family(
    name: str, *, kind: Kind, modality: Modality, reward: str | None = None
) -> Callable[[Maker], Maker]:
    """Register ``make(rng, difficulty, size) -> Sample`` as family ``name`` (its docstring describes it)."""
    if reward is not None and reward not in REWARDS:
        raise ValueError(f"unknown reward {reward!r}; expected one of {sorted(REWARDS)}")
    if kind == "verifiable" and reward is None:
        raise ValueError(f"verifiable family {name!r} needs a reward")

    def deco(make: Maker) -> Maker:
        if name in FAMILIES:
            raise ValueError(f"family {name!r} is already registered")
        doc = (make.__doc__ or "").strip().splitlines()
        FAMILIES[name] = Family(name, make, kind, modality, reward, doc[0] if doc else "")
        return make

    return deco


# --------------------------------------------------------------------------- helpers for families


def user(text: str, n_images: int = 0) -> dict[str, str]:
    """A user message with ``n_images`` ``<image>`` placeholders before ``text``."""
    return {"role": "user", "content": (IMAGE_TOKEN * n_images + "\n" if n_images else "") + text}


def think(trace: str, answer: str) -> str:
    """A reasoning target: ``<think>trace</think>answer``."""
    return f"{THINK_START}{trace}{THINK_END}{answer}"


def final_answer(text: str) -> str:
    """The conclusion of a response: the text after the last ``</think>``, else all of it."""
    return text.rsplit(THINK_END, 1)[-1]


def rng_for(family: str, split: str, seed: int, index: int, difficulty: int | None) -> random.Random:
    """The record's own generator (a str seed is hashed with SHA-512, so it ignores PYTHONHASHSEED)."""
    return random.Random(f"{family}/{split}/{seed}/{index}/{difficulty}")


def sample(family: str, rng: random.Random, difficulty: int, size: int = 64) -> Sample:
    """One ``Sample`` of ``family`` from ``rng`` (used by families that build on other families)."""
    return FAMILIES[family].make(rng, difficulty, size)


# --------------------------------------------------------------------------- records


def generate(
    family: str,
    n: int,
    seed: int,
    difficulty: int | Sequence[int] = 1,
    split: str = "train",
    size: int = 64,
    start: int = 0,
) -> list[dict[str, Any]]:
    """``n`` records of ``family`` (indices ``start .. start+n-1``).

    ``difficulty`` is 1, 2 or 3, or a sequence of them to draw from per record (a mixture).
    ``size`` is the side of the square images in pixels.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; registered: {sorted(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    levels = (difficulty,) if isinstance(difficulty, int) else tuple(difficulty)
    if not levels or any(d not in DIFFICULTIES for d in levels):
        raise ValueError(f"difficulty must be in {DIFFICULTIES} (or a sequence of them), got {difficulty!r}")
    fam = FAMILIES[family]
    records = []
    for i in range(start, start + n):
        rng = rng_for(family, split, seed, i, difficulty if isinstance(difficulty, int) else None)
        d = levels[0] if len(levels) == 1 else rng.choice(levels)
        s = fam.make(rng, d, size)
        records.append(_record(fam, s, f"{family}-{split}-{seed}-{i}", split, d))
    return records


def _record(fam: Family, s: Sample, rid: str, split: str, difficulty: int) -> dict[str, Any]:
    messages = [dict(m) for m in s.prompt]
    if s.target is not None:
        messages.append({"role": "assistant", "content": s.target})
    rec: dict[str, Any] = {
        "id": rid,
        "task": fam.name,
        "split": split,
        "images": list(s.images),
        "messages": messages,
    }
    answer = s.answer
    if answer is None and split == "eval" and fam.kind == "pretrain":
        answer = s.target  # the dataset contract: every eval record has an answer (the reference text)
    if answer is not None:
        rec["answer"] = answer
    reward = s.reward if s.reward is not None else (fam.reward if fam.kind == "verifiable" else None)
    if reward is not None:
        rec["reward"] = reward
    if s.chosen is not None:
        rec["chosen"] = s.chosen
    if s.rejected is not None:
        rec["rejected"] = s.rejected
    rec["difficulty"] = difficulty
    rec["meta"] = dict(s.meta)
    return rec


def content_hash(record: dict[str, Any], image_root: str | Path | None = None) -> str:
    """SHA-256 over task, the non-assistant messages and the images' pixels.

    Two records that pose the same question about the same pixels hash equal, whatever their id,
    split or targets (records with no prompt, like ``text`` passages, hash their assistant turn).
    Images may be PIL images or paths (relative ones resolved against
    ``image_root``), so written datasets hash the same as freshly generated records.
    """
    h = hashlib.sha256()
    # A text passage has no prompt: its content is the assistant turn, so hash that instead.
    prompt = [m for m in record["messages"] if m["role"] != "assistant"] or record["messages"]
    h.update(json.dumps([record["task"], prompt], sort_keys=True, ensure_ascii=False).encode())
    for im in record.get("images", []):
        if not isinstance(im, Image.Image):
            path = Path(im)
            if image_root is not None and not path.is_absolute():
                path = Path(image_root) / path
            with Image.open(path) as opened:
                im = opened.convert("RGB")
        elif im.mode != "RGB":
            im = im.convert("RGB")
        h.update(f"{im.width}x{im.height}".encode())
        h.update(im.tobytes())
    return h.hexdigest()


# Importing the family modules registers them (they import this module, so this comes last).
MODULES = (
    "perception_count",
    "perception_attr",
    "ocr",
    "grounding",
    "chart",
    "text_math",
    "mm_math",
    "caption",
    "chat",
    "text",
    "preference",
)
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "FAMILIES",
    "Family",
    "Sample",
    "content_hash",
    "final_answer",
    "generate",
    "register_family",
    "sample",
    "think",
    "user",
]
