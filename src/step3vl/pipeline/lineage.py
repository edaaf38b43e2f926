"""Identity of pipeline work: local cache keys, artifact digests, and where a stage's checkpoints live.

Cache keys are *input-addressed*: a task's key hashes its stage, its component (image, command and
the embedded body), the resolved config, the step3vl code it can run (the static import closure of
its body), and the keys of the tasks whose outputs it consumes. The MLflow tracking context is
deliberately not part of it: every ``step3vl run`` opens a new parent run, and a rerun with nothing
else changed must still be all cache hits (KFP's own local key covers every parameter, so it would
never hit).

A training stage's checkpoints go to ``<storage.root>/checkpoints/<stage>-<hash>`` with the hash over
(resolved config, digests of its input artifacts): the same work always resumes from the same place,
across task retries, killed runs and new runs alike, while any change to the config or to the data
or model it starts from gets a fresh directory. The step3vl code is *not* in that hash, so a run
killed by a bug resumes after the fix.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from step3vl.config import PACKAGE_DIR, PipelineConfig, config_hash
from step3vl.storage import absolute_uri, is_s3_uri, join_uri

CACHE_KEY_FORMAT = "step3vl-cache/1"


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- code


def _module_file(name: str, package_dir: Path) -> Path | None:
    p = package_dir.joinpath(*name.split(".")[1:])
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _imported(tree: ast.AST, module: str, is_package: bool, top: str) -> set[str]:
    """Names of the ``top`` package's modules a module imports, anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == top:
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)  # kept only where they are modules
    return out


# Parsing and walking the ASTs is most of the cost of the nine stages' code digests (each stage's
# closure re-reads the shared modules: ~1.8 s of `step3vl run` start-up, cached reruns included), so
# it is cached per process, keyed by the source text itself: an edited file is parsed again.
@functools.lru_cache(maxsize=1024)
def _module_imports(name: str, is_package: bool, top: str, source: str) -> tuple[tuple[str, ...], bool]:
    """What module ``name`` imports, and whether it imports by name (``importlib.import_module``)."""
    tree = ast.parse(source)
    by_name = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "import_module"
                  for n in ast.walk(tree))
    return tuple(sorted(_imported(tree, name, is_package, top))), by_name


def import_closure(roots: set[str], package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every source file of the package that importing ``roots`` can execute (static, over-approximate).

    Follows imports at any depth (step3vl imports lazily inside functions) and parent packages; a
    module that imports by name (``importlib.import_module``) pulls in its whole package directory.
    """
    top = package_dir.name
    seen: set[Path] = set()
    queue = list(roots)
    while queue:
        name = queue.pop()
        parts = name.split(".")
        queue.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        path = _module_file(name, package_dir)
        if path is None or path in seen:
            continue
        seen.add(path)
        imports, by_name = _module_imports(name, path.name == "__init__.py", top, path.read_text())
        queue.extend(imports)
        if by_name:
            rel = path.parent.relative_to(package_dir).parts
            queue.extend(".".join((top, *rel, q.stem)) for q in path.parent.glob("*.py") if q.stem != "__init__")
    return sorted(seen)


def code_digest(roots: set[str], package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the step3vl code ``roots`` can run, plus the package's data files (schemas, templates).

    Editing code a stage never imports (the CLI, the runner, another stage's modules) leaves it alone.
    """
    files = import_closure(roots, package_dir)
    files += sorted(p for p in package_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".j2", ".jinja")
                    and "__pycache__" not in p.parts)
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(package_dir).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def component_code_digest(component: Any, package_dir: Path = PACKAGE_DIR) -> str:
    """:func:`code_digest` of what a component's body imports from step3vl."""
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(component.python_func)))
    return code_digest(_imported(tree, "__component__", False, package_dir.name), package_dir)


def component_digest(component: Any) -> str:
    """sha256 of a KFP component's container: image, command and args (which embed its body)."""
    c = component.component_spec.implementation.container
    return sha256_json({"image": c.image, "command": list(c.command or []), "args": list(c.args or [])})


def task_cache_key(stage: str, component: str, config_yaml: str, code: str, inputs: dict[str, str]) -> str:
    """The local cache key of one task; ``inputs`` maps input name → ``<producer key>:<output name>``."""
    return sha256_json({
        "format": CACHE_KEY_FORMAT,
        "stage": stage,
        "component": component,
        "config": hashlib.sha256(config_yaml.encode()).hexdigest(),
        "code": code,
        "inputs": inputs,
    })


# --------------------------------------------------------------------------- artifact digests


def data_digest(data_dir: str | Path) -> str:
    """Digest of a data prep output (a local folder or the ``s3://`` URI it was published to): the content hash
    of every set and the tokenizer's files.

    Everything else in the directory (packed shards, reports) is a deterministic function of these
    and the config, and ``data_manifest.json`` also holds timings and paths that differ per run.
    """
    from step3vl.stages.data import DATA_MANIFEST

    if is_s3_uri(str(data_dir)):  # the published manifest holds every file's sha256: no tokenizer file is downloaded
        from step3vl.storage import RemoteFiles

        files = RemoteFiles(str(data_dir))
        manifest = json.loads(files.file(DATA_MANIFEST).read_text())
        tok_files = {rel.removeprefix("tokenizer/"): entry["sha256"]
                     for rel, entry in sorted(files.manifest["files"].items()) if rel.startswith("tokenizer/")}
    else:
        manifest = json.loads((Path(data_dir) / DATA_MANIFEST).read_text())
        tok = Path(data_dir) / "tokenizer"
        tok_files = {p.relative_to(tok).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                     for p in sorted(tok.rglob("*")) if p.is_file()}
    sets = {name: info["content_hash"] for name, info in manifest["sets"].items()}
    return sha256_json({"sets": sets, "tokenizer": tok_files})


def checkpoint_digest(ckpt_uri: str | Path) -> str:
    """Digest of a published checkpoint: its manifest's file list (sha256 + size of every file)."""
    from step3vl.storage import read_manifest

    return sha256_json(read_manifest(str(ckpt_uri))["files"])


def checkpoint_location(stage: str, cfg: PipelineConfig, input_digests: list[str]) -> str:
    """Where ``stage`` keeps its resumable checkpoints for this config and these inputs.

    Where runs are tracked and stored cannot change what is trained, so those sections are left out:
    moving to another MLflow server or experiment resumes the same checkpoints.
    """
    import dataclasses

    from step3vl.config import StorageConfig, TrackingConfig

    what = dataclasses.replace(cfg, tracking=TrackingConfig(), storage=StorageConfig())
    h = sha256_json({"stage": stage, "config": config_hash(what), "inputs": list(input_digests)})[:16]
    return join_uri(absolute_uri(cfg.storage.root), "checkpoints", f"{stage}-{h}")

