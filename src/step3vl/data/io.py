"""Reading and writing datasets in the step3vl on-disk format.

A dataset is a directory holding one or more ``*.jsonl`` shards (one JSON record per line, see
``schemas/dataset.schema.json``) and an optional ``images/`` folder. Every data-producing stage
writes through :func:`write_dataset`; every consumer reads through :func:`iter_records` and
:func:`resolve_image`, after the data gate (:mod:`step3vl.data.gate`) has passed the dataset.

The reader never trusts its input: bad lines come back as errors instead of exceptions (so the gate
can report them all), and image references are confined to the dataset directory and checked
against byte and pixel budgets before they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final, NamedTuple

from PIL import Image, UnidentifiedImageError

from step3vl.errors import Step3VLError
from step3vl.storage import fsync_dir as _fsync_dir

SHARD_GLOB: Final = "*.jsonl"
IMAGES_DIR: Final = "images"
# A record is a few turns of text plus image references; anything near a megabyte is a bug
# (an inlined video, a runaway generation) and would stall the loaders.
MAX_LINE_BYTES: Final = 1 << 20
MAX_IMAGE_BYTES: Final = 32 << 20
# 50 MP is ~7000x7000: far above what the vision encoder sees after resizing, far below a bomb.
MAX_IMAGE_PIXELS: Final = 50_000_000
PNG_COMPRESS_LEVEL: Final = 6

_DATA_URI = re.compile(r"data:image/(png|jpeg);base64,", re.ASCII)
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-]+")
_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_READ_CHUNK: Final = 1 << 16
# Modes Pillow writes to PNG as-is; others are converted (see _png_bytes).
_PNG_MODES: Final = frozenset({"1", "L", "LA", "I", "I;16", "RGB", "RGBA"})


class DataError(Step3VLError, ValueError):
    """A dataset or record is malformed; the message names the record id and the reference."""

    def __init__(self, message: str, *, record_id: str | None = None, ref: str | None = None):
        super().__init__(message)
        self.record_id = record_id
        self.ref = ref


class UnsafeImageRef(DataError):
    """An image reference points outside the dataset directory or uses a refused scheme."""


class RawRecord(NamedTuple):
    """One line of a shard as read: either ``record`` (a parsed object) or ``error`` is set."""

    shard: str
    line_no: int  # 1-based
    record: dict[str, Any] | None
    error: str | None

    @property
    def where(self) -> str:
        """``shard:line`` — how reports name a line that has no usable id."""
        return f"{self.shard}:{self.line_no}"


# --------------------------------------------------------------------------- reading


def list_shards(dataset_dir: str | os.PathLike[str]) -> list[Path]:
    """The dataset's shard files in name order; a :class:`DataError` if there are none."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset directory {str(root)!r} does not exist or is not a directory")
    shards = sorted(p for p in root.glob(SHARD_GLOB) if p.is_file())
    if not shards:
        raise DataError(f"dataset directory {str(root)!r} has no {SHARD_GLOB} shards")
    return shards


