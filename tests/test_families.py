"""The synthetic data families: record contract, determinism, and that images say what answers claim.

Checks read the pixels back independently of the generator where they can (connected components
for counts, shape classes by fill ratio, bitmap-font decoding for OCR, bar heights for charts).
"""

from __future__ import annotations

import io
import re
from collections import deque
from statistics import mean

import numpy as np
import pytest
from PIL import Image

from step3vl.data import render
from step3vl.data.families import (
    FAMILIES,
    REWARDS,
    THINK_END,
    THINK_START,
    content_hash,
    final_answer,
    generate,
)

ALL = sorted(FAMILIES)
EXPECTED = {
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
}
N = 40


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def frozen(records: list[dict]) -> list[dict]:
    """Records with images replaced by their PNG bytes (comparable with ==)."""
    return [{**r, "images": [png(im) for im in r["images"]]} for r in records]


def components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(comp)
    return out


def colour_mask(img: Image.Image, colour: str | tuple[int, int, int] | list[int]) -> np.ndarray:
    """Pixels of exactly ``colour`` (a palette name or an RGB triple)."""
    rgb = render.PALETTE[colour] if isinstance(colour, str) else tuple(colour)
    return (np.asarray(img) == np.array(rgb, dtype=np.uint8)).all(axis=-1)


def classify(comp: list[tuple[int, int]]) -> str:
    """Shape of a component from how much of its bounding box it fills."""
    ys, xs = zip(*comp, strict=True)
    fill = len(comp) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"


