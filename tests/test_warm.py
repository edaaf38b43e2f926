"""Warm task processes for ``kfp.local`` (step3vl.pipeline.warm): the launcher command is recognised and
nothing else is, a task runs in a forked child with the runner's environment and working directory, its
output, outputs and exit status reach the runner as a subprocess's would, and a failing task fails."""


import os
import types

import pytest
from kfp import dsl, local
from kfp.dsl import Output

from step3vl.errors import Step3VLError
from step3vl.pipeline import warm


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def where(tag: str, out: Output[dsl.Artifact]) -> int:
    import os
    import sys

    print(f"task says {tag} from pid {os.getpid()} in {os.getcwd()}; X={os.environ.get('STEP3VL_TEST_X')}")
    print("to stderr", file=sys.stderr)
    with open(out.path, "w") as f:
        f.write(f"{os.getpid()} {os.getppid()} {os.environ.get('_KFP_RUNTIME')}")
    return os.getpid()


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fails(code: int):
    import sys

    if code:
        sys.exit(code)
    raise ValueError("the stage went wrong here")


def _command(component) -> list[str]:
    c = component.component_spec.implementation.container
    return [*c.command, *c.args]


def test_parse_recognises_the_lightweight_launcher_and_nothing_else():
    cmd = [*_command(where)[:3], "SOURCE", "--executor_input", "{}", "--function_to_execute", "where"]
    call = warm.parse_lightweight(cmd)
    assert call == warm.LightweightCall("SOURCE", ("--executor_input", "{}", "--function_to_execute", "where"))
    # the real component's command carries its source as the script's $0
    real = warm.parse_lightweight(_command(where))
    assert real is not None and "def where(" in real.source
    assert warm.parse_lightweight(["python", "-m", "kfp.dsl.executor_main", "--x"]) is None
    assert warm.parse_lightweight(["sh", "-c", "echo hi", "x"]) is None  # a container component
    pip = cmd[:2] + ["python3 -m pip install torch && " + cmd[2]] + cmd[3:]
    assert warm.parse_lightweight(pip) is None  # installs first: kfp.local's own path


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv(warm.ENV, raising=False)
    assert warm.enabled()
    monkeypatch.setenv(warm.ENV, "0")
    assert not warm.enabled()
    monkeypatch.setenv(warm.ENV, "sometimes")
    with pytest.raises(Step3VLError, match="STEP3VL_WARM_TASKS='sometimes'"):
        warm.enabled()


def test_hook_refuses_a_kfp_it_was_not_written_for():
    def run_local_subprocess(cmd, env=None, timeout=None):
        return 0

    with pytest.raises(Step3VLError, match="not the .full_command, env_vars."):
        warm._check_hook(types.SimpleNamespace(run_local_subprocess=run_local_subprocess))


def _init(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=False)


def test_task_runs_forked_with_the_runners_env_and_cwd(tmp_path, monkeypatch, capsys):
    from multiprocessing import forkserver

    from kfp.local import subprocess_task_handler

    original = subprocess_task_handler.run_local_subprocess
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STEP3VL_TEST_X", "from-the-runner")  # set after the server may have started
    _init(tmp_path)
    with warm.warm_tasks():
        assert subprocess_task_handler.run_local_subprocess is not original
        task = where(tag="hello")
        server_pid = forkserver._forkserver._forkserver_pid
    assert subprocess_task_handler.run_local_subprocess is original  # restored
    assert server_pid and forkserver._forkserver._forkserver_pid is None  # the server ended with the run
    with pytest.raises(ChildProcessError):
        os.waitpid(server_pid, os.WNOHANG)  # and was reaped
    out = capsys.readouterr().out
    assert f"task says hello from pid {task.outputs['Output']} in {tmp_path}; X=from-the-runner" in out
    assert "to stderr" in out
    pid, ppid, runtime = open(task.outputs["out"].path).read().split()
    assert int(pid) == task.outputs["Output"] != os.getpid() and runtime == "true"
    assert int(ppid) == server_pid  # a child of the warm server, not a fresh python


def test_failing_task_fails_with_its_traceback_and_exit_status(tmp_path, monkeypatch, capsys):
    from kfp.local import subprocess_task_handler

    codes: list[int] = []
    _init(tmp_path)
    with warm.warm_tasks():
        hook = subprocess_task_handler.run_local_subprocess
        monkeypatch.setattr(subprocess_task_handler, "run_local_subprocess",
                            lambda full_command, env_vars=None: codes.append(hook(full_command, env_vars)) or codes[-1])
        fails(code=0)  # an uncaught exception: its traceback, status 1
        fails(code=3)  # sys.exit(3): status 3
    assert codes == [1, 3]
    out = capsys.readouterr().out
    assert "Traceback" in out and "ValueError: the stage went wrong here" in out


def test_the_server_preloads_every_module_a_component_imports():
    """A component importing a module the server did not preload still runs, only slower: keep them in step.
    (A task runs only its function's source, so the imports inside the function are what it needs.)"""
    import ast
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    preloaded = {n.names[0].name for n in ast.walk(ast.parse((root / "src/step3vl/pipeline/_preload.py").read_text()))
                 if isinstance(n, ast.Import)}
    needed = set()
    for path in (root / "components").glob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("step3vl"):
                        for alias in node.names:  # `from pkg import module` or `from module import name`
                            sub = f"{node.module}.{alias.name}"
                            is_module = _is_pkg(node.module) and importlib.util.find_spec(sub) is not None
                            needed.add(sub if is_module else node.module)
    assert len(needed) >= 9 and needed <= preloaded, needed - preloaded


def _is_pkg(name: str) -> bool:
    import importlib.util

    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None
