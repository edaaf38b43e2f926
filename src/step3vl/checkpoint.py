"""Checkpoints: model weights, config, tokenizer and exact-resume training state, published atomically.

A checkpoint is a published directory (see :mod:`step3vl.storage`)::

    model.safetensors        weights (safetensors only: nothing here is ever unpickled)
    config.json              the model config
    tokenizer/               copied from the tokenizer directory, when given
    train_state.safetensors  every tensor of the training state, under path-like keys
    train_state.json         the structure of the training state and its non-tensor values
    MANIFEST.json            sha256 + size of every file, written last

The same weights and config always give the same bytes (the safetensors header is written in one order), so a
checkpoint's digest, the sha256 of its manifest's file list, names its content: a stage that publishes a model it
finished before gives the same digest, and what is keyed on it downstream (checkpoint roots, caches) is found again.

The training state is any nesting of dicts (keys of any JSON scalar type, e.g. the int parameter
ids of an optimizer ``state_dict``), lists, tuples, tensors, numpy arrays/scalars, bytes and JSON
values; it is rebuilt exactly, so optimizer, scheduler, RNG states, step and data position
round-trip bit for bit. Checkpoints of a run live under ``<root>/step-000123/``;
:func:`load_latest_checkpoint` loads the newest one that verifies (what a resuming run does), and
:func:`latest_valid_checkpoint` names it.

An ``s3://`` checkpoint is loaded from the node's cache (:class:`step3vl.storage.RemoteFiles`): the ranks of
a node, and later loads of the same checkpoint, share one copy, each file downloaded once and verified as it
arrives.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from step3vl.storage import (
    MANIFEST_NAME,
    TMP_MARK,
    IntegrityError,
    KeyNotFoundError,
    LocalStore,
    NotPublishedError,
    StorageError,
    fetch_dir,
    is_s3_uri,
    join_uri,
    open_store,
    publish_dir,
    read_manifest,
    verify_published,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "step3vl-checkpoint/1"
TRAIN_STATE_FORMAT = "step3vl-train-state/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
TRAIN_STATE_TENSORS = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
# Formats that can execute code when loaded; a checkpoint holding one is refused outright.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
STEP_DIR_RE = re.compile(r"^step-(\d+)/?$")


class CheckpointError(StorageError):
    """A checkpoint is malformed, unsafe (pickle files) or its state cannot be encoded."""


# What makes one checkpoint unusable, so that a resume falls back to the one before it. Anything else (an
# unreachable store above all) is raised: a run must not start over because its store did not answer.
UNUSABLE = (IntegrityError, NotPublishedError, KeyNotFoundError, CheckpointError)


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    train_state: Any | None
    tokenizer_dir: Path | None
    uri: str  # where it was loaded from (``path`` is its local copy)


def step_dir_name(step: int) -> str:
    """``step-000123``: the directory name of the checkpoint taken at ``step``."""
    return f"step-{step:06d}"


def checkpoint_uri(root_uri: str | os.PathLike[str], step: int) -> str:
    """The URI of the checkpoint at ``step`` under a run's checkpoint root."""
    return join_uri(root_uri, step_dir_name(step))


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """The state of every RNG a training step touches: python ``random``, numpy's global, torch CPU (+CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back RNG states captured by :func:`capture_rng_state` (after a checkpoint round-trip too)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state:
        if not torch.cuda.is_available():
            raise CheckpointError("checkpoint has CUDA RNG states but CUDA is not available")
        torch.cuda.set_rng_state_all(state["torch_cuda"])


# --------------------------------------------------------------------------- state codec

_TAGS = ("__tensor__", "__ndarray__", "__npscalar__", "__tuple__", "__dict__", "__bytes__")


class _Encoder:
    """Splits a nested state into a JSON tree and a flat ``{path: tensor}`` dict."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[int] = set()

    def _key(self, path: str) -> str:
        key = path or "root"
        n = 1
        while key in self.tensors:
            n += 1
            key = f"{path}#{n}"
        return key

    def _tensor(self, t: torch.Tensor, path: str) -> str:
        if t.is_sparse or t.layout != torch.strided:
            raise CheckpointError(
                f"train state: {path or '<root>'} is a {t.layout} tensor; only dense ones are supported"
            )
        key = self._key(path)
        self.tensors[key] = _private_cpu(t, self._storages)
        return key

    def encode(self, obj: Any, path: str = "") -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int) and not isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if isinstance(obj, torch.Tensor):
            return {"__tensor__": self._tensor(obj, path)}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise CheckpointError(f"train state: {path or '<root>'} is an object-dtype numpy array")
            try:
                t = torch.from_numpy(np.ascontiguousarray(obj).copy())
            except TypeError as e:
                raise CheckpointError(f"train state: {path or '<root>'}: numpy dtype {obj.dtype} unsupported") from e
            return {"__ndarray__": self._tensor(t, path)}
        if isinstance(obj, np.generic):
            return {"__npscalar__": [obj.dtype.str, obj.item()]}
        if isinstance(obj, bytes):
            return {"__bytes__": base64.b64encode(obj).decode()}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, _join(path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            for k in obj:
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise CheckpointError(f"train state: {path or '<root>'} has a {type(k).__name__} key {k!r}")
            children = {k: self.encode(v, _join(path, k)) for k, v in obj.items()}
            plain = all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS)
            if plain:
                return children
            return {"__dict__": [[k, v] for k, v in children.items()]}
        raise CheckpointError(
            f"train state: {path or '<root>'} is a {type(obj).__name__}; "
            "use tensors, numpy arrays, dicts, lists, tuples or JSON values"
        )


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _private_cpu(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """``t`` detached on CPU, contiguous and not sharing storage with anything already in ``seen``.

    safetensors refuses tensors that share memory (tied weights, views); those get their own copy,
    everything else is written without one.
    """
    t = t.detach()
    if t.device.type != "cpu":
        return t.to("cpu", copy=True).contiguous()  # a copy of its own, whatever it shares on its device
    storage = t.untyped_storage().data_ptr()
    whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
    if storage in seen or not whole:
        t = t.to("cpu", copy=True).contiguous()
    seen.add(storage)
    return t


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__ndarray__":
            return tensors[value].numpy()
        if tag == "__npscalar__":
            return np.dtype(value[0]).type(value[1])
        if tag == "__bytes__":
            return base64.b64decode(value)
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__dict__":
            return {k: _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in node.items()}


def encode_state(state: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json_document, tensors)`` for a nested training state; inverse of :func:`decode_state`."""
    enc = _Encoder()
    tree = enc.encode(state)
    return {"format": TRAIN_STATE_FORMAT, "tree": tree}, enc.tensors


def decode_state(document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the nested training state from :func:`encode_state`'s output."""
    if document.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"train state format {document.get('format')!r} is not {TRAIN_STATE_FORMAT}")
    try:
        return _decode(document["tree"], tensors)
    except KeyError as e:
        raise CheckpointError(f"{TRAIN_STATE_JSON} refers to tensor {e} missing from {TRAIN_STATE_TENSORS}") from None


