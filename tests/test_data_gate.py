"""The dataset format (write_dataset / iter_records / resolve_image) and the GE data gate.

Every failure class gets its own small dataset built here with Pillow, and must fail exactly the
check that names it, with the offending record's id (or ``shard:line`` for unparseable lines)
among the examples.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from step3vl.data.gate import GateFailed, GateReport, content_hash, dataset_hashes, validate_dataset
from step3vl.data.io import (
    DataError,
    UnsafeImageRef,
    iter_records,
    parse_line,
    resolve_image,
    write_dataset,
)
from step3vl.data.schema import RECORD_SCHEMA, fast_check, record_validator, schema_errors

SHARD = "data-00000.jsonl"


# --------------------------------------------------------------------------- helpers


def image(seed: int, size: int = 16) -> Image.Image:
    img = Image.new("RGB", (size, size), (seed * 40 % 256, 80, 160))
    img.putpixel((seed % size, 0), (255, 255, 255))
    return img


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def record(i: int, **overrides: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": f"rec-{i}",
        "task": "vqa",
        "split": "train",
        "images": [image(i)],
        "messages": [
            {"role": "user", "content": f"<image>\nWhat colour is square {i}?"},
            {"role": "assistant", "content": "blue"},
        ],
        "answer": "blue",
    }
    rec.update(overrides)
    return rec


def text_record(i: int, **overrides: Any) -> dict[str, Any]:
    """A record without images (so it needs no <image> tag)."""
    messages = [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": str(2 * i)},
    ]
    return record(i, images=[], messages=messages, answer=str(2 * i), **overrides)


def clean_records() -> list[dict[str, Any]]:
    return [
        record(0),
        record(1, meta={"source": "synthetic"}, difficulty=2),
        record(  # a system turn, two images (one inline), and a preference pair
            2,
            images=[image(2), png_data_uri(image(3))],
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "<image> and <image>: same colour?"},
                {"role": "assistant", "content": "yes"},
            ],
            chosen="yes",
            rejected="no",
        ),
        record(3, split="eval", reward="exact_match"),
        text_record(4),
    ]


def make(tmp_path: Path, records: list[dict[str, Any]], name: str = "ds", **kw: Any) -> Path:
    out = tmp_path / name
    write_dataset(out, records, **kw)
    return out


def append_lines(dataset: Path, *lines: bytes) -> None:
    with (dataset / SHARD).open("ab") as f:
        for line in lines:
            f.write(line + b"\n")


def raw_line(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec).encode()


def assert_only_failure(report: GateReport, check: str, example: str) -> None:
    failed = [c.name for c in report.failed_checks]
    assert failed == [check], report.to_markdown()
    assert example in report.check(check).example_ids, report.to_markdown()
    assert not report.passed


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few hundred bytes whose header declares width x height pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- clean dataset


def test_clean_dataset_passes(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    report = validate_dataset(ds, require_answer=True, max_tokens=100, token_len=len, forbidden_hashes=set())
    assert report.passed, report.to_markdown()
    assert report.n_records == 5
    assert {c.name for c in report.checks} >= {
        "parse", "schema", "unique_ids", "messages_non_empty", "no_empty_turns", "image_tags_match",
        "image_paths_safe", "images_decode", "answers_present", "token_length", "no_split_leakage",
    }  # fmt: skip
    report.raise_if_failed()
    assert json.loads(report.to_json())["passed"] is True
    assert "PASSED" in report.to_markdown()


def test_optional_checks_only_run_when_asked(tmp_path: Path) -> None:
    report = validate_dataset(make(tmp_path, clean_records()))
    names = {c.name for c in report.checks}
    assert "token_length" not in names and "no_split_leakage" not in names
    with pytest.raises(ValueError, match="go together"):
        validate_dataset(tmp_path / "ds", max_tokens=10)


def test_empty_dataset_fails(tmp_path: Path) -> None:
    report = validate_dataset(make(tmp_path, []))
    assert [c.name for c in report.failed_checks] == ["has_records"]
    assert report.check("has_records").details == ["observed: 0"]
    assert "- observed: 0" in report.to_markdown()


def test_not_a_dataset_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \*\.jsonl shards"):
        validate_dataset(tmp_path)


# --------------------------------------------------------------------------- failure classes


def test_missing_image_file(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    append_lines(ds, raw_line(record(9, images=["images/nope.png"])))
    report = validate_dataset(ds)
    assert_only_failure(report, "images_decode", "rec-9")
    assert "file not found" in report.check("images_decode").details[0]


def test_undecodable_image(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    (ds / "images" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    truncated = io.BytesIO()
    image(7, size=64).save(truncated, format="PNG")
    (ds / "images" / "truncated.png").write_bytes(truncated.getvalue()[:-40])
    append_lines(
        ds,
        raw_line(record(9, images=["images/garbage.png"])),
        raw_line(record(10, images=["images/truncated.png"])),
        raw_line(record(11, images=["data:image/png;base64,!!!notbase64"])),
    )
    report = validate_dataset(ds)
    assert_only_failure(report, "images_decode", "rec-9")
    assert set(report.check("images_decode").example_ids) == {"rec-9", "rec-10", "rec-11"}


def test_image_tag_count_mismatch(tmp_path: Path) -> None:
    two_images = record(9, images=[image(1), image(2)])  # one <image> tag, two images
    ds = make(tmp_path, [*clean_records(), two_images])
    report = validate_dataset(ds)
    assert_only_failure(report, "image_tags_match", "rec-9")
    assert report.check("image_tags_match").details == ["1 <image> tag(s) but 2 image(s)"]


def test_image_tags_in_assistant_turns_do_not_count(tmp_path: Path) -> None:
    rec = record(9, images=[], messages=[
        {"role": "user", "content": "Describe."},
        {"role": "assistant", "content": "I see no <image> here."},
    ])  # fmt: skip
    assert validate_dataset(make(tmp_path, [rec])).passed


def test_duplicate_id_across_shards(tmp_path: Path) -> None:
    recs = [record(i) for i in range(4)]
    recs.append(text_record(5, id="rec-1"))
    ds = make(tmp_path, recs, shard_size=2)
    assert len(list(ds.glob("*.jsonl"))) == 3
    report = validate_dataset(ds, workers=1)
    assert_only_failure(report, "unique_ids", "rec-1")
    assert report.check("unique_ids").failing_rows == 2
    # each copy is named where it is: the same id twice says nothing of where to look
    first, second = sorted(ds.glob("*.jsonl"))[0].name, sorted(ds.glob("*.jsonl"))[2].name
    assert report.check("unique_ids").details == [f"id 'rec-1' appears more than once: this copy is {first}:2",
                                                  f"id 'rec-1' appears more than once: this copy is {second}:1"]


def test_a_set_judged_in_parts_gets_the_verdict_of_the_whole(tmp_path: Path) -> None:
    """Each shard a part (check_part), the set judged from them (check_set): the same report as one frame, and the
    same unique_ids as Great Expectations' own expectation over the whole frame (every row of a repeated id fails,
    rows without one are skipped), also when the digests are compared a few at a time."""
    import great_expectations.expectations as gxe
    import pandas as pd

    from step3vl.data import gate

    recs = [text_record(i) for i in range(14)]
    recs[3] = text_record(3, id="rec-1")  # the same shard as rec-1 (3 per shard)
    recs[8] = text_record(8, id="rec-1")  # and another shard
    recs[11] = text_record(11, id="rec-9")
    for i in (5, 7, 10, 13):  # a failing row-level check in several parts: more rows than examples
        blank = [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]
        recs[i] = record(i, images=[], messages=blank)
    ds = make(tmp_path, recs, shard_size=3)
    append_lines(ds, b"not json")
    shards = sorted(p.name for p in ds.glob("*.jsonl"))
    assert len(shards) == 5
    whole = validate_dataset(ds, max_examples=3, max_tokens=30, token_len=len, workers=1)
    frames = [gate.scan_dataset(ds, shards=[s], token_len=len, workers=1) for s in shards]
    read = []

    def rows(k: int):
        def f():
            read.append(k)
            return frames[k]
        return f

    parts = [gate.PartGate(gate.check_part(df, str(ds), max_tokens=30, max_examples=3), gate.id_digests(df["id"]),
                           rows(k)) for k, df in enumerate(frames)]
    joined = gate.check_set(str(ds), parts, max_examples=3, chunk=2)
    assert joined.checks == whole.checks and joined.n_records == whole.n_records == 15
    assert [c.name for c in joined.failed_checks] == ["parse", "unique_ids", "no_empty_turns"]
    assert joined.check("no_empty_turns").failing_rows == 4
    assert joined.check("no_empty_turns").example_ids == ["rec-5", "rec-7", "rec-10"]
    assert joined.check("unique_ids").example_ids == ["rec-1", "rec-1", "rec-1"]
    assert sorted(read) == [0, 1, 2, 3]  # the part holding no repeated id is not read again
    frame = pd.concat(frames, ignore_index=True)
    check = gate._Check("unique_ids", "", lambda: gxe.ExpectColumnValuesToBeUnique(column="id"), lambda r: "")
    ge = gate._check_result(check, gate._run_suite(frame, [check])["unique_ids"], frame, 10)
    assert ge.failing_rows == joined.check("unique_ids").failing_rows == 5
    assert ge.example_ids == ["rec-1", "rec-1", "rec-1", "rec-9", "rec-9"]  # rows in order; joined: the first 3
    assert json.loads(GateReport.from_json(joined.to_json()).to_json()) == json.loads(joined.to_json())


def test_check_set_reads_ids_back_before_calling_them_repeated(tmp_path: Path) -> None:
    """Two ids that share a 64-bit digest are not repeated; digests at the ends of the range are compared."""
    import numpy as np
    import pandas as pd

    from step3vl.data import gate

    top = np.uint64(2**64 - 1)
    assert list(gate._repeated_digests([np.array([0, 5, top], np.uint64), np.array([top], np.uint64)], chunk=1)) \
        == [top]
    report = GateReport("p", True, 1, [], 0.0)
    parts = [gate.PartGate(report, np.array([7], np.uint64), lambda i=i: pd.DataFrame(
        {"id": [f"id-{i}"], "shard": ["s"], "line_no": [1]})) for i in range(2)]
    result = gate.check_set("p", parts)
    assert result.passed and result.check("unique_ids").failing_rows == 0
    with pytest.raises(ValueError, match="at least one part"):
        gate.check_set("p", [])


def test_empty_assistant_turn(tmp_path: Path) -> None:
    rec = record(9, messages=[
        {"role": "user", "content": "<image> What is it?"},
        {"role": "assistant", "content": "  \n"},
    ])  # fmt: skip
    report = validate_dataset(make(tmp_path, [*clean_records(), rec]))
    assert_only_failure(report, "no_empty_turns", "rec-9")


def test_no_messages(tmp_path: Path) -> None:
    report = validate_dataset(make(tmp_path, [*clean_records(), record(9, images=[], messages=[])]))
    assert_only_failure(report, "messages_non_empty", "rec-9")


def test_missing_answer_when_required(tmp_path: Path) -> None:
    no_answer = record(9)
    del no_answer["answer"]
    ds = make(tmp_path, [*clean_records(), no_answer, record(10, answer=" ")])
    assert validate_dataset(ds).passed  # an SFT train set needs no answers
    report = validate_dataset(ds, require_answer=True)
    assert_only_failure(report, "answers_present", "rec-9")
    assert set(report.check("answers_present").example_ids) == {"rec-9", "rec-10"}


def test_eval_records_always_need_an_answer(tmp_path: Path) -> None:
    no_answer = record(9, split="eval")
    del no_answer["answer"]
    report = validate_dataset(make(tmp_path, [*clean_records(), no_answer]))
    assert_only_failure(report, "answers_present", "rec-9")


def test_non_utf8_bytes_in_shard(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    append_lines(ds, raw_line(text_record(9)).replace(b"What", b"Wh\xff\xfeat"))
    report = validate_dataset(ds)
    assert_only_failure(report, "parse", f"{SHARD}:6")
    assert "not valid UTF-8" in report.check("parse").details[0]


def test_invalid_json(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    append_lines(ds, b'{"id": "rec-9", "task": "vqa",', b"[1, 2]", b"", b'{"id": "x", "n": NaN}')
    report = validate_dataset(ds)
    assert_only_failure(report, "parse", f"{SHARD}:6")
    check = report.check("parse")
    assert check.failing_rows == 4
    assert check.example_ids == [f"{SHARD}:{n}" for n in (6, 7, 8, 9)]
    assert "invalid JSON" in check.details[0] and "not an object" in check.details[1]
    assert "blank line" in check.details[2] and "NaN" in check.details[3]


def test_duplicate_json_keys(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    line = raw_line(text_record(9)).replace(b'"split": "train"', b'"split": "eval", "split": "train"')
    nested = raw_line(text_record(10, meta={"a": 1})).replace(b'{"a": 1}', b'{"a": 1, "a": 2}')
    append_lines(ds, line, nested)
    report = validate_dataset(ds)
    assert_only_failure(report, "parse", f"{SHARD}:6")
    assert report.check("parse").details == ["duplicate JSON key 'split'", "duplicate JSON key 'a'"]


@pytest.mark.parametrize(
    "ref", ["../../etc/passwd", "/etc/passwd", "images/../../outside.png", "C:/x.png", "file:///etc/passwd"]
)
def test_unsafe_image_paths(tmp_path: Path, ref: str) -> None:
    ds = make(tmp_path, clean_records())
    append_lines(ds, raw_line(record(9, images=[ref])))
    report = validate_dataset(ds)
    assert_only_failure(report, "image_paths_safe", "rec-9")
    with pytest.raises(UnsafeImageRef) as err:
        resolve_image(ds, ref, record_id="rec-9")
    assert "rec-9" in str(err.value) and ref in str(err.value)


def test_symlink_escaping_the_dataset(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    image(1).save(outside)
    ds = make(tmp_path, clean_records())
    os.symlink(outside, ds / "images" / "link.png")
    os.symlink(ds / "images", ds / "alias")  # a symlink that stays inside is fine
    first = next(p for p in (ds / "images").iterdir() if p.name.startswith("rec-0"))
    append_lines(
        ds,
        raw_line(record(9, images=["images/link.png"])),
        raw_line(record(10, images=[f"alias/{first.name}"])),
    )
    report = validate_dataset(ds)
    assert_only_failure(report, "image_paths_safe", "rec-9")
    assert report.check("image_paths_safe").failing_rows == 1


def test_decompression_bomb_png(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    bomb = bomb_png(30000, 30000)
    assert len(bomb) < 2000
    (ds / "images" / "bomb.png").write_bytes(bomb)
    (ds / "images" / "big.png").write_bytes(bomb_png(8000, 8000))  # under Pillow's limit, over ours
    uri = "data:image/png;base64," + base64.b64encode(bomb).decode()
    append_lines(
        ds,
        raw_line(record(9, images=["images/bomb.png"])),
        raw_line(record(10, images=["images/big.png"])),
        raw_line(record(11, images=[uri])),
    )
    report = validate_dataset(ds)
    assert_only_failure(report, "images_decode", "rec-9")
    details = report.check("images_decode").details
    assert len(details) == 3 and all("pixel" in d for d in details)
    with pytest.raises(DataError, match="pixel"):
        resolve_image(ds, "images/big.png")
    assert resolve_image(ds, "images/big.png", max_pixels=8000 * 8000 + 1).size == (8000, 8000)


def test_ten_megabyte_line_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    huge = record(9, images=[], messages=[{"role": "user", "content": "x" * (10 << 20)}])
    append_lines(ds, raw_line(huge), raw_line(text_record(10)))
    tracemalloc.start()
    try:
        rows = list(iter_records(ds))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20, f"peak {peak} bytes: the 10 MB line was read whole"
    assert rows[5].error is not None and "over the 1048576-byte limit" in rows[5].error
    assert rows[6].record is not None and rows[6].record["id"] == "rec-10"  # reading resumes after it
    report = validate_dataset(ds)
    assert_only_failure(report, "parse", f"{SHARD}:6")


def test_token_length_over_the_limit(tmp_path: Path) -> None:
    long = record(9, messages=[
        {"role": "user", "content": "<image> " + "word " * 50},
        {"role": "assistant", "content": "ok"},
    ])  # fmt: skip
    ds = make(tmp_path, [*clean_records(), long])
    report = validate_dataset(ds, max_tokens=30, token_len=lambda text: len(text.split()))
    assert_only_failure(report, "token_length", "rec-9")
    assert report.check("token_length").details == ["52 tokens > 30"]  # 51 + "ok"


def test_train_eval_leakage(tmp_path: Path) -> None:
    eval_recs = [record(100 + i, split="eval") for i in range(3)]
    eval_ds = make(tmp_path, eval_recs, name="eval")
    hashes = dataset_hashes(eval_ds)
    assert len(hashes) == 3
    # Same pixels and prompt as an eval record; different id, split, answer and assistant turn.
    leaked = record(101, id="train-copy", answer="red", messages=[
        {"role": "user", "content": "<image>\nWhat colour is square 101?"},
        {"role": "assistant", "content": "red"},
    ])  # fmt: skip
    train_ds = make(tmp_path, [*clean_records(), leaked], name="train")
    report = validate_dataset(train_ds, forbidden_hashes=hashes)
    assert_only_failure(report, "no_split_leakage", "train-copy")
    assert report.check("no_split_leakage").failing_rows == 1


def test_content_hash_is_over_prompt_and_pixels(tmp_path: Path) -> None:
    uri = png_data_uri(image(1))
    a = {**record(1, images=[uri]), "id": "a", "answer": "x"}
    b = {**record(1, images=[image(1)]), "id": "b", "answer": "y", "split": "eval"}
    b["messages"] = [b["messages"][0], {"role": "assistant", "content": "something else"}]
    assert content_hash(a) == content_hash(b)  # a data URI and a PIL image with the same pixels
    assert content_hash(a) != content_hash({**a, "task": "ocr"})
    assert content_hash(a) != content_hash({**a, "images": [image(2)]})
    ds = make(tmp_path, [b])
    (written,) = iter_records(ds)
    assert written.record is not None
    assert content_hash(written.record, ds) == content_hash(b) == next(iter(dataset_hashes(ds)))
    with pytest.raises(ValueError, match="dataset_dir"):
        content_hash(written.record)


def test_schema_violation(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records())
    append_lines(
        ds,
        raw_line(text_record(9, split="test")),
        raw_line(text_record(10, extra_field=1)),
        raw_line(text_record(11, chosen="a")),  # chosen without rejected
    )
    report = validate_dataset(ds)
    assert_only_failure(report, "schema", "rec-9")
    details = report.check("schema").details
    assert details[0].startswith("split: 'test' is not one of")
    assert "extra_field" in details[1] and "rejected" in details[2]


def test_report_names_check_rows_and_ids(tmp_path: Path) -> None:
    ds = make(tmp_path, [*clean_records(), record(9, images=[image(1), image(2)])])
    report = validate_dataset(ds)
    md = report.to_markdown()
    assert "FAILED" in md and "| image_tags_match | FAIL | 1 | `rec-9` |" in md
    data = json.loads(report.to_json())
    failing = [c for c in data["checks"] if not c["passed"]]
    assert failing == [
        {
            "name": "image_tags_match",
            "passed": False,
            "failing_rows": 1,
            "example_ids": ["rec-9"],
            "description": report.check("image_tags_match").description,
            "details": ["1 <image> tag(s) but 2 image(s)"],
        }
    ]
    with pytest.raises(GateFailed, match="image_tags_match"):
        report.raise_if_failed()


def test_max_examples_caps_the_ids(tmp_path: Path) -> None:
    recs = [record(i, images=[image(i), image(i + 1)]) for i in range(8)]
    report = validate_dataset(make(tmp_path, recs), max_examples=3)
    check = report.check("image_tags_match")
    assert check.failing_rows == 8 and check.example_ids == ["rec-0", "rec-1", "rec-2"]


def test_parallel_scan_matches_serial(tmp_path: Path) -> None:
    recs = [record(i) for i in range(12)]
    recs[7] = record(7, images=[image(1), image(2)])
    ds = make(tmp_path, recs, shard_size=3)

    def words(text: str) -> int:  # a closure: workers must get it without pickling
        return len(text.split()) * scale

    scale = 1
    kw: dict[str, Any] = {"max_tokens": 12, "token_len": words}
    serial = validate_dataset(ds, workers=1, **kw)
    parallel = validate_dataset(ds, workers=2, **kw)
    assert [c.name for c in parallel.failed_checks] == ["image_tags_match"]
    assert parallel.checks == serial.checks
    scale = 2
    assert [c.name for c in validate_dataset(ds, workers=2, **kw).failed_checks] == [
        "image_tags_match", "token_length",
    ]  # fmt: skip


# --------------------------------------------------------------------------- io


def test_write_dataset_is_deterministic(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a = write_dataset(tmp_path / "a", clean_records(), shard_size=2)
    b = write_dataset(tmp_path / "b", clean_records(), shard_size=2)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert a["sha256"] == b["sha256"] and a["shards"] == b["shards"]
    assert a["shards"] == ["data-00000.jsonl", "data-00001.jsonl", "data-00002.jsonl"]
    assert (a["n_records"], a["n_images"]) == (5, 4)  # the data URI stays inline
    first = (tmp_path / "a" / "data-00000.jsonl").read_bytes().split(b"\n")[0]
    assert first.startswith(b'{"answer":"blue","id":"rec-0","images":["images/rec-0-')  # sorted, compact


def test_written_pngs_carry_no_metadata(tmp_path: Path) -> None:
    img = image(1)
    img.info["dpi"] = (300, 300)
    img.encoderinfo = {}
    tagged = io.BytesIO()
    img.save(tagged, format="PNG", dpi=(300, 300))
    with_meta = Image.open(tagged)
    with_meta.load()
    ds = make(tmp_path, [record(0, images=[with_meta])])
    (path,) = (ds / "images").iterdir()
    png = path.read_bytes()
    for chunk in (b"pHYs", b"tEXt", b"iTXt", b"tIME", b"eXIf", b"iCCP"):
        assert chunk not in png
    assert list(Image.open(path).getdata()) == list(img.getdata())


def test_write_dataset_is_atomic(tmp_path: Path) -> None:
    def failing() -> Iterator[dict[str, Any]]:
        yield from clean_records()
        raise RuntimeError("upstream generator died")

    with pytest.raises(RuntimeError, match="generator died"):
        write_dataset(tmp_path / "out", failing(), shard_size=2)
    with pytest.raises(DataError, match="not JSON-serializable"):
        write_dataset(tmp_path / "out", [record(0), record(1, meta={"x": object()})])
    with pytest.raises(DataError, match="line limit"):
        write_dataset(tmp_path / "out", [record(0, answer="x" * (2 << 20))])
    assert list(tmp_path.iterdir()) == []  # no final dir, no leftover temp dir


def test_write_dataset_refuses_to_overwrite(tmp_path: Path) -> None:
    make(tmp_path, clean_records())
    with pytest.raises(FileExistsError, match="immutable"):
        write_dataset(tmp_path / "ds", clean_records())
    with pytest.raises(DataError, match="duplicate id"):
        write_dataset(tmp_path / "dup", [record(0), record(0)])
    assert not (tmp_path / "dup").exists()


def test_iter_records_yields_shard_line_and_record(tmp_path: Path) -> None:
    ds = make(tmp_path, clean_records(), shard_size=3)
    rows = list(iter_records(ds))
    assert [(r.shard, r.line_no) for r in rows] == [
        ("data-00000.jsonl", 1), ("data-00000.jsonl", 2), ("data-00000.jsonl", 3),
        ("data-00001.jsonl", 1), ("data-00001.jsonl", 2),
    ]  # fmt: skip
    assert all(r.error is None and r.record is not None for r in rows)
    assert parse_line(b'{"a": {"b": 1, "b": 2}}') == (None, "duplicate JSON key 'b'")
    assert parse_line(b"[" * 100_000)[1] is not None  # deep nesting is an error, not a crash


def test_resolve_image_data_uris(tmp_path: Path) -> None:
    img = resolve_image(tmp_path, png_data_uri(image(3)))
    assert img.size == (16, 16) and img.format == "PNG"
    jpeg = io.BytesIO()
    image(3).save(jpeg, format="JPEG")
    as_png = "data:image/png;base64," + base64.b64encode(jpeg.getvalue()).decode()
    with pytest.raises(DataError, match="says PNG but the bytes are JPEG"):
        resolve_image(tmp_path, as_png, record_id="r1")
    gif = io.BytesIO()
    image(3).save(gif, format="GIF")
    for ref in ("data:image/gif;base64," + base64.b64encode(gif.getvalue()).decode(), "data:text/plain,hi"):
        with pytest.raises(DataError, match="only data:image/png"):
            resolve_image(tmp_path, ref)
    (tmp_path / "a.gif").write_bytes(gif.getvalue())
    with pytest.raises(DataError, match="not a PNG or JPEG") as err:
        resolve_image(tmp_path, "a.gif", record_id="r7")
    assert err.value.record_id == "r7" and err.value.ref == "a.gif"
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(DataError, match="not a regular file"):
        resolve_image(tmp_path, "fifo.png")
    with pytest.raises(DataError, match="not a regular file"):
        resolve_image(tmp_path, ".")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(DataError, match="over the 1024-byte limit"):
        resolve_image(tmp_path, "big.png", max_bytes=1024)


# --------------------------------------------------------------------------- schema


def test_schema_is_valid_and_compiled() -> None:
    assert RECORD_SCHEMA["$schema"].endswith("2020-12/schema")
    record_validator()  # check_schema passes
    assert fast_check() is not None, "the schema uses a keyword the fast check does not compile"


def _mutations() -> Iterator[Any]:
    base = json.loads(json.dumps({**record(1, images=["images/a.png"]), "meta": {"k": [1]}}))
    yield base
    values: list[Any] = [
        None,
        True,
        0,
        1,
        1.0,
        1.5,
        "",
        "x",
        "eval",
        "user",
        [],
        ["x"],
        [1],
        {},
        {"role": "user"},
    ]
    for key in [*RECORD_SCHEMA["properties"], "unknown"]:
        for value in values:
            yield {**base, key: value}
        yield {k: v for k, v in base.items() if k != key}
    for i in range(len(base["messages"])):
        for field in ("role", "content", "extra"):
            for value in values:
                messages = [dict(m) for m in base["messages"]]
                messages[i][field] = value
                yield {**base, "messages": messages}
    for value in values:
        yield {**base, "images": [value]}
    yield [base]
    yield "record"


def test_fast_check_never_accepts_what_jsonschema_rejects() -> None:
    fast, validator = fast_check(), record_validator()
    assert fast is not None
    n_fast = 0
    for candidate in _mutations():
        if fast(candidate):
            n_fast += 1
            assert validator.is_valid(candidate), candidate
        else:
            assert schema_errors(candidate) == [] or not validator.is_valid(candidate)
    assert n_fast > 20  # it does accept the common valid shapes
    for rec in clean_records():
        as_read = json.loads(json.dumps({**rec, "images": ["images/a.png"] * len(rec["images"])}))
        assert fast(as_read)
