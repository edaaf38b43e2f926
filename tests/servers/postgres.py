"""A real throw-away PostgreSQL server for integration tests, in a temporary directory.

``initdb`` then ``postgres`` in the foreground (so it dies with the process that started it, via
PR_SET_PDEATHSIG, even if that one is killed) on a free 127.0.0.1 port with trust auth; fsync off
(test data). PostgreSQL refuses to run as root: as root, both run as the ``postgres`` user that
Debian's package creates, and the data directory is handed to it.

Binaries come from Debian's ``postgresql`` (``scripts/install-test-servers.sh``): ``initdb`` on PATH or
under ``/usr/lib/postgresql/<major>/bin``. Stdlib only::

    python tests/servers/postgres.py     # prints the DSN, serves until Ctrl-C
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from servers.radosgw import ServerError, _die_with_parent, _free_port
except ImportError:  # run as a script: tests/servers/ is sys.path[0]
    from radosgw import ServerError, _die_with_parent, _free_port  # type: ignore[no-redef]

INSTALL_HINT = "run `bash scripts/install-test-servers.sh` as root (`make test` does this first)"


def bindir() -> Path | None:
    """Where initdb/postgres/pg_isready/createdb live (None when PostgreSQL is not installed)."""
    found = shutil.which("initdb")
    cands = [str(Path(found).resolve().parent)] if found else []
    cands += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for d in cands:
        if all((Path(d) / b).is_file() for b in ("initdb", "postgres", "pg_isready", "createdb")):
            return Path(d)
    return None


class PostgreSQL:
    """Start with :meth:`start` (returns a ``postgresql://`` DSN of database ``dbname``), stop with :meth:`stop`."""

    def __init__(self, dbname: str = "test", startup_timeout: float = 60.0) -> None:
        self.dbname, self.startup_timeout = dbname, startup_timeout
        self.dir: Path | None = None
        self.dsn: str | None = None
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None

    def _run(self, what: str, *args: str) -> None:
        proc = subprocess.run(args, capture_output=True, text=True, user=self._user, stdin=subprocess.DEVNULL,
                              timeout=120)
        if proc.returncode != 0:
            raise ServerError(f"postgres test server: {what} failed (rc={proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")

    def start(self) -> str:
        if self.dsn is not None:
            return self.dsn
        bd = bindir()
        if bd is None:
            raise ServerError(f"PostgreSQL binaries not found; {INSTALL_HINT}")
        self._user = "postgres" if os.geteuid() == 0 else None
        self.dir = Path(tempfile.mkdtemp(prefix="step3vl-postgres-"))
        data = self.dir / "data"
        try:
            if self._user:
                pw = pwd.getpwnam(self._user)
                os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._run("initdb", str(bd / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                      "--no-sync", "-E", "UTF8", "--locale=C")
            self.port = _free_port()
            with open(self.dir / "postgres.log", "wb") as log:
                self._proc = subprocess.Popen(
                    [str(bd / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.dir),
                     "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=200"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, user=self._user,
                    preexec_fn=_die_with_parent,  # runs after the uid change, which would clear it
                )
            deadline = time.monotonic() + self.startup_timeout
            while True:
                if self._proc.poll() is not None:
                    raise ServerError(f"postgres exited with rc={self._proc.returncode}:\n{self.log_tail()}")
                ready = subprocess.run([str(bd / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                                       stdin=subprocess.DEVNULL)
                if ready.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise ServerError(f"postgres not ready after {self.startup_timeout:g} s:\n{self.log_tail()}")
                time.sleep(0.1)
            self._run("createdb", str(bd / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                      self.dbname)
        except BaseException:
            self.stop()
            raise
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"
        return self.dsn

    def log_tail(self, lines: int = 20) -> str:
        if self.dir is None or not (self.dir / "postgres.log").is_file():
            return "(no log)"
        return "\n".join((self.dir / "postgres.log").read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then KILL; deletes the directory. Safe to call twice."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.dsn = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    started = time.monotonic()
    pg = PostgreSQL()
    try:
        dsn = pg.start()
    except ServerError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"# postgres ready in {time.monotonic() - started:.1f} s; Ctrl-C stops it\n{dsn}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
    pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