def iter_records(
    dataset_dir: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[RawRecord]:
    """Stream every line of every shard, in shard-name then line order.

    Lines that cannot be used come back with ``error`` set rather than raising: bytes that are not
    UTF-8, invalid JSON (including NaN/Infinity), objects with a duplicate key at any depth, a
    value that is not an object, blank lines, and lines longer than ``max_line_bytes`` (which are
    skipped in 64 KB chunks, never held in memory whole). Memory is bounded by ``max_line_bytes``.
    """
    for shard in list_shards(dataset_dir):
        yield from iter_shard(shard, max_line_bytes=max_line_bytes)


def iter_shard(shard: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    """Stream the lines of one shard file; see :func:`iter_records`."""
    path = Path(shard)
    with path.open("rb") as f:
        yield from _iter_lines(f, path.name, max_line_bytes)


def _iter_lines(f: IO[bytes], shard: str, max_line_bytes: int) -> Iterator[RawRecord]:
    line_no = 0
    while True:
        chunk = f.readline(max_line_bytes + 1)
        if not chunk:
            return
        line_no += 1
        if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
            size = len(chunk) + _skip_rest_of_line(f)
            yield RawRecord(
                shard, line_no, None, f"line is {size} bytes, over the {max_line_bytes}-byte limit"
            )
            continue
        record, error = parse_line(chunk)
        yield RawRecord(shard, line_no, record, error)


def _skip_rest_of_line(f: IO[bytes]) -> int:
    skipped = 0
    while True:
        chunk = f.readline(_READ_CHUNK)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """Parse one shard line strictly: ``(record, None)`` or ``(None, reason)``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at offset {e.start})"
    if not text.strip():
        return None, "blank line"
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except _DuplicateKeyError as e:
        return None, f"duplicate JSON key {str(e)[:80]!r}"
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"
    except ValueError as e:
        return None, f"invalid JSON: {e}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    if not isinstance(value, dict):
        return None, f"a JSON {type(value).__name__}, not an object"
    return value, None


# --------------------------------------------------------------------------- images


def _short(ref: object) -> str:
    text = str(ref)
    return text if len(text) <= 64 else text[:61] + "..."


def _where(record_id: str | None, ref: str) -> str:
    prefix = f"record {record_id!r}: " if record_id is not None else ""
    return f"{prefix}image {_short(ref)!r}"


def read_image_bytes(
    dataset_dir: str | os.PathLike[str],
    ref: str,
    *,
    record_id: str | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> tuple[bytes, str | None]:
    """The encoded bytes behind an image reference, and the format a data URI declares.

    Relative paths must stay inside ``dataset_dir`` once symlinks are resolved; absolute paths,
    ``..`` components, backslashes and URL schemes are refused with :class:`UnsafeImageRef`.
    Data URIs must be ``data:image/png;base64,`` or ``data:image/jpeg;base64,``. Anything over
    ``max_bytes`` is refused before it is read. Every failure is a :class:`DataError`.
    """
    where = _where(record_id, ref)
    if not isinstance(ref, str) or not ref:
        raise DataError(f"{where}: the reference must be a non-empty string", record_id=record_id)
    if ref.startswith("data:"):
        match = _DATA_URI.match(ref)
        if match is None:
            raise DataError(
                f"{where}: only data:image/png;base64 and data:image/jpeg;base64 URIs are accepted",
                record_id=record_id,
                ref=ref,
            )
        payload = ref[match.end() :]
        if len(payload) > (max_bytes + 2) // 3 * 4:
            raise DataError(
                f"{where}: data URI decodes to more than {max_bytes} bytes",
                record_id=record_id,
                ref=ref,
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataError(f"{where}: invalid base64 ({e})", record_id=record_id, ref=ref) from e
        return data, "PNG" if match.group(1) == "png" else "JPEG"
    return _read_safe_path(os.fspath(dataset_dir), ref, where, record_id, max_bytes), None


def _read_safe_path(root: str, ref: str, where: str, record_id: str | None, max_bytes: int) -> bytes:
    def unsafe(reason: str) -> UnsafeImageRef:
        return UnsafeImageRef(f"{where}: {reason}", record_id=record_id, ref=ref)

    if "\x00" in ref:
        raise unsafe("NUL byte in path")
    if "\\" in ref:
        raise unsafe("backslash in path; use '/' separators")
    if ref.startswith("/") or _WINDOWS_DRIVE.match(ref):
        raise unsafe("absolute paths are not allowed; use a path relative to the dataset directory")
    if _URL_SCHEME.match(ref):
        raise unsafe("URLs are not allowed; use a path relative to the dataset directory")
    if ".." in PurePosixPath(ref).parts:
        raise unsafe("'..' in path; images must stay inside the dataset directory")
    # os.path rather than pathlib: this runs once per image and pathlib's resolve() is 3x slower.
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, ref))
    if os.path.commonpath((base, target)) != base:
        raise unsafe("resolves (through a symlink) outside the dataset directory")
    try:
        # O_NONBLOCK: a FIFO planted under images/ must not hang the reader (no effect on files).
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DataError(f"{where}: file not found", record_id=record_id, ref=ref) from None
    except OSError as e:
        raise DataError(f"{where}: cannot open ({e.strerror})", record_id=record_id, ref=ref) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{where}: not a regular file", record_id=record_id, ref=ref)
        if st.st_size > max_bytes:
            raise DataError(
                f"{where}: file is {st.st_size} bytes, over the {max_bytes}-byte limit",
                record_id=record_id,
                ref=ref,
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"{where}: cannot read ({e.strerror})", record_id=record_id, ref=ref) from e
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while we read it
        raise DataError(f"{where}: file is over the {max_bytes}-byte limit", record_id=record_id, ref=ref)
    return data


def decode_image(
    data: bytes,
    *,
    ref: str,
    record_id: str | None = None,
    expected_format: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode PNG or JPEG bytes fully, refusing anything over ``max_pixels``.

    The size comes from the header, before any pixel is decompressed, so a small file declaring
    30000x30000 is refused without allocating it. Truncated or corrupt data is a :class:`DataError`.
    """
    where = _where(record_id, ref)
    with warnings.catch_warnings():
        # Pillow's own bomb guard warns (and later raises) at its global limit; ours is lower and
        # explicit, so turn its warning into an error we report rather than a log line.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{where}: too many pixels ({e})", record_id=record_id, ref=ref) from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{where}: not a PNG or JPEG image", record_id=record_id, ref=ref) from e
        width, height = img.size
        if width * height > max_pixels:
            raise DataError(
                f"{where}: {width}x{height} is over the {max_pixels}-pixel budget",
                record_id=record_id,
                ref=ref,
            )
        if expected_format is not None and img.format != expected_format:
            raise DataError(
                f"{where}: data URI says {expected_format} but the bytes are {img.format}",
                record_id=record_id,
                ref=ref,
            )
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{where}: cannot decode ({e})", record_id=record_id, ref=ref) from e
    return img


def resolve_image(
    dataset_dir: str | os.PathLike[str],
    ref: str,
    *,
    record_id: str | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Load the image behind ``ref`` (a safe relative path or a PNG/JPEG data URI), fully decoded.

    See :func:`read_image_bytes` for the path rules and :func:`decode_image` for the limits.
    """
    data, declared = read_image_bytes(dataset_dir, ref, record_id=record_id, max_bytes=max_bytes)
    return decode_image(data, ref=ref, record_id=record_id, expected_format=declared, max_pixels=max_pixels)


# --------------------------------------------------------------------------- writing


def image_filename(record_id: str, index: int) -> str:
    """``images/<readable id>-<id hash>-<index>.png``: stable, filesystem-safe, collision-free."""
    readable = _UNSAFE_FILENAME_CHARS.sub("_", record_id)[:64]
    digest = hashlib.sha256(record_id.encode("utf-8")).hexdigest()[:12]
    return f"{IMAGES_DIR}/{readable}-{digest}-{index}.png"


def _png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG bytes: pixels only (no text, EXIF, ICC or dpi), fixed compression."""
    if img.mode in ("P", "PA"):
        has_alpha = img.mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif img.mode not in _PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    # frombytes drops img.info, which is where Pillow would find metadata to write.
    clean = Image.frombytes(img.mode, img.size, img.tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    # No fsync per image: at ~0.4 ms each it would dominate writing; shards and directories are
    # fsynced, and an image lost to a power cut fails the gate's images_decode check.
    with path.open("xb") as f:
        f.write(data)


class _ShardWriter:
    """Writes records into fixed-size shards inside ``root``, hashing every byte it writes."""

    def __init__(self, root: Path, name: str, shard_size: int, max_line_bytes: int):
        self.root = root
        self.name = name
        self.shard_size = shard_size
        self.max_line_bytes = max_line_bytes
        self.shards: list[str] = []
        self.n_records = 0
        self.n_images = 0
        self._file: IO[bytes] | None = None

    def add(self, record: dict[str, Any]) -> None:
        if not isinstance(record, dict):
            raise DataError(f"record {self.n_records} is a {type(record).__name__}, not a dict")
        record = self._externalize_images(record)
        try:
            line = json.dumps(
                record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise DataError(
                f"record {record.get('id')!r}: not JSON-serializable ({e})", record_id=record.get("id")
            ) from e
        if len(line) > self.max_line_bytes:
            raise DataError(
                f"record {record.get('id')!r}: serializes to {len(line)} bytes, over the "
                f"{self.max_line_bytes}-byte line limit readers enforce",
                record_id=record.get("id"),
            )
        if self._file is None or self.n_records % self.shard_size == 0:
            self._open_next_shard()
        assert self._file is not None
        self._file.write(line + b"\n")
        self.n_records += 1

    def _externalize_images(self, record: dict[str, Any]) -> dict[str, Any]:
        images = record.get("images")
        if not isinstance(images, list) or not any(isinstance(i, Image.Image) for i in images):
            return record
        record_id = record.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise DataError(f"a record with PIL images needs a non-empty string id, got {record_id!r}")
        refs: list[Any] = []
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                refs.append(image)
                continue
            relpath = image_filename(record_id, index)
            data = _png_bytes(image)
            try:
                _write_file(self.root / relpath, data)
            except FileExistsError:
                raise DataError(
                    f"record {record_id!r}: duplicate id (image {relpath!r} already written)",
                    record_id=record_id,
                ) from None
            self.n_images += 1
            refs.append(relpath)
        return {**record, "images": refs}

    def _open_next_shard(self) -> None:
        self.close()
        shard = f"{self.name}-{len(self.shards):05d}.jsonl"
        self._file = (self.root / shard).open("xb")
        self.shards.append(shard)

    def finish(self) -> None:
        """Close the last shard; an empty dataset still gets one (empty) shard."""
        if not self.shards:
            self._open_next_shard()
        self.close()
        _fsync_dir(self.root)
        if self.n_images:
            _fsync_dir(self.root / IMAGES_DIR)
        else:
            (self.root / IMAGES_DIR).rmdir()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def dataset_sha256(dataset_dir: str | os.PathLike[str]) -> str:
    """sha256 over the sorted list of every file of a dataset directory: relative path, size and sha256 of each.

    The dataset's identity in manifests and lineage: equal datasets give equal hashes wherever
    and however they were written. ``MANIFEST.json`` files (a published one) are not part of the content, so a
    published dataset's hash is also :func:`dataset_sha256_of_manifest` of its manifest, without reading its files.
    """
    root = Path(dataset_dir)
    files = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != "MANIFEST.json"):
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(_READ_CHUNK * 16):
                h.update(chunk)
        files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
    return _files_sha256(files)


def dataset_sha256_of_manifest(manifest: dict[str, Any]) -> str:
    """:func:`dataset_sha256` of a published dataset, from its ``MANIFEST.json`` (``storage.read_manifest``)."""
    return _files_sha256({rel: e for rel, e in manifest["files"].items() if PurePosixPath(rel).name != "MANIFEST.json"})


def _files_sha256(files: dict[str, dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['size']}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def write_dataset(
    out_dir: str | os.PathLike[str],
    records: Iterable[dict[str, Any]],
    *,
    shard_size: int = 2000,
    name: str = "data",
) -> dict[str, Any]:
    """Stream ``records`` into a new dataset directory ``out_dir`` and return its summary.

    Shards are ``<name>-00000.jsonl``, ``<name>-00001.jsonl``, ... with ``shard_size`` records each,
    one compact sorted-keys UTF-8 JSON object per line, so the same records always give the same
    bytes. A ``PIL.Image.Image`` in ``record["images"]`` is written as a metadata-free PNG under
    ``images/`` (named from the record id and position) and replaced by its relative path; string
    references are kept as given. Records are not otherwise validated: the gate does that.

    Everything is written to a hidden sibling directory that is renamed to ``out_dir`` only when
    complete; on any error it is removed, so ``out_dir`` either does not exist or is whole.
    ``out_dir`` must not exist yet: datasets are immutable. Memory is bounded by one record.

    Returns ``{"path", "n_records", "n_images", "shards", "sha256"}``, where ``sha256`` covers
    every file's relative path and bytes.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not _SHARD_NAME.fullmatch(name):
        raise ValueError(f"shard name {name!r} must match [A-Za-z0-9_-]+")
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; datasets are immutable, write a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (tmp / IMAGES_DIR).mkdir()
        writer = _ShardWriter(tmp, name, shard_size, MAX_LINE_BYTES)
        try:
            for record in records:
                writer.add(record)
        finally:
            writer.close()
        writer.finish()
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        os.rename(tmp, out)  # atomic on one filesystem; fails if out appeared meanwhile and is non-empty
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return {
        "path": str(out),
        "n_records": writer.n_records,
        "n_images": writer.n_images,
        "shards": writer.shards,
        "sha256": dataset_sha256(out),
    }
