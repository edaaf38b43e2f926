"""Init container of the serving pod: copy an exported model from S3 into the directory vLLM serves.

Runs in the serving image (vLLM's environment, plus the ``minio`` client), so it imports nothing
from step3vl. Configured by environment, as the serving Deployment sets it:

- ``MODEL_URI``: ``s3://bucket/prefix`` holding ``config.json``, the tokenizer and ``*.safetensors``
- ``MODEL_DIR``: where to put it (``/models/<name>``)
- ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``

The copy lands in a sibling ``.partial`` directory and is renamed into place with a marker naming
its source, so a restarted pod never serves half a model and skips a download it already made.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

MARKER = ".step3vl-source"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"MODEL_URI must be s3://bucket/prefix, got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def fetch(client: Any, uri: str, dest: Path) -> int:
    """Copy every object under ``uri`` to ``dest``; returns the number of files copied (0: already there)."""
    bucket, prefix = parse_s3_uri(uri)
    source = f"s3://{bucket}/{prefix}"  # the marker's form: a trailing slash is the same model
    marker = dest / MARKER
    if marker.is_file() and marker.read_text() == source:
        return 0
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = 0
    for obj in client.list_objects(bucket, prefix=f"{prefix}/" if prefix else "", recursive=True):
        rel = PurePosixPath(obj.object_name[len(prefix):].lstrip("/"))
        if obj.object_name.endswith("/") or not rel.parts:
            continue
        if ".." in rel.parts:
            raise ValueError(f"object {obj.object_name!r} would land outside {dest}")
        target = partial.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        client.fget_object(bucket, obj.object_name, str(target))
        count += 1
    if not (partial / "config.json").is_file():
        raise FileNotFoundError(f"{uri} holds no config.json ({count} objects): not an exported model")
    (partial / MARKER).write_text(source)
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return count


def client_from_env() -> Any:
    from minio import Minio

    endpoint = urlparse(os.environ["AWS_ENDPOINT_URL"])
    return Minio(endpoint.netloc, access_key=os.environ["AWS_ACCESS_KEY_ID"],
                 secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], secure=endpoint.scheme == "https",
                 region=os.environ.get("AWS_REGION", "us-east-1"))


def main() -> int:
    uri, dest = os.environ["MODEL_URI"], Path(os.environ["MODEL_DIR"])
    n = fetch(client_from_env(), uri, dest)
    print(f"{dest}: {'already holds ' + uri if n == 0 else f'{n} files from {uri}'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
