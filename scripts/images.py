#!/usr/bin/env python
"""Build and push the images under images/, tagged from ``step3vl.pipeline.images`` (the one place
their tags live; the manifests' ``components/images`` is checked against it).

    python scripts/images.py list                      # image  <- Dockerfile
    python scripts/images.py build [--push] [--only trainer] [--tool docker|podman|buildah] [--dry-run]

Run from anywhere; the build context is the repository root (each Dockerfile has a
``Dockerfile.dockerignore`` beside it, so only what it copies is sent).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def images() -> dict[str, str]:
    """``{directory under images/: full tag}``; the directory is the image's short name."""
    sys.path.insert(0, str(ROOT / "src"))
    from step3vl.pipeline import images as tags

    out = {}
    for image in (tags.TRAINER_IMAGE, tags.SERVING_IMAGE, tags.MLFLOW_IMAGE):
        out[image.rsplit("/", 1)[-1].split(":")[0]] = image
    return out


def git_commit() -> str:
    """HEAD, ``+dirty`` with uncommitted tracked changes: the trainer image records it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commands(tool: str, push: bool, only: list[str] | None) -> list[list[str]]:
    cmds = []
    commit = git_commit()
    for name, image in images().items():
        if only and name not in only:
            continue
        dockerfile = f"images/{name}/Dockerfile"
        build = [tool, "bud" if tool == "buildah" else "build", "-f", dockerfile, "-t", image,
                 "--build-arg", f"STEP3VL_GIT_COMMIT={commit}", "."]
        cmds.append(build)
        if push:
            cmds.append([tool, "push", image])
    return cmds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    b = sub.add_parser("build")
    b.add_argument("--tool", default="docker", choices=["docker", "podman", "buildah"])
    b.add_argument("--push", action="store_true")
    b.add_argument("--only", action="append", choices=sorted(images()))
    b.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name, image in images().items():
            print(f"{image}  <- images/{name}/Dockerfile")
        return 0
    for cmd in commands(args.tool, args.push, args.only):
        print("+", shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