# --------------------------------------------------------------------------- save / load


def _model_tensors(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, storage-private tensors: tied weights (shared storage) get their own copy."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model_state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"model_state[{name!r}] is a {type(t).__name__}, not a tensor")
        out[name] = _private_cpu(t, seen)
    return out


def _refuse_pickles(files: list[str], where: str) -> None:
    bad = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if bad:
        raise CheckpointError(
            f"refusing checkpoint {where}: {bad[0]} is a pickle-format file; only safetensors/JSON are loaded"
        )


def save_checkpoint(
    dest_uri: str | os.PathLike[str],
    *,
    model_state: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    train_state: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a checkpoint to ``dest_uri`` (local or ``s3://``) atomically; returns its manifest.

    The directory is built locally, then published: readers either see no checkpoint or a
    complete one whose manifest covers every file.
    """
    dest_uri = str(dest_uri)
    store = open_store(dest_uri)
    if store.exists(MANIFEST_NAME) and not overwrite:
        raise StorageError(f"checkpoint {store.uri} already exists; pass overwrite=True to replace it")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer_dir {tokenizer_dir} is not a directory")

    # Build next to a local destination so publishing is a rename, not a copy.
    if isinstance(store, LocalStore):
        store.root.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=f".{store.root.name}{TMP_MARK}build-", dir=store.root.parent))
    else:
        build = Path(tempfile.mkdtemp(prefix="step3vl-ckpt-"))
    try:
        return _build_and_publish(build, store, dest_uri, model_state=model_state, config=config,
                                  tokenizer_dir=tokenizer_dir, train_state=train_state, extra_meta=extra_meta,
                                  overwrite=overwrite)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _io_error(action: str, where: str, e: BaseException) -> CheckpointError:
    """A checkpoint I/O failure (disk full, permissions, a corrupt or foreign file) as one error type that
    names the file and the cause; the original stays chained."""
    cause = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return CheckpointError(f"{action} {where} failed: {cause}")


def _build_and_publish(build: Path, store: Any, dest_uri: str, *, model_state: dict[str, torch.Tensor],
                       config: dict[str, Any], tokenizer_dir: str | os.PathLike[str] | None,
                       train_state: dict[str, Any] | None, extra_meta: dict[str, Any] | None,
                       overwrite: bool) -> dict[str, Any]:
    from safetensors import SafetensorError

    def write(name: str, fn: Any) -> None:
        try:
            fn()
        except CheckpointError:
            raise
        except (OSError, SafetensorError) as e:
            raise _io_error("writing", f"{name} of checkpoint {store.uri}", e) from e

    tensors = _model_tensors(model_state)
    order = json.dumps(list(tensors))
    write(MODEL_FILE, lambda: save_safetensors(tensors, build / MODEL_FILE, {"format": "pt", "step3vl.order": order}))
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    except TypeError as e:
        raise CheckpointError(f"config is not JSON-serialisable: {e}") from None
    write(CONFIG_FILE, lambda: (build / CONFIG_FILE).write_text(config_text))
    if tokenizer_dir is not None:
        write(TOKENIZER_DIR, lambda: shutil.copytree(tokenizer_dir, build / TOKENIZER_DIR))
    if train_state is not None:
        document, state_tensors = encode_state(train_state)
        write(TRAIN_STATE_TENSORS,
              lambda: save_safetensors(state_tensors, build / TRAIN_STATE_TENSORS, {"format": "pt"}))
        try:
            text = json.dumps(document)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"train state is not serialisable: {e}") from None
        write(TRAIN_STATE_JSON, lambda: (build / TRAIN_STATE_JSON).write_text(text + "\n"))
    _refuse_pickles([p.relative_to(build).as_posix() for p in build.rglob("*") if p.is_file()], store.uri)
    meta: dict[str, Any] = {"kind": "checkpoint", "format": CHECKPOINT_FORMAT}
    if isinstance(train_state, dict) and isinstance(train_state.get("step"), int):
        meta["step"] = train_state["step"]
    meta.update(extra_meta or {})
    try:
        return publish_dir(build, dest_uri, meta, overwrite=overwrite, move=True)
    except StorageError:
        raise
    except OSError as e:
        raise _io_error("publishing", f"checkpoint {store.uri}", e) from e


def load_checkpoint(uri: str | os.PathLike[str], local_dir: str | os.PathLike[str] | None = None) -> Checkpoint:
    """Verify and load a checkpoint: a local one in place, an ``s3://`` one downloaded to ``local_dir`` or else
    into the node's cache (:class:`step3vl.storage.RemoteFiles`, shared by the node's processes and reused).

    Refuses, with an error naming the file, a checkpoint that is unpublished, corrupt, partial, or
    holds pickle-format files. Tensors are loaded on CPU (mapped from the files, not copied).
    """
    from safetensors.torch import load_file

    uri = str(uri)
    if is_s3_uri(uri):
        _refuse_pickles(list(read_manifest(uri)["files"]), uri)
    else:
        root = Path(uri.removeprefix("file://"))
        if root.is_dir():
            _refuse_pickles([p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()], uri)
    # without local_dir, an s3:// checkpoint comes from the node's one copy: every rank of a resuming run loads the
    # same checkpoint, and a private copy each would multiply a 10B run's ~114 GiB by the ranks of the node
    path = fetch_dir(uri, local_dir)
    manifest = read_manifest(path)
    _refuse_pickles(list(manifest["files"]), uri)
    for required in (MODEL_FILE, CONFIG_FILE):
        if required not in manifest["files"]:
            raise CheckpointError(f"{uri} is not a checkpoint: {required} is missing")

    from safetensors import SafetensorError

    def read(name: str, fn: Any) -> Any:
        try:
            return fn()
        except (OSError, SafetensorError, ValueError) as e:  # json's JSONDecodeError is a ValueError
            raise _io_error("reading", f"{name} of checkpoint {uri}", e) from e

    model_state = read(MODEL_FILE, lambda: load_file(str(path / MODEL_FILE)))
    order = read(MODEL_FILE, lambda: _safetensors_metadata(path / MODEL_FILE).get("step3vl.order"))
    if order:
        model_state = {k: model_state[k] for k in json.loads(order)}
    config = read(CONFIG_FILE, lambda: json.loads((path / CONFIG_FILE).read_text()))
    train_state = None
    if TRAIN_STATE_JSON in manifest["files"]:
        if TRAIN_STATE_TENSORS not in manifest["files"]:
            raise CheckpointError(f"{uri}: {TRAIN_STATE_TENSORS} is missing next to {TRAIN_STATE_JSON}")
        document = read(TRAIN_STATE_JSON, lambda: json.loads((path / TRAIN_STATE_JSON).read_text()))
        tensors = read(TRAIN_STATE_TENSORS, lambda: load_file(str(path / TRAIN_STATE_TENSORS)))
        train_state = decode_state(document, tensors)
    tokenizer = path / TOKENIZER_DIR
    return Checkpoint(
        path=path,
        manifest=manifest,
        config=config,
        model_state=model_state,
        train_state=train_state,
        tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
        uri=uri,
    )


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, with the same tensors and metadata always giving the same bytes (so the same
    digest): safetensors writes the metadata map in a random order per save (safetensors/safetensors#584), so two
    saves of one model with two metadata keys differed one time in two. Every safetensors file step3vl writes with
    metadata goes through here."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    _canonical_header(Path(path))


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's header in place with its ``__metadata__`` keys sorted. The rewritten header has
    the same length (the same JSON, reordered; padded with spaces as the format allows)."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > size:  # not the JSON safetensors wrote: leave nothing half-rewritten
            raise CheckpointError(f"{path}: its safetensors header re-serialises to {len(text)} bytes, "
                                  f"more than the {size} it holds; not rewritten")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _step_uris(root_uri: str | os.PathLike[str]) -> list[str]:
    """The URIs of the ``step-NNNNNN`` folders under ``root_uri``, newest first."""
    store = open_store(root_uri)
    steps = []
    for entry in store.list(recursive=False):
        m = STEP_DIR_RE.match(entry)
        if m:
            steps.append((int(m.group(1)), entry.rstrip("/")))
    return [store.uri_of(name) for _step, name in sorted(steps, reverse=True)]


def latest_valid_checkpoint(root_uri: str | os.PathLike[str], *, deep: bool = True) -> str | None:
    """URI of the highest ``step-NNNNNN`` checkpoint under ``root_uri`` that verifies, or None.

    A newer checkpoint that fails verification (corrupt, partial, unpublished, pickle files) is
    skipped with a warning. ``deep=False`` checks presence of every file instead of hashing it (on S3,
    hashing streams every object: a run that goes on to load it uses :func:`load_latest_checkpoint`).
    """
    for uri in _step_uris(root_uri):
        try:
            manifest = verify_published(uri, deep=deep)
            _refuse_pickles(list(manifest["files"]), uri)
        except UNUSABLE as e:
            log.warning("skipping checkpoint %s: %s", uri, e)
            continue
        return uri
    return None


def load_latest_checkpoint(root_uri: str | os.PathLike[str]) -> Checkpoint | None:
    """The highest ``step-NNNNNN`` checkpoint under ``root_uri`` that loads verified (:func:`load_checkpoint`), or
    None. A newer one that is corrupt, partial, unpublished or unsafe is skipped with a warning; an unreachable
    store is an error. Each byte is read once: where :func:`latest_valid_checkpoint` and then
    :func:`load_checkpoint` read an ``s3://`` checkpoint twice (hashing it in place, then downloading it), this
    verifies every file as it downloads it."""
    for uri in _step_uris(root_uri):
        try:
            return load_checkpoint(uri)
        except UNUSABLE as e:
            log.warning("skipping checkpoint %s: %s", uri, e)
    return None
