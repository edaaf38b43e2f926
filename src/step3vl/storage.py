"""Artifact storage: one small interface over local directories and S3, plus the publish protocol.

Every stage reads and writes artifacts (datasets, checkpoints, eval reports) through a URI:
a local path / ``file://`` URI, or ``s3://bucket/prefix``. ``open_store(uri)`` returns a
:class:`Store` whose keys are relative to that root.

S3 settings come only from the environment, never from config files, so credentials never end up
in a logged config: ``AWS_ENDPOINT_URL`` (its scheme decides TLS), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (default ``us-east-1``, which radosgw needs) and
optionally ``AWS_CA_BUNDLE``. Connection failures are retried with exponential backoff for at most
``STEP3VL_S3_RETRY_SECONDS`` seconds (default 20), then surface as a :class:`StorageError` naming
the endpoint.

Directories are *published*: every file is listed with its sha256 and size in ``MANIFEST.json``,
and the manifest is what makes a directory exist for readers. Locally the directory is assembled
under a temporary sibling name and renamed into place; on S3 the files are uploaded first and the
manifest last. ``fetch_dir`` + ``verify_dir`` give a reader a local copy whose every byte was checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from urllib3.util import Retry, Timeout

from step3vl.errors import Step3VLError

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "step3vl-manifest/1"
# Marks in-flight files and directories; listings skip them, so readers never see half a write.
TMP_MARK = ".step3vl-tmp-"
FETCH_THREADS = 8  # concurrent object downloads in fetch_dir (the S3 client's connection pool holds 10)
_CHUNK = 1 << 20

RETRY_SECONDS_ENV = "STEP3VL_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 20.0
_CONNECT_TIMEOUT = 1.5
_READ_TIMEOUT = 120.0
_BACKOFF_FACTOR = 0.5
_BACKOFF_MAX = 4.0


class StorageError(Step3VLError):
    """An artifact could not be read or written; the message names the URI or endpoint."""


class IntegrityError(StorageError):
    """A published directory does not match its manifest; ``files`` lists the offending paths."""

    def __init__(self, message: str, files: list[str] | None = None) -> None:
        super().__init__(message)
        self.files = files or []


class NotPublishedError(StorageError):
    """The directory has no ``MANIFEST.json``: it was never published or its publish did not finish."""


class KeyNotFoundError(StorageError):
    """The key does not exist in the store."""


# --------------------------------------------------------------------------- URIs


def is_s3_uri(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith("s3://")


def join_uri(base: str | os.PathLike[str], *parts: str) -> str:
    """Append path components to a local path or URI, keeping its style (``s3://``, ``file://``, path)."""
    base = str(base)
    clean = [p.strip("/") for p in parts if p.strip("/")]
    if not clean:
        return base
    if "://" in base:
        return base.rstrip("/") + "/" + "/".join(clean)
    return str(Path(base, *clean))


def absolute_uri(uri: str | os.PathLike[str]) -> str:
    """A local path made absolute (so it names the same place from any working directory); URIs as they are."""
    uri = str(uri)
    return uri if "://" in uri else str(Path(uri).absolute())


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names a remote host; only local file:// URIs are supported")
        return Path(parts.path)
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return Path(uri)


def _check_key(key: str) -> str:
    """Normalise a store key and refuse ones that would escape the store root."""
    key = key.replace("\\", "/").strip("/")
    parts = PurePosixPath(key).parts
    if any(p in ("..", ".") for p in parts):
        raise StorageError(f"invalid key {key!r}: '.' and '..' components are not allowed")
    return "/".join(parts)


def _is_clean_key(key: str) -> bool:
    try:
        return _check_key(key) == key and key != ""
    except StorageError:
        return False


# --------------------------------------------------------------------------- stores


@dataclass(frozen=True)
class ObjectInfo:
    """An object of a store: its key, size in bytes, and when it was last written (POSIX seconds)."""

    key: str
    size: int
    modified: float


class Store(ABC):
    """A root (local directory or S3 prefix) holding byte objects addressed by relative posix keys."""

    uri: str

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists at ``key``."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The object's content; :class:`KeyNotFoundError` if absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object; readers see either the old content or the whole new one."""

    @abstractmethod
    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        """Sorted keys starting with ``prefix``; non-recursive listings end sub-directories with ``/``."""

    @abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursively), sorted by key, with its size and when it was
        last written."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; returns how many were deleted."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Copy a local file to ``key`` (atomically for readers)."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Copy ``key`` to a local file, creating parent directories."""

    @abstractmethod
    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Stream the object's content in chunks (for hashing without a local copy)."""

    def uri_of(self, key: str = "") -> str:
        """The full URI of ``key``."""
        return join_uri(self.uri, _check_key(key)) if key else self.uri

    def copy_from(self, src_uri: str, key: str) -> None:
        """Copy the file or object at ``src_uri`` to ``key`` (an S3 store copies S3 objects on the server)."""
        if not is_s3_uri(src_uri):
            self.upload_file(_local_path(src_uri), key)
            return
        base, _, name = src_uri.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="step3vl-copy-") as tmp:
            open_store(base).download_file(name, Path(tmp) / "f")
            self.upload_file(Path(tmp) / "f", key)


