"""Warm task processes for ``kfp.local``: fork each task from a process that has already imported the stack.

``kfp.local.SubprocessRunner`` starts every task as ``sh -ec '<kfp launcher script>' <component source>
--executor_input ... --function_to_execute ...``: a fresh interpreter that imports torch, transformers and
MLflow again before the stage does any work, about 5 s a task on this machine's two cores. Inside
:func:`warm_tasks`, a lightweight-component task (the only kind this project's DAG has) runs instead in a
child forked from a ``multiprocessing`` fork server that imported :data:`PRELOAD` once. The child does what
the launcher script does (write the component source to a temporary ``ephemeral_component.py``, set
``_KFP_RUNTIME=true``, run ``python -m kfp.dsl.executor_main --component_module_path <that file> <args>``)
with the parent's current environment and working directory, streams its stdout and stderr to the runner
line by line, runs its ``atexit`` handlers, and exits with the executor's status. What a task computes and
writes is the same either way; only the imports are shared.

Anything else (a container component, a ``pip install``, a command this module does not recognise) goes to
``kfp.local``'s own subprocess path unchanged. The fork server starts with the first task that runs (a
fully cached run never starts it) and is stopped and reaped when the run ends. It and its tasks are in the
run's process group: ``kill -- -PGID`` kills them all, as it kills subprocess tasks, and Ctrl-C reaches the
running task as it reaches a subprocess.

``STEP3VL_WARM_TASKS=0`` (or ``step3vl run --cold-tasks``) runs every task in a fresh interpreter instead.
The hook replaces ``kfp.local.subprocess_task_handler.run_local_subprocess`` while a run lasts; if a
``kfp`` other than the pinned one changes that function's signature, the run stops with an error that
says so instead of guessing.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import io
import multiprocessing
import os
import runpy
import sys
import tempfile
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from step3vl.errors import Step3VLError

ENV = "STEP3VL_WARM_TASKS"
# what every stage imports before it starts work (multiprocessing skips a preload module that fails to import:
# the tasks then import what they need themselves, as a fresh interpreter would, only slower)
PRELOAD = ["step3vl.pipeline._preload"]
_LAUNCHER_MARKERS = ('"$program_path/ephemeral_component.py"', "kfp.dsl.executor_main")


@dataclass(frozen=True)
class LightweightCall:
    """A ``kfp.local`` lightweight-component task: its component source and the executor's arguments."""

    source: str
    args: tuple[str, ...]


def parse_lightweight(full_command: list[str]) -> LightweightCall | None:
    """The component source and executor arguments of KFP's lightweight launcher command, or ``None`` if
    ``full_command`` is anything else (then the task runs as ``kfp.local`` would run it)."""
    if len(full_command) < 4 or full_command[0] != "sh" or full_command[1] not in ("-ec", "-c"):
        return None
    script = full_command[2]
    if not all(m in script for m in _LAUNCHER_MARKERS) or "pip install" in script:
        return None
    return LightweightCall(source=full_command[3], args=tuple(full_command[4:]))


def enabled() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise Step3VLError(f"${ENV}={os.environ[ENV]!r}: expected 1 (fork warm task processes) or 0 (a fresh "
                       "interpreter per task)")


def _child(call: LightweightCall, env: dict[str, str], cwd: str, out: Any) -> None:
    """In the forked task process: the KFP launcher script's steps, then exit with the executor's status."""
    fd = out.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    out.close()
    # fresh text streams on the pipe, line-buffered like a pipe-fed interpreter's stderr (and flushed at exit)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    os.environ["_KFP_RUNTIME"] = "true"
    tempfile.tempdir = None  # re-read $TMPDIR (the server may have cached its own)
    os.chdir(cwd)
    program = tempfile.mkdtemp()
    path = os.path.join(program, "ephemeral_component.py")
    with open(path, "w") as f:
        f.write(call.source)
    sys.argv = [sys.executable, "--component_module_path", path, *call.args]
    code: int
    try:
        runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # what an interpreter does with an uncaught exception: traceback, status 1
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def run_task(call: LightweightCall, env_vars: dict[str, str] | None = None) -> int:
    """Run one task in a child of the fork server, printing its output line by line (as ``kfp.local`` does
    with a subprocess's); returns its exit status (negative: killed by that signal)."""
    ctx = multiprocessing.get_context("forkserver")
    read, write = ctx.Pipe(duplex=False)
    env = {**os.environ, **(env_vars or {})}
    proc = ctx.Process(target=_child, args=(call, env, os.getcwd(), write), name="kfp-task", daemon=False)
    proc.start()
    write.close()
    try:
        with open(read.fileno(), encoding="utf-8", errors="replace", closefd=False) as lines:
            for line in lines:
                print(line, end="")
    finally:
        read.close()
        proc.join()  # as subprocess.Popen's context does, also when the runner is interrupted
    print("\n")  # kfp.local's separator after a task's streamed logs
    return int(proc.exitcode if proc.exitcode is not None else 1)


def _check_hook(handler: Any) -> None:
    params = list(inspect.signature(handler.run_local_subprocess).parameters)
    if params != ["full_command", "env_vars"]:
        raise Step3VLError(f"kfp.local.subprocess_task_handler.run_local_subprocess{params} is not the "
                           "(full_command, env_vars) this hook was written for (kfp 2.17); run with "
                           f"{ENV}=0 or pin the kfp version in pyproject.toml")


@contextlib.contextmanager
def warm_tasks(on: bool = True) -> Iterator[None]:
    """While open, ``kfp.local``'s subprocess runner forks lightweight-component tasks from the warm fork
    server, which the first task that runs starts."""
    if not on:
        yield
        return
    from kfp.local import subprocess_task_handler as handler

    _check_hook(handler)
    original = handler.run_local_subprocess
    # the server starts with the first task that runs (a fully cached run never starts it)
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)

    def run_local_subprocess(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        call = parse_lightweight(full_command)
        if call is None:
            return original(full_command, env_vars)
        return run_task(call, env_vars)

    from multiprocessing import forkserver

    server = forkserver._forkserver
    already = server._forkserver_pid is not None
    handler.run_local_subprocess = run_local_subprocess
    try:
        yield
    finally:
        handler.run_local_subprocess = original
        if not already:
            # stop and reap the server this run started: it ends with the run (its tasks' CPU time is then
            # accounted to this process's children, as a subprocess task's is), and the next run's server
            # imports the code as it is then
            server._stop()

