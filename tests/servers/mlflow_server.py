"""A real MLflow tracking server for integration tests: ``mlflow server`` from this venv's PyPI package.

The production topology in miniature: ``--backend-store-uri postgresql://…`` (runs and the model
registry in PostgreSQL, via psycopg2) and ``--artifacts-destination s3://…`` (run artifacts proxied to
S3 through boto3; the S3 endpoint and keys come in ``env``). It runs in the foreground on a free
127.0.0.1 port and dies with the process that started it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

try:
    from servers.radosgw import ServerError, _die_with_parent, _free_port
except ImportError:  # run as a script: tests/servers/ is sys.path[0]
    from radosgw import ServerError, _die_with_parent, _free_port  # type: ignore[no-redef]


class MlflowServer:
    """``start()`` returns the tracking URI once ``/health`` answers; ``stop()`` ends it."""

    def __init__(self, backend_store_uri: str, artifacts_destination: str, env: dict[str, str] | None = None, *,
                 workers: int = 2, startup_timeout: float = 90.0) -> None:
        self.backend_store_uri, self.artifacts_destination = backend_store_uri, artifacts_destination
        self.env, self.workers, self.startup_timeout = dict(env or {}), workers, startup_timeout
        self.url: str | None = None
        self.dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        if self.url is not None:
            return self.url
        exe = Path(sys.executable).parent / "mlflow"
        if not exe.is_file():
            raise ServerError(f"no mlflow executable next to {sys.executable}")
        self.dir = Path(tempfile.mkdtemp(prefix="step3vl-mlflow-"))
        port = _free_port()
        env = {**os.environ, **self.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.dir / "server.log", "wb") as log:
            self._proc = subprocess.Popen(
                [str(exe), "server", "--backend-store-uri", self.backend_store_uri,
                 "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", str(self.workers)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                preexec_fn=_die_with_parent, start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                if self._proc.poll() is not None:
                    raise ServerError(f"mlflow server exited with rc={self._proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(urllib.error.URLError, OSError):
                    with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise ServerError(f"mlflow server not healthy after {self.startup_timeout:g} s:\n{self.log_tail()}")
                time.sleep(0.25)
        except BaseException:
            self.stop()
            raise
        self.url = url
        return url

    def log_text(self) -> str:
        if self.dir is None or not (self.dir / "server.log").is_file():
            return ""
        return (self.dir / "server.log").read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def stop(self) -> None:
        """TERM the server's process group (uvicorn workers included), then KILL; safe to call twice."""
        import signal

        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=3)  # uvicorn drains open keep-alive connections: do not wait long
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=10)
        self._proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.url = None