class LocalStore(Store):
    """A directory on the local filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        key = _check_key(key)
        return self.root / key if key else self.root

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFoundError(f"{path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror or e}") from e

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror or e}") from e

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        prefix = prefix.lstrip("/")
        if not self.root.is_dir():
            return []
        # Only walk the sub-directory the prefix points into.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(head)
        if not start.is_dir():
            return []
        out: list[str] = []
        if recursive:
            for dirpath, dirnames, filenames in os.walk(start, followlinks=True):
                dirnames[:] = [d for d in dirnames if TMP_MARK not in d]
                rel_dir = Path(dirpath).relative_to(self.root).as_posix()
                for name in filenames:
                    if TMP_MARK in name:
                        continue
                    key = name if rel_dir == "." else f"{rel_dir}/{name}"
                    if key.startswith(prefix):
                        out.append(key)
        else:
            for entry in start.iterdir():
                if TMP_MARK in entry.name:
                    continue
                rel = entry.relative_to(self.root).as_posix() + ("/" if entry.is_dir() else "")
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        out = []
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted since it was listed
                st = self._path(key).stat()
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return out

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        # Remove directories the deletion emptied, deepest first, never the root itself.
        dirs = {self._path(k).parent for k in keys}
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            while d != self.root and self.root in d.parents:
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent
        return len(keys)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        dest = self._path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}{TMP_MARK}{uuid.uuid4().hex}")
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, dest)
        except OSError as e:
            raise StorageError(f"cannot copy {local_path} to {dest}: {e.strerror or e}") from e

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        src = self._path(key)
        if not src.is_file():
            raise KeyNotFoundError(f"{src} does not exist")
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local_path)

    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        if not path.is_file():
            raise KeyNotFoundError(f"{path} does not exist")
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk


def retry_budget_seconds() -> float:
    """Seconds an S3 call may spend retrying connection failures (``$STEP3VL_S3_RETRY_SECONDS``)."""
    raw = os.environ.get(RETRY_SECONDS_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{RETRY_SECONDS_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise StorageError(f"{RETRY_SECONDS_ENV}={raw!r} must be positive")
    return value


def retry_policy(budget_s: float) -> tuple[Retry, Timeout]:
    """The urllib3 ``(Retry, Timeout)`` whose worst case on an unreachable endpoint fits ``budget_s``.

    Worst case = every attempt spends the whole connect timeout, plus the backoff sleeps between
    attempts (urllib3 sleeps 0 after the first error, then ``factor * 2**(n-1)`` capped).
    """
    connect = min(_CONNECT_TIMEOUT, budget_s / 2)

    def worst(retries: int) -> float:
        sleeps = sum(min(_BACKOFF_MAX, _BACKOFF_FACTOR * 2.0 ** (k - 1)) for k in range(2, retries + 1))
        return (retries + 1) * connect + sleeps

    retries = 0
    while worst(retries + 1) <= budget_s:
        retries += 1
    retry = Retry(
        total=retries,
        backoff_factor=_BACKOFF_FACTOR,
        backoff_max=_BACKOFF_MAX,
        status_forcelist=[500, 502, 503, 504],
        # A server's Retry-After could exceed the budget.
        respect_retry_after_header=False,
        raise_on_status=False,
    )
    return retry, Timeout(connect=connect, read=_READ_TIMEOUT)


def _s3_settings() -> dict[str, str]:
    env = os.environ
    required = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    missing = [name for name in required if not env.get(name)]
    if missing:
        raise StorageError(
            f"S3 access needs environment variable(s) {', '.join(missing)} "
            f"(endpoint and keys come only from the environment: {', '.join(required)})"
        )
    return {name: env[name] for name in required} | {
        "AWS_REGION": env.get("AWS_REGION") or "us-east-1",
        "AWS_CA_BUNDLE": env.get("AWS_CA_BUNDLE", ""),
    }


class S3Store(Store):
    """``s3://bucket/prefix`` through the minio client, configured from the environment."""

    def __init__(self, uri: str) -> None:
        from minio import Minio

        parts = urlsplit(uri)
        if not parts.netloc:
            raise StorageError(f"S3 URI {uri!r} has no bucket: expected s3://bucket/prefix")
        self.bucket = parts.netloc
        self.prefix = _check_key(parts.path)
        self.uri = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

        settings = _s3_settings()
        endpoint = settings["AWS_ENDPOINT_URL"].rstrip("/")
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.netloc or ep.path not in ("", "/"):
            raise StorageError(f"AWS_ENDPOINT_URL={endpoint!r} must look like http(s)://host[:port] (no path)")
        self.endpoint = endpoint
        secure = ep.scheme == "https"
        ca_bundle = settings["AWS_CA_BUNDLE"]
        if ca_bundle and not Path(ca_bundle).is_file():
            raise StorageError(f"AWS_CA_BUNDLE={ca_bundle!r} is not a file")
        self._budget = retry_budget_seconds()
        self._client = Minio(
            ep.netloc,
            access_key=settings["AWS_ACCESS_KEY_ID"],
            secret_key=settings["AWS_SECRET_ACCESS_KEY"],
            secure=secure,
            region=settings["AWS_REGION"],
            http_client=self._pool(secure, ca_bundle),
        )

    def _pool(self, secure: bool, ca_bundle: str) -> Any:
        import urllib3

        retry, timeout = retry_policy(self._budget)
        kwargs: dict[str, Any] = {"timeout": timeout, "retries": retry, "maxsize": 10}
        if secure:
            import certifi

            kwargs["cert_reqs"] = "CERT_REQUIRED"
            kwargs["ca_certs"] = ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where()
        return urllib3.PoolManager(**kwargs)

    def _name(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    @contextlib.contextmanager
    def _errors(self, op: str, key: str = "") -> Iterator[None]:
        """Turn minio/urllib3 failures into one-line StorageErrors naming the endpoint and object."""
        from minio.error import MinioException, S3Error
        from urllib3.exceptions import HTTPError as Urllib3Error

        target = self.uri_of(key) if key else self.uri
        start = time.monotonic()
        try:
            yield
        except S3Error as e:
            if e.code in ("NoSuchKey", "NotFound"):
                raise KeyNotFoundError(f"{target} does not exist (endpoint {self.endpoint})") from None
            if e.code == "NoSuchBucket":
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} ({op} {target})"
                ) from None
            if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(
                    f"{op} {target} refused by {self.endpoint}: {e.code} "
                    "(check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
                ) from None
            raise StorageError(f"{op} {target} failed at {self.endpoint}: {e.code}: {e.message}") from None
        except (Urllib3Error, ConnectionError, TimeoutError) as e:
            elapsed = time.monotonic() - start
            raise StorageError(
                f"S3 endpoint {self.endpoint} unreachable: {op} {target} gave up after {elapsed:.1f} s "
                f"(retry budget {self._budget:g} s, {RETRY_SECONDS_ENV}): {_reason(e)}"
            ) from None
        except OSError as e:
            raise StorageError(f"{op} {target} (endpoint {self.endpoint}) failed locally: {e}") from None
        except MinioException as e:
            raise StorageError(f"{op} {target} failed at {self.endpoint}: {_reason(e)}") from None

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (deployment/test setup; stores never create it implicitly)."""
        with self._errors("create bucket"):
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)

    def exists(self, key: str) -> bool:
        try:
            with self._errors("stat", key):
                self._client.stat_object(self.bucket, self._name(key))
        except KeyNotFoundError:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            resp = self._client.get_object(self.bucket, self._name(key))
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic for S3 readers.
        with self._errors("write", key):
            self._client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))

    def _objects(self, prefix: str, recursive: bool) -> list[tuple[str, Any]]:
        """The listing under ``prefix``: (key relative to this store, minio object), sorted by key."""
        prefix = prefix.lstrip("/")
        root = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list", prefix):
            objects = list(self._client.list_objects(self.bucket, prefix=root + prefix, recursive=recursive))
        return sorted(((o.object_name[len(root) :], o) for o in objects if o.object_name is not None),
                      key=lambda item: item[0])

    def list(self, prefix: str = "", *, recursive: bool = True) -> list[str]:
        return [key for key, _ in self._objects(prefix, recursive)]

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        return [ObjectInfo(key, int(o.size or 0), o.last_modified.timestamp() if o.last_modified else 0.0)
                for key, o in self._objects(prefix, recursive=True)]

    def delete_prefix(self, prefix: str) -> int:
        from minio.deleteobjects import DeleteObject

        root = f"{self.prefix}/" if self.prefix else ""
        keys = self.list(prefix)
        if not keys:
            return 0
        with self._errors("delete", prefix):
            errors = list(self._client.remove_objects(self.bucket, (DeleteObject(root + k) for k in keys)))
        if errors:
            raise StorageError(
                f"deleting {self.uri_of(prefix)} at {self.endpoint}: {len(errors)} object(s) not deleted, "
                f"first {errors[0].name}: {errors[0].code}"
            )
        return len(keys)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        with self._errors("upload", key):
            self._client.fput_object(self.bucket, self._name(key), str(local_path))

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors("download", key):
            self._client.fget_object(self.bucket, self._name(key), str(local_path))

    def iter_bytes(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        with self._errors("read", key):
            resp = self._client.get_object(self.bucket, self._name(key))
            try:
                yield from resp.stream(chunk_size)
            finally:
                resp.close()
                resp.release_conn()

    def copy_from(self, src_uri: str, key: str) -> None:
        if not is_s3_uri(src_uri):
            super().copy_from(src_uri, key)
            return
        from minio.commonconfig import ComposeSource, CopySource

        parts = urlsplit(src_uri)
        bucket, name = parts.netloc, parts.path.lstrip("/")
        with self._errors(f"copy {src_uri} to", key):
            size = self._client.stat_object(bucket, name).size
            if size <= _MAX_COPY:  # one CopyObject; larger objects are copied part by part (UploadPartCopy)
                self._client.copy_object(self.bucket, self._name(key), CopySource(bucket, name))
            else:
                self._client.compose_object(self.bucket, self._name(key), [ComposeSource(bucket, name)])


_MAX_COPY = 5 << 30  # S3's limit for a single CopyObject


def _reason(e: BaseException) -> str:
    """A short reason for a connection error, without urllib3's connection reprs."""
    reason = getattr(e, "reason", None) or e
    text = re.sub(r"^(<[^>]*>|HTTPS?Connection\([^)]*\)): ", "", str(reason))
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def open_store(uri: str | os.PathLike[str], *, create: bool = False) -> Store:
    """A :class:`Store` for a local path, ``file://`` URI or ``s3://bucket/prefix``.

    ``create=True`` creates the local directory or the S3 bucket if missing.
    """
    uri = str(uri)
    if is_s3_uri(uri):
        s3 = S3Store(uri)
        if create:
            s3.ensure_bucket()
        return s3
    store = LocalStore(_local_path(uri))
    if create:
        store.root.mkdir(parents=True, exist_ok=True)
    return store


