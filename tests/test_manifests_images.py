"""The images' helpers: the build script's tags, and the serving pod's model loader (fetch_model.py)
against an in-memory bucket."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_model = _load("fetch_model", ROOT / "images" / "serving" / "fetch_model.py")


def test_build_commands_use_the_tags_of_step3vl_pipeline_images():
    from step3vl.pipeline.images import MLFLOW_IMAGE, SERVING_IMAGE, TRAINER_IMAGE

    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "images.py"), "build", "--dry-run", "--push"],
                         capture_output=True, text=True, check=True).stdout
    for name, image in (("trainer", TRAINER_IMAGE), ("serving", SERVING_IMAGE), ("mlflow", MLFLOW_IMAGE)):
        assert f"+ docker build -f images/{name}/Dockerfile -t {image} --build-arg STEP3VL_GIT_COMMIT=" in out
        assert f"+ docker push {image}" in out
        assert (ROOT / "images" / name / "Dockerfile").is_file()


@dataclass
class Obj:
    object_name: str


class FakeS3:
    """The two calls fetch_model makes, over a dict of ``{bucket/key: bytes}``."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.downloads = 0

    def list_objects(self, bucket, prefix="", recursive=False):
        assert recursive
        return [Obj(k.split("/", 1)[1]) for k in sorted(self.objects)
                if k.startswith(f"{bucket}/{prefix}")]

    def fget_object(self, bucket, name, path):
        self.downloads += 1
        Path(path).write_bytes(self.objects[f"{bucket}/{name}"])


MODEL = {
    "step3vl/models/m/export/config.json": b"{}",
    "step3vl/models/m/export/model-00001.safetensors": b"w",
    "step3vl/models/m/export/tokenizer/tokenizer.json": b"t",
    "step3vl/models/m/exported-elsewhere/config.json": b"not this one",
}


def test_fetch_copies_the_prefix_then_skips_a_complete_copy(tmp_path):
    s3 = FakeS3(MODEL)
    dest = tmp_path / "models" / "m"
    assert fetch_model.fetch(s3, "s3://step3vl/models/m/export/", dest) == 3
    assert (dest / "tokenizer" / "tokenizer.json").read_bytes() == b"t"
    assert sorted(p.name for p in dest.iterdir()) == [".step3vl-source", "config.json", "model-00001.safetensors",
                                                      "tokenizer"]
    assert fetch_model.fetch(s3, "s3://step3vl/models/m/export", dest) == 0  # a restarted pod
    assert s3.downloads == 3


def test_a_prefix_without_config_json_is_refused_and_leaves_nothing_servable(tmp_path):
    dest = tmp_path / "m"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fetch_model.fetch(FakeS3({"step3vl/x/a.bin": b"1"}), "s3://step3vl/x", dest)
    assert not dest.exists()


@pytest.mark.parametrize("uri", ["step3vl/models", "http://x/y", "s3:///nobucket"])
def test_only_s3_uris(uri):
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        fetch_model.parse_s3_uri(uri)
