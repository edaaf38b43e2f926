"""The MLflow model registry for step3vl checkpoints.

A model version's ``source`` is the checkpoint's storage URI (a local path or ``s3://``): weights
stay in object storage and only the URI, the manifest checksum and lineage tags go through the
tracking server, so multi-GB checkpoints never stream through it.
"""

from __future__ import annotations

import re
from typing import Any

from step3vl.errors import Step3VLError

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(Step3VLError):
    """A registered model, version or alias does not exist or cannot be changed."""


def client() -> Any:
    import mlflow

    from step3vl.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def resolve_model_uri(uri: str) -> str:
    """``models:/NAME@alias`` or ``models:/NAME/VERSION`` → the checkpoint URI it points at."""
    m = _MODELS_URI.match(uri)
    if not m:
        raise RegistryError(f"'{uri}' is not of the form models:/NAME@alias or models:/NAME/VERSION")
    c = client()
    from mlflow.exceptions import MlflowException

    try:
        if m["alias"]:
            mv = c.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = c.get_model_version(m["name"], m["version"])
    except MlflowException as e:
        raise RegistryError(f"{uri}: {e.message}") from None
    return mv.source


def register_checkpoint(name: str, checkpoint_uri: str, *, run_id: str | None, tags: dict[str, str]) -> Any:
    """Register a published checkpoint as a new version of ``name`` with lineage tags."""
    from mlflow.exceptions import MlflowException

    from step3vl.storage import read_manifest

    manifest = read_manifest(checkpoint_uri)  # refuses an unpublished checkpoint
    c = client()
    try:
        c.create_registered_model(name)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    all_tags = {"step3vl.manifest_sha256": digest, **{k: str(v) for k, v in tags.items()}}
    return c.create_model_version(name, source=checkpoint_uri, run_id=run_id, tags=all_tags)