# --------------------------------------------------------------------------- manifests


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk_files(local_dir: Path) -> list[str]:
    """Relative posix paths of every file under ``local_dir`` except the root manifest, sorted."""
    out = []
    for dirpath, _dirnames, filenames in os.walk(local_dir, followlinks=True):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(local_dir).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def build_manifest(local_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """sha256 and size of every file under ``local_dir`` (sorted posix paths), ``extra`` under ``meta``."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"cannot build a manifest: {root} is not a directory")
    files = {}
    for rel in _walk_files(root):
        path = root / rel
        files[rel] = {"sha256": _sha256_file(path), "size": path.stat().st_size}
    return {
        "format": MANIFEST_FORMAT,
        "files": files,
        "total_size": sum(f["size"] for f in files.values()),
        "meta": dict(extra or {}),
    }


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of a published directory's manifest: which version of it (the same for its copies)."""
    return hashlib.sha256(_manifest_bytes(manifest)).hexdigest()


def _parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{where}/{MANIFEST_NAME} is not valid JSON: {e}", [MANIFEST_NAME]) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise IntegrityError(f"{where}/{MANIFEST_NAME} is not a {MANIFEST_FORMAT} manifest", [MANIFEST_NAME])
    for rel, entry in manifest["files"].items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
            or not _is_clean_key(rel)
        ):
            raise IntegrityError(f"{where}/{MANIFEST_NAME}: malformed entry for {rel!r}", [rel])
    return manifest