def decode_bitmap(img: Image.Image, box: list[int], n_lines: int, ink: str | list[int]) -> str:
    """Read bitmap-font text back from the pixels by sampling each glyph cell's centres."""
    x1, y1, x2, y2 = box
    scale = (y2 - y1) // (n_lines * (render.GLYPH_H + 2) - 2)
    mask = colour_mask(img, ink)
    lookup = {rows: ch for ch, rows in render._GLYPHS.items() if ch != " "}
    out = []
    cols = ((x2 - x1) // scale + 1) // (render.GLYPH_W + 1)
    for line in range(n_lines):
        for j in range(cols):
            gx, gy = x1 + j * (render.GLYPH_W + 1) * scale, y1 + line * (render.GLYPH_H + 2) * scale
            rows = tuple(
                "".join(
                    "#" if mask[gy + r * scale + scale // 2, gx + c * scale + scale // 2] else "." for c in range(5)
                )
                for r in range(7)
            )
            if rows != (".....",) * 7:
                out.append(lookup.get(rows, "?"))
    return "".join(out)


# --------------------------------------------------------------------------- contract


def test_registry_has_the_families():
    assert set(FAMILIES) == EXPECTED
    for fam in FAMILIES.values():
        assert fam.description, fam.name
        if fam.kind == "verifiable":
            assert fam.reward in REWARDS


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_record_contract(family, difficulty):
    recs = generate(family, N, seed=3, difficulty=difficulty, split="eval")
    fam = FAMILIES[family]
    assert len({r["id"] for r in recs}) == N
    for r in recs:
        assert r["id"].startswith(f"{family}-eval-3-")
        assert r["task"] == family and r["split"] == "eval" and r["difficulty"] == difficulty
        assert all(m["role"] in ("system", "user", "assistant") for m in r["messages"])
        n_tokens = sum(m["content"].count("<image>") for m in r["messages"] if m["role"] == "user")
        assert n_tokens == len(r["images"])
        assert sum(m["content"].count("<image>") for m in r["messages"] if m["role"] != "user") == 0
        for im in r["images"]:
            assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 64)
        if fam.modality == "image":
            assert r["images"], r["id"]
        if fam.modality == "text":
            assert not r["images"], r["id"]
        if fam.kind == "preference":
            assert r["messages"][-1]["role"] == "user"
            assert r["chosen"] != r["rejected"]
            assert "answer" in r and "reward" not in r
        else:
            assert r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"]
        if fam.kind == "verifiable":
            target = r["messages"][-1]["content"]
            assert r["reward"] in REWARDS
            assert final_answer(target) == r["answer"] and r["answer"]
            if THINK_END in target:
                assert target.startswith(THINK_START) and target.count(THINK_END) == 1
        if fam.kind == "pretrain":  # eval records carry the reference text as their answer
            assert r["answer"] == r["messages"][-1]["content"] and "reward" not in r
        # short conversations: the tiny model's context is small
        assert sum(len(m["content"]) for m in r["messages"]) < 200


def test_pretrain_train_records_have_no_answer():
    for family in ("caption", "text"):
        assert all("answer" not in r and "reward" not in r for r in generate(family, 10, seed=0))


def test_final_answer():
    assert final_answer("<think>37 + 45 = 82</think>82") == "82"
    assert final_answer("<think>a</think>b</think>c") == "c"
    assert final_answer("plain") == "plain"


@pytest.mark.parametrize("family", ALL)
def test_deterministic_and_prefix_stable(family):
    a = frozen(generate(family, 12, seed=7, difficulty=[1, 2, 3]))
    b = frozen(generate(family, 12, seed=7, difficulty=[1, 2, 3]))
    assert a == b
    assert frozen(generate(family, 5, seed=7, difficulty=[1, 2, 3])) == a[:5]
    assert frozen(generate(family, 4, seed=7, difficulty=[1, 2, 3], start=8)) == a[8:]
    # a mixture really mixes
    assert len({r["difficulty"] for r in a}) > 1


@pytest.mark.parametrize("family", ALL)
def test_seed_and_split_change_content(family):
    base = generate(family, 20, seed=0, difficulty=2)
    for other in (generate(family, 20, seed=1, difficulty=2), generate(family, 20, seed=0, difficulty=2, split="eval")):
        same = sum(content_hash(x) == content_hash(y) for x, y in zip(base, other, strict=True))
        assert same <= 2, family


def test_bad_arguments():
    with pytest.raises(KeyError):
        generate("nope", 1, 0)
    with pytest.raises(ValueError):
        generate("ocr", 1, 0, difficulty=4)
    with pytest.raises(ValueError):
        generate("ocr", 1, 0, split="test")


def test_content_hash(tmp_path):
    r = generate("ocr", 1, seed=0, difficulty=2)[0]
    h = content_hash(r)
    # id, split and the assistant turn do not matter; the question and the pixels do
    assert content_hash({**r, "id": "x", "split": "eval", "messages": r["messages"][:1]}) == h
    img = r["images"][0].copy()
    img.putpixel((0, 0), (1, 2, 3))
    assert content_hash({**r, "images": [img]}) != h
    q = [{"role": "user", "content": r["messages"][0]["content"] + "!"}]
    assert content_hash({**r, "messages": q}) != h
    # a written record (image saved as PNG, relative path) hashes like the in-memory one
    (tmp_path / "images").mkdir()
    r["images"][0].save(tmp_path / "images" / "a.png")
    assert content_hash({**r, "images": ["images/a.png"]}, image_root=tmp_path) == h


def test_size_parameter():
    for family in ("perception_count", "ocr", "grounding", "chart", "caption", "mm_math"):
        for r in generate(family, 5, seed=0, difficulty=3, size=96):
            assert r["images"][0].size == (96, 96)


# --------------------------------------------------------------------------- variety


VARIETY_TRAIN, VARIETY_EVAL = 600, 200


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_records_are_varied_and_disjoint_from_eval(family, difficulty):
    """The data stage drops train records whose content hash is in the eval set, so a level with
    little variety would lose much of its train set (and the eval would test memorisation):
    >= 95 % of 600 train records are distinct and <= 5 % of them also occur in a 200-record eval set."""
    train = [content_hash(r) for r in generate(family, VARIETY_TRAIN, seed=1, difficulty=difficulty)]
    ev = {content_hash(r) for r in generate(family, VARIETY_EVAL, seed=2, difficulty=difficulty, split="eval")}
    unique, in_eval = len(set(train)), sum(h in ev for h in train)
    assert unique >= 0.95 * VARIETY_TRAIN, (family, difficulty, unique)
    assert in_eval <= 0.05 * VARIETY_TRAIN, (family, difficulty, in_eval)


def test_easy_text_inks_and_papers_contrast():
    """Level-1 inks are near-black and papers near-white: the variety costs no legibility."""

    def lum(rgb):
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

    assert all(lum(c) < 30 for c in render.INKS.values())
    assert all(lum(c) > 230 for c in render.PAPERS.values())


def test_mm_math_easy_digits_stay_apart():
    """Level-1 digits move, but never towards each other: "6 4" must not read as 64."""
    for r in generate("mm_math", 100, seed=0, difficulty=1):
        ink = (np.asarray(r["images"][0].convert("L")) < 128).any(axis=0)
        xs = np.flatnonzero(ink)
        gaps = np.diff(xs)
        assert gaps.max() >= 10, r["id"]  # 10 px at 64 (2.5 glyph units), as when centred
        left, right = xs[: gaps.argmax() + 1], xs[gaps.argmax() + 1 :]
        assert left.max() < 32 <= right.min(), r["id"]


# --------------------------------------------------------------------------- difficulty


def _mean(family, d, fn, n=150):
    return mean(fn(r) for r in generate(family, n, seed=11, difficulty=d))


@pytest.mark.parametrize(
    ("family", "measure"),
    [
        ("text_math", lambda r: r["messages"][-1]["content"].count("=") + r["messages"][-1]["content"].count("*")),
        ("perception_count", lambda r: len(r["meta"]["objects"])),
        ("ocr", lambda r: len(r["answer"])),
        ("chart", lambda r: len(r["meta"]["values"])),
        ("grounding", lambda r: len(r["meta"]["objects"])),
        ("mm_math", lambda r: r["messages"][-1]["content"].count("=") + r["messages"][-1]["content"].count("*")),
        ("perception_attr", lambda r: len(r["meta"]["objects"])),
        ("text", lambda r: len(r["messages"][-1]["content"])),
        ("chat", lambda r: len(r["messages"][-1]["content"])),
    ],
)
def test_difficulty_shifts_distribution(family, measure):
    m1, m2, m3 = (_mean(family, d, measure) for d in (1, 2, 3))
    assert m1 < m2 < m3 or (m1 < m3 and m2 < m3), (family, m1, m2, m3)


def test_text_math_levels():
    easy = generate("text_math", 50, seed=0, difficulty=1)
    for r in easy:
        a, b = map(int, re.findall(r"\d+", r["messages"][0]["content"]))
        assert 10 <= a <= 99 and 10 <= b <= 99 and int(r["answer"]) == a + b
    hard = generate("text_math", 50, seed=0, difficulty=3)
    assert all("*" in r["messages"][-1]["content"] for r in hard)
    assert all(int(r["answer"]) >= 0 for r in generate("text_math", 200, seed=0, difficulty=2))


# --------------------------------------------------------------------------- pixels agree with answers


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_counts_match_pixels(difficulty):
    for r in generate("perception_count", 60, seed=5, difficulty=difficulty):
        img, query = r["images"][0], r["meta"]["query"]
        found = []
        for colour in render.PALETTE:
            for comp in components(colour_mask(img, colour)):
                found.append((classify(comp), colour))
        # every drawn object is one component, and its shape is recognisable from pixels
        assert sorted(found) == sorted((o["shape"], o["colour"]) for o in r["meta"]["objects"]), r["id"]
        want = sum((query["colour"] in (None, c)) and (query["shape"] in (None, s)) for s, c in found)
        assert r["answer"] == str(want), r["id"]


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_grounding_box_covers_object(difficulty):
    for r in generate("grounding", 60, seed=2, difficulty=difficulty):
        img = r["images"][0]
        x1, y1, x2, y2 = map(int, re.fullmatch(r"\[(\d+),(\d+),(\d+),(\d+)\]", r["answer"]).groups())
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
        q = re.search(r"Find the (\w+) (\w+)\.", r["messages"][0]["content"])
        colour, shape = q.groups()
        comps = [c for c in components(colour_mask(img, colour)) if classify(c) == shape]
        assert len(comps) == 1, r["id"]  # the named object is unique
        ys, xs = zip(*comps[0], strict=True)
        assert (min(xs), min(ys), max(xs) + 1, max(ys) + 1) == (x1, y1, x2, y2), r["id"]
        # nothing else inside the box: only the object's colour and background
        inside = np.asarray(img)[y1:y2, x1:x2].reshape(-1, 3)
        allowed = {render.PALETTE[colour], render.BACKGROUNDS["white"]}
        assert {tuple(p) for p in inside} <= allowed, r["id"]


def test_attr_answers_match_objects():
    for d in (1, 2, 3):
        for r in generate("perception_attr", 60, seed=4, difficulty=d):
            objs = r["meta"]["objects"]
            t = objs[r["meta"]["target"]]
            word = r["meta"]["options"][r["answer"]] if r["reward"] == "choice" else r["answer"]
            assert word == (t["colour"] if r["meta"]["attribute"] == "colour" else t["shape"])
            areas = [(o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]) for o in objs]
            px_areas = [colour_mask(r["images"][0], o["colour"]).sum() for o in objs]
            sel = r["meta"]["selector"]
            if sel == "largest":
                assert px_areas[r["meta"]["target"]] == max(px_areas) and areas[r["meta"]["target"]] == max(areas)
            if sel == "smallest":
                assert px_areas[r["meta"]["target"]] == min(px_areas)
            if sel == "by_shape":
                assert [o["shape"] for o in objs].count(t["shape"]) == 1
    assert any(r["reward"] == "choice" for r in generate("perception_attr", 60, seed=4, difficulty=3))


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_ocr_image_reads_as_answer(difficulty):
    recs = generate("ocr", 60, seed=9, difficulty=difficulty)
    for r in recs:
        img, meta = r["images"][0], r["meta"]
        lum = np.asarray(img.convert("L"))
        assert (lum < 128).sum() > 40, r["id"]  # dark ink on a light background
        assert "".join(meta["lines"]) == r["answer"]
        if meta["font"] == "bitmap":
            assert decode_bitmap(img, meta["box"], len(meta["lines"]), meta["ink"]) == r["answer"], r["id"]
    if difficulty == 1:
        assert all(re.fullmatch(r"\d\d", r["answer"]) for r in recs)
    if difficulty == 3:
        assert {r["meta"]["font"] for r in recs} == {"bitmap", "default"}


def test_easy_digits_survive_2x_downscale():
    """At the 32-pixel global view, easy digits must still have solid dark strokes."""
    for family in ("ocr", "mm_math"):
        for r in generate(family, 30, seed=1, difficulty=1):
            small = np.asarray(r["images"][0].resize((32, 32), Image.BILINEAR).convert("L"))
            assert (small < 64).sum() >= 15, r["id"]


def test_chart_bar_heights_match_values():
    for d in (1, 2, 3):
        for r in generate("chart", 40, seed=6, difficulty=d):
            img = np.asarray(r["images"][0])
            heights = []
            for x1, y1, x2, y2 in r["meta"]["bars"]:
                col = img[:, (x1 + x2) // 2]
                bar = col[y1:y2]
                assert (bar == bar[0]).all() and tuple(bar[0]) in render.PALETTE.values()
                assert tuple(col[y1 - 1]) != tuple(bar[0])  # the bar ends where the box says
                heights.append(y2 - y1)
            vals = r["meta"]["values"]
            unit = heights[0] / vals[0]
            assert all(h == v * unit for h, v in zip(heights, vals, strict=True)), r["id"]
            if r["meta"]["question"] == "value":
                label = re.search(r"bar (\w)\?", r["messages"][0]["content"]).group(1)
                assert r["answer"] == str(vals[r["meta"]["labels"].index(label)])


def test_mm_math_answers():
    for d in (1, 2, 3):
        for r in generate("mm_math", 60, seed=8, difficulty=d):
            nums, q, ans = r["meta"]["numbers"], r["messages"][0]["content"], int(r["answer"])
            if "plus the sum" in q:
                assert ans == r["meta"]["operand"] + sum(nums)
            elif "minus the sum" in q:
                assert ans == r["meta"]["operand"] - sum(nums) >= 0
            elif "sum" in q:
                assert ans == sum(nums)
            elif "first two" in q:
                assert ans == nums[0] * nums[1] + nums[2]
            else:
                shapes = sum(len(components(colour_mask(r["images"][0], c))) for c in render.PALETTE if c != "black")
                assert ans == nums[0] * shapes == nums[0] * len(r["meta"]["objects"])
            assert (np.asarray(r["images"][0].convert("L")) < 128).any()


def test_caption_names_every_object():
    for d in (1, 2, 3):
        for r in generate("caption", 40, seed=3, difficulty=d):
            cap = r["messages"][-1]["content"]
            assert cap.endswith("background.") and cap[0].isupper()
            for o in r["meta"].get("objects", []):
                assert f"{o['colour']} {o['shape']}" in cap
                assert colour_mask(r["images"][0], o["colour"]).any()
            if d == 3 and "objects" in r["meta"]:
                xs = [o["box"][0] for o in r["meta"]["objects"]]
                assert xs == sorted(xs)  # left / middle / right in order


def test_chat_answers():
    for r in generate("chat", 200, seed=0, difficulty=3):
        q, a, kind = r["messages"][-2]["content"], r["answer"], r["meta"]["instruction"]
        caps = kind.endswith("+caps")
        if kind.startswith("reverse") and (w := re.search(r"'(\w+)'", q)):
            assert a.lower() == w.group(1)[::-1]
        if kind.startswith("range") and not caps:
            nums = list(map(int, a.split()))
            assert nums[0] == int(re.findall(r"\d+", q)[0]) and nums[-1] == int(re.findall(r"\d+", q)[1])
        if caps:
            assert r["messages"][0]["role"] == "system" and a == a.upper()


def test_preference_pairs():
    recs = generate("preference", 300, seed=1, difficulty=[1, 2, 3])
    kinds = {r["meta"]["rejected_kind"] for r in recs}
    assert kinds == {"wrong", "repetitive", "format", "unanswerable"}
    details = {r["meta"].get("detail") for r in recs}
    assert {"absent_count", "image_unanswerable", "text_unanswerable"} <= details
    for r in recs:
        kind = r["meta"]["rejected_kind"]
        assert final_answer(r["chosen"]) == r["answer"]
        if kind == "wrong":
            assert final_answer(r["rejected"]) != r["answer"]
        if kind == "format":
            assert final_answer(r["rejected"]) != r["answer"]
            assert r["answer"] in r["rejected"] or r["rejected"].endswith(THINK_END)
        if kind == "repetitive":
            assert len(r["rejected"]) > len(final_answer(r["chosen"]))
        if r["meta"].get("detail") == "absent_count":
            colour = re.search(r"How many (\w+) ", r["messages"][0]["content"]).group(1)
            assert not colour_mask(r["images"][0], colour).any()
            assert r["answer"] == "0" and final_answer(r["rejected"]) != "0"
        if r["meta"].get("detail") == "image_unanswerable":
            assert r["chosen"] == "I cannot tell from the image."


def test_glyphs_are_well_formed_and_distinct_at_half_size():
    """Every glyph is 5x7, and the OCR characters stay tellable apart after a 2x downscale."""
    for ch, rows in render._GLYPHS.items():
        assert len(rows) == render.GLYPH_H and all(len(row) == render.GLYPH_W for row in rows), ch
    chars = "0123456789" + render.OCR_LETTERS
    small = {}
    for ch in chars:
        img = Image.new("L", (6 * 4, 8 * 4), 0)
        img.paste(255, (0, 0), render._glyph_mask(ch, 4))
        small[ch] = np.asarray(img.resize((12, 16), Image.BILINEAR), dtype=float) / 255
    for i, a in enumerate(chars):
        for b in chars[i + 1 :]:
            assert np.abs(small[a] - small[b]).sum() >= 8, (a, b)  # ~8 half-size pixels differ fully