def read_manifest(uri: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest of a published directory; :class:`NotPublishedError` if it has none."""
    store = open_store(uri)
    try:
        data = store.read_bytes(MANIFEST_NAME)
    except KeyNotFoundError:
        raise NotPublishedError(f"{store.uri} is not published: no {MANIFEST_NAME}") from None
    return _parse_manifest(data, store.uri)


def _check_against(
    where: str,
    manifest: dict[str, Any],
    present: set[str],
    content: Callable[[str, int], tuple[int, str | None]] | None,
    threads: int = 1,
) -> None:
    """Raise one IntegrityError naming every extra, missing, resized or altered file.

    ``content(rel, expected_size)`` returns ``(size, sha256)``, the digest None when the size
    already differs; None skips content checks (presence only). ``threads`` > 1 calls it on that
    many files at once (objects on S3: each read is a round trip).
    """
    expected = manifest["files"]
    problems = [
        (rel, f"{rel} is not in {MANIFEST_NAME} (unexpected file)") for rel in sorted(present - expected.keys())
    ]
    checked: dict[str, tuple[int, str | None]] = {}
    if content is not None:
        todo = [rel for rel in expected if rel in present]
        if threads > 1 and len(todo) > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                checked = dict(zip(todo, pool.map(lambda rel: content(rel, expected[rel]["size"]), todo)))
        else:
            checked = {rel: content(rel, expected[rel]["size"]) for rel in todo}
    for rel, entry in expected.items():
        if rel not in present:
            problems.append((rel, f"{rel} is missing"))
        elif content is not None:
            size, digest = checked[rel]
            if size != entry["size"]:
                problems.append((rel, f"{rel} has {size} bytes, manifest says {entry['size']} (truncated or altered)"))
            elif digest != entry["sha256"]:
                problems.append((rel, f"{rel} sha256 differs from {MANIFEST_NAME} (altered)"))
    if problems:
        raise IntegrityError(
            f"integrity check failed for {where}: " + "; ".join(msg for _, msg in problems),
            [rel for rel, _ in problems],
        )


def verify_dir(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a local published directory against its manifest; returns the manifest.

    Raises :class:`IntegrityError` naming every missing, extra, resized or altered file, and
    :class:`NotPublishedError` when there is no manifest.
    """
    root = Path(path)
    manifest = read_manifest(root)

    def content(rel: str, expected_size: int) -> tuple[int, str | None]:
        size = (root / rel).stat().st_size
        return size, _sha256_file(root / rel) if size == expected_size else None

    _check_against(str(root), manifest, set(_walk_files(root)), content)
    return manifest


def verify_published(uri: str | os.PathLike[str], *, deep: bool = True) -> dict[str, Any]:
    """Check a published directory in place (local or S3) without copying it; returns the manifest.

    ``deep`` hashes every file (for S3 this streams every object); otherwise only presence and no
    extra files are checked, which on S3 is meaningful because single PUTs are all-or-nothing.
    """
    store = open_store(uri)
    if isinstance(store, LocalStore) and deep:
        return verify_dir(store.root)
    manifest = read_manifest(uri)

    def content(rel: str, _expected_size: int) -> tuple[int, str | None]:
        h, size = hashlib.sha256(), 0
        for chunk in store.iter_bytes(rel):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()

    _check_against(store.uri, manifest, set(store.list()) - {MANIFEST_NAME}, content if deep else None,
                   threads=FETCH_THREADS)
    return manifest


# --------------------------------------------------------------------------- publish / fetch


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; released on exit, and by
    the kernel when the process dies, so a killed holder never leaves it stuck. ``on_wait`` is called once
    when another process holds it, before blocking until it is free."""
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_dir(path: Path) -> None:
    """Make a directory entry change (create/rename) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_tree(src: Path, dst: Path, files: list[str]) -> None:
    for rel in files:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
        with open(target, "rb") as f:
            os.fsync(f.fileno())


def _publish_local(src: Path, dest: Path, manifest: dict[str, Any], overwrite: bool, move: bool,
                   remote: Mapping[str, str] | None = None) -> None:
    dest = dest.absolute()
    if dest.exists():
        if (dest / MANIFEST_NAME).exists() and not overwrite:
            raise StorageError(f"{dest} is already published; pass overwrite=True to replace it")
        if not overwrite and (not dest.is_dir() or any(dest.iterdir())):
            raise StorageError(f"{dest} exists and is not an empty directory; refusing to publish over it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    same_fs = src.stat().st_dev == dest.parent.stat().st_dev
    if move and remote:
        raise StorageError("publish_dir: move=True publishes the directory as it is; it cannot copy files into it")
    if move and same_fs:
        staging = src
    else:
        staging = dest.parent / f".{dest.name}{TMP_MARK}{uuid.uuid4().hex}"
        staging.mkdir()
    try:
        if staging is not src:
            _copy_tree(src, staging, [rel for rel in manifest["files"] if rel not in (remote or {})])
            for rel, uri in (remote or {}).items():
                LocalStore(staging).copy_from(uri, rel)
        (staging / MANIFEST_NAME).write_bytes(_manifest_bytes(manifest))
        with open(staging / MANIFEST_NAME, "rb") as f:
            os.fsync(f.fileno())
        trash = None
        if dest.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            trash = dest.parent / f".{dest.name}{TMP_MARK}old-{uuid.uuid4().hex}"
            os.rename(dest, trash)
        os.rename(staging, dest)
        fsync_dir(dest.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        if staging is not src:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish_s3(src: Path, store: S3Store, manifest: dict[str, Any], overwrite: bool,
                remote: Mapping[str, str] | None = None) -> None:
    if not store.prefix:
        raise StorageError(f"refusing to publish to the bucket root {store.uri}: give a prefix")
    if store.exists(MANIFEST_NAME):
        if not overwrite:
            raise StorageError(f"{store.uri} is already published; pass overwrite=True to replace it")
        # Unpublish first, so readers never pair the old manifest with new files.
        store.delete_prefix(MANIFEST_NAME)
    stale = store.list()
    # (a directory holding published directories, such as data prep's raw sets, leaves their manifests among its own)
    nested = [k for k in stale if k.endswith("/" + MANIFEST_NAME) and k not in manifest["files"]]
    if nested:
        raise StorageError(f"refusing to publish to {store.uri}: it holds other published directories ({nested[0]})")
    if stale:
        # Objects under an unpublished prefix are, by protocol, the remains of an unfinished publish.
        log.warning("removing %d leftover object(s) of an unfinished publish under %s", len(stale), store.uri)
        store.delete_prefix("")
    remote = remote or {}
    for rel in manifest["files"]:
        if rel not in remote:
            store.upload_file(src / rel, rel)
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:  # server-side copies: latency-bound, many of them
        list(pool.map(lambda rel: store.copy_from(remote[rel], rel),
                      [rel for rel in manifest["files"] if rel in remote]))
    store.write_bytes(MANIFEST_NAME, _manifest_bytes(manifest))


def seal_dir(local_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None, *,
             remote: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Publish a local directory where it is, once it is whole: its manifest, written last and renamed into
    place, makes it readable by :func:`fetch_dir` (a KFP artifact a TrainJob reads from object storage).

    ``remote`` lists files the directory holds that are not here (relative path → their manifest entry, sha256 and
    size): the directory is then whole only once published, :func:`publish_dir` copying them from where they are."""
    root = Path(local_dir)
    manifest = build_manifest(root, extra)
    if remote:
        clash = sorted(set(remote) & set(manifest["files"]))
        if clash:
            raise StorageError(f"seal_dir {root}: {clash[0]} is both here and elsewhere")
        manifest["files"] = dict(sorted({**manifest["files"],
                                         **{rel: {"sha256": e["sha256"], "size": e["size"]}
                                            for rel, e in remote.items()}}.items()))
        manifest["total_size"] = sum(e["size"] for e in manifest["files"].values())
    tmp = root.parent / f".{root.name}-{MANIFEST_NAME}{TMP_MARK}{uuid.uuid4().hex}"  # outside the tree it lists
    try:
        tmp.write_bytes(_manifest_bytes(manifest))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(root)
    return manifest


def publish_dir(
    local_dir: str | os.PathLike[str],
    dest_uri: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
    move: bool = False,
    skip: tuple[str, ...] = (),
    sealed: bool = False,
    remote: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Publish ``local_dir`` at ``dest_uri`` so readers see all of it or nothing; returns the manifest.

    Local destinations are assembled under a temporary sibling and renamed into place; S3
    destinations get every file first and ``MANIFEST.json`` last. An already-published destination
    is refused unless ``overwrite``. ``move=True`` lets a local publish rename ``local_dir`` itself
    into place instead of copying (the caller gives the directory up). The folders named in ``skip``
    are left out. ``sealed``: ``local_dir`` was just sealed (:func:`seal_dir`), so its manifest is
    used as it is instead of hashing every file again (``extra`` then does not apply). ``remote`` maps files of the
    manifest that are not in ``local_dir`` (see :func:`seal_dir`) to the URI each is copied from: on S3, from an S3
    object by the server, never through this process.
    """
    src = Path(local_dir)
    if sealed and extra:
        raise StorageError("publish_dir: a sealed directory is published with its own manifest; extra cannot apply")
    manifest = read_manifest(src) if sealed else build_manifest(src, extra)
    if skip:
        if move:
            raise StorageError("publish_dir: move=True publishes the whole directory; it cannot skip folders")
        prefixes = tuple(f.rstrip("/") + "/" for f in skip)
        manifest["files"] = {rel: e for rel, e in manifest["files"].items() if not rel.startswith(prefixes)}
        manifest["total_size"] = sum(e["size"] for e in manifest["files"].values())
    store = open_store(dest_uri)
    if isinstance(store, LocalStore):
        if store.root == src.absolute():
            raise StorageError(f"cannot publish {src} onto itself")
        _publish_local(src, store.root, manifest, overwrite, move, remote)
    else:
        assert isinstance(store, S3Store)
        _publish_s3(src, store, manifest, overwrite, remote)
    log.info("published %s (%d files, %d bytes)", store.uri, len(manifest["files"]), manifest["total_size"])
    return manifest


def fetch_dir(
    uri: str | os.PathLike[str], local_dir: str | os.PathLike[str] | None = None, *, overwrite: bool = False
) -> Path:
    """A verified local copy of a published directory.

    A local ``uri`` is verified and returned as is (or copied to ``local_dir`` if one is given).
    An S3 ``uri`` is downloaded to ``local_dir``, where a copy holding the same verified manifest is reused
    without downloading; without one, into the node's cache (:class:`RemoteFiles`): one copy per node, shared
    by its processes and by later fetches, each file checked as it arrives.
    """
    store = open_store(uri)
    if isinstance(store, LocalStore):
        verify_dir(store.root)
        if local_dir is None or Path(local_dir).absolute() == store.root:
            return store.root
        publish_dir(store.root, local_dir, read_manifest(store.root)["meta"], overwrite=overwrite)
        return Path(local_dir).absolute()
    if local_dir is None:
        return RemoteFiles(uri).all()

    manifest = read_manifest(uri)
    target = Path(local_dir).absolute()
    if (target / MANIFEST_NAME).is_file():
        with contextlib.suppress(StorageError):
            if verify_dir(target) == manifest:
                return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise StorageError(f"cannot fetch {store.uri} into {target}: it exists with other content")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}{TMP_MARK}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        # many small objects (a dataset's shards and images): latency-bound, so a few requests at once
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            list(pool.map(lambda rel: store.download_file(rel, staging / rel), manifest["files"]))
        (staging / MANIFEST_NAME).write_bytes(_manifest_bytes(manifest))
        try:
            verify_dir(staging)
        except IntegrityError as e:
            raise IntegrityError(f"{store.uri} (downloaded to {staging}): {e}", e.files) from None
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- a node's files of a remote directory

NODE_CACHE_ENV = "STEP3VL_TRAINJOB_DATA"  # where a node keeps what it fetched of remote data (default: the temp dir)


def node_cache_root() -> Path:
    """The node-local folder that :class:`RemoteFiles` caches under: ``$STEP3VL_TRAINJOB_DATA``, else the temp dir
    (a pod's own)."""
    return Path(os.environ.get(NODE_CACHE_ENV) or Path(tempfile.gettempdir(), "step3vl-trainjob-data"))


class RemoteFiles:
    """The files of a directory published on S3, each downloaded when first asked for into a local cache shared by
    the node's processes, and verified against the directory's manifest: a TrainJob streams the shards it reads
    instead of copying the whole dataset to every node.

    The cache is ``<root>/<hash of the URI>/<hash of its manifest>``, so data published anew under the same URI
    gets a cache of its own. A file is downloaded under a lock of its own, checked (size and sha256) and renamed
    into place: a file present in the cache is a verified one. :meth:`evict` removes one under the same lock, so
    never while another process holds it (:meth:`hold`), and never from a version some process asked for whole
    (:meth:`all` pins it first).
    """

    def __init__(self, uri: str, root: str | os.PathLike[str] | None = None) -> None:
        self.uri = str(uri).rstrip("/")
        self.store = open_store(self.uri)
        self.manifest = read_manifest(self.uri)
        base = Path(root) if root is not None else node_cache_root()
        version = manifest_digest(self.manifest)[:16]
        self.dir = base / hashlib.sha256(self.uri.encode()).hexdigest()[:16] / version
        self._locks = self.dir.parent / f"{self.dir.name}.locks"  # beside the tree, which holds data files only

    def _entry(self, rel: str) -> dict[str, Any]:
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise KeyNotFoundError(f"{self.store.uri}: {rel} is not in its {MANIFEST_NAME}")
        return entry

    def _lock(self, rel: str) -> contextlib.AbstractContextManager[None]:
        return file_lock(self._locks / (rel.replace("/", "%") + ".lock"))

    @contextlib.contextmanager
    def hold(self, rel: str) -> Iterator[Path]:
        """The verified local copy of ``rel``, downloaded if it is not in the cache; not evicted while held."""
        entry = self._entry(rel)
        dest = self.dir / rel
        with self._lock(rel):
            if dest.is_file() and dest.stat().st_size == entry["size"]:
                os.utime(dest)  # recently used: eviction goes by modification time
            else:
                self._download(rel, dest, entry)
            yield dest

    def file(self, rel: str) -> Path:
        """The verified local copy of ``rel`` (see :meth:`hold`; it may be evicted once returned)."""
        with self.hold(rel) as path:
            return path

    def _download(self, rel: str, dest: Path, entry: dict[str, Any]) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}{TMP_MARK}{uuid.uuid4().hex}"
        try:
            self.store.download_file(rel, tmp)
            size = tmp.stat().st_size
            digest = _sha256_file(tmp) if size == entry["size"] else None
            if digest != entry["sha256"]:
                raise IntegrityError(
                    f"{self.store.uri}/{rel} does not match its {MANIFEST_NAME}: "
                    + (f"sha256 {digest} instead of {entry['sha256']}" if digest else
                       f"{size} bytes instead of {entry['size']}"), [rel])
            os.rename(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def files(self, prefix: str) -> Path:
        """Every file under the folder ``prefix`` (``"tokenizer/"``), fetched a few at a time; its local folder."""
        prefix = prefix.rstrip("/") + "/"
        rels = [rel for rel in self.manifest["files"] if rel.startswith(prefix)]
        if not rels:
            raise KeyNotFoundError(f"{self.store.uri}: no file under {prefix} in its {MANIFEST_NAME}")
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            list(pool.map(self.file, rels))
        return self.dir / prefix

    def only(self, parts: list[str]) -> Path:
        """The local folder holding just ``parts`` of the directory (each a file or a folder of it), pinned against
        :meth:`evict`; its other files are not there."""
        self.pin()
        for part in parts:
            if part in self.manifest["files"]:
                self.file(part)
            else:
                self.files(part)
        return self.dir

    @property
    def _pin(self) -> Path:
        return self._locks / "whole.pin"

    def pin(self) -> None:
        """Keep this version's files from :meth:`evict` (a copy some process reads whole, or in named folders)."""
        self._locks.mkdir(parents=True, exist_ok=True)
        self._pin.touch()

    def all(self) -> Path:
        """The whole directory, as :func:`fetch_dir` gives it (its manifest included): files already in the cache
        are kept, the others downloaded. The version is pinned first, so a streaming process's :meth:`evict`
        cannot take a file from under the manifest written at the end."""
        self.pin()
        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            list(pool.map(self.file, self.manifest["files"]))
        with file_lock(self._locks / f"{MANIFEST_NAME}.lock"):
            if not (self.dir / MANIFEST_NAME).is_file():
                tmp = self.dir / f".{MANIFEST_NAME}{TMP_MARK}{uuid.uuid4().hex}"
                tmp.write_bytes(_manifest_bytes(self.manifest))
                os.replace(tmp, self.dir / MANIFEST_NAME)
        return self.dir

    def drop(self) -> None:
        """Remove this version's whole copy from the node's cache: for a process that read it and knows that no other
        process of the node still does (the evaluate pod, done with one of the models it compares)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self._locks, ignore_errors=True)

    def evict(self, rel: str) -> bool:
        """Remove ``rel`` from the cache (waiting while another process holds it); whether it was removed. A version
        pinned by :meth:`all` (a whole copy some process uses, or is making) keeps its files."""
        self._entry(rel)
        with self._lock(rel):
            path = self.dir / rel
            if not path.is_file() or self._pin.exists():
                return False
            path.unlink()
            return True
