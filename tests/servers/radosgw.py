"""A real one-node Ceph S3 server (radosgw) for integration tests, in a temporary directory.

One monitor, one OSD on ``memstore`` (RAM, nothing on disk) and ``radosgw -f`` serving S3 on a free
127.0.0.1 port; pool size 1, no cephx (``auth_*_required = none``) and every ``ms_*_mode = crc
secure`` (without these radosgw hangs in AUTH_CONNECTING). Every file, socket, log and pid lives
under the temp dir, so nothing system-wide changes and a second start is independent of the first.
The daemons die with the process that started them (PR_SET_PDEATHSIG), even if it is killed.

Binaries come from Debian's ``ceph-mon ceph-osd radosgw`` (``scripts/install-test-servers.sh``).
Stdlib only, so it runs from the test fixture or as a CLI::

    python tests/servers/radosgw.py     # prints export lines, serves until Ctrl-C
"""

from __future__ import annotations

import contextlib
import ctypes
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

REQUIRED_BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
INSTALL_HINT = "run `bash scripts/install-test-servers.sh` as root (`make test` does this first)"


class ServerError(RuntimeError):
    """The test server could not be started; the message says which step failed and shows its log."""


@dataclass(frozen=True)
class S3Server:
    """Where a running radosgw answers and the keys of its test user."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The environment variables step3vl's storage reads."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


def missing_binaries() -> list[str]:
    """Ceph binaries this module needs that are not on PATH."""
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the parent dies, so no daemon outlives a killed test run."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RadosGW:
    """Start with :meth:`start` (or ``with RadosGW() as s3:``), stop with :meth:`stop`."""

    def __init__(self, startup_timeout: float = 120.0) -> None:
        self.startup_timeout = startup_timeout
        self.dir: Path | None = None
        self.server: S3Server | None = None
        self._procs: list[subprocess.Popen[bytes]] = []

    # ------------------------------------------------------------------ helpers

    def _conf(self) -> str:
        assert self.dir is not None
        return str(self.dir / "ceph.conf")

    def _run(self, what: str, *args: str, timeout: float = 60.0) -> str:
        """Run a ceph tool against this cluster; ServerError with its output on failure."""
        try:
            proc = subprocess.run(
                [*args, "-c", self._conf()],
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"radosgw test server: {what} timed out after {timeout:g} s ({' '.join(args)})") from None
        if proc.returncode != 0:
            raise ServerError(
                f"radosgw test server: {what} failed (rc={proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc.stdout

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        assert self.dir is not None
        with open(self.dir / "log" / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                [*args, "-c", self._conf()],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
                cwd=self.dir,
            )
        self._procs.append(proc)
        return proc

    def _log_tail(self, name: str, lines: int = 15) -> str:
        assert self.dir is not None
        chunks = []
        for path in (self.dir / "log" / f"{name}.out", self.dir / "log" / f"{name}.log"):
            if path.is_file():
                text = path.read_text(errors="replace").strip().splitlines()[-lines:]
                chunks.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(chunks) or "(no log)"

    def _write_conf(self, fsid: str, mon_port: int, rgw_port: int) -> None:
        assert self.dir is not None
        d = self.dir
        conf = f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
mon_initial_members = a
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_cluster_mode = crc secure
ms_service_mode = crc secure
ms_client_mode = crc secure
ms_mon_cluster_mode = crc secure
ms_mon_service_mode = crc secure
ms_mon_client_mode = crc secure
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
osd_objectstore = memstore
memstore_device_bytes = 2147483648
mon_data_avail_warn = 2
mon_data_avail_crit = 1
run_dir = {d}/run
crash_dir = {d}/crash
exec_tmp_dir = {d}/tmp
admin_socket = {d}/run/$name.asok
pid_file = {d}/run/$name.pid
log_file = {d}/log/$name.log
mon_cluster_log_file = default={d}/log/ceph.$channel.log cluster={d}/log/ceph.log
keyring = {d}/keyring
mon_data = {d}/mon/$name
osd_data = {d}/osd/$name
rgw_data = {d}/rgw/$name

[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
"""
        (d / "ceph.conf").write_text(conf)

    def _wait_http(self, url: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerError(f"radosgw exited with rc={proc.returncode} during start-up\n{self._log_tail('rgw')}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # any S3 answer (even 403) means the gateway serves requests
            except (urllib.error.URLError, OSError):
                time.sleep(0.3)
        raise ServerError(f"radosgw did not answer on {url} within {self.startup_timeout:g} s\n{self._log_tail('rgw')}")

    # ------------------------------------------------------------------ API

    def start(self) -> S3Server:
        """Start monitor, OSD and radosgw; returns the endpoint and keys once S3 answers."""
        missing = missing_binaries()
        if missing:
            raise ServerError(f"Ceph binaries not installed: {', '.join(missing)}; {INSTALL_HINT}")
        if self.server is not None:
            return self.server
        self.dir = Path(tempfile.mkdtemp(prefix="step3vl-radosgw-"))
        deadline = time.monotonic() + self.startup_timeout
        try:
            for sub in ("run", "log", "mon", "osd", "rgw", "crash", "tmp"):
                (self.dir / sub).mkdir()
            fsid = str(uuid.uuid4())
            mon_port, rgw_port = _free_port(), _free_port()
            self._write_conf(fsid, mon_port, rgw_port)

            monmap = str(self.dir / "monmap")
            subprocess.run(
                ["monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{mon_port}]", "--fsid", fsid, monmap],
                check=True,
                capture_output=True,
            )
            self._run("ceph-mon --mkfs", "ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
            self._spawn("mon", "ceph-mon", "-f", "-i", "a")
            # `ceph osd new` also waits for the monitor to form quorum.
            osd_uuid = str(uuid.uuid4())
            osd_id = self._run("ceph osd new", "ceph", "--connect-timeout", "30", "osd", "new", osd_uuid).strip()
            (self.dir / "osd" / f"osd.{osd_id}").mkdir()
            self._run("ceph-osd --mkfs", "ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._spawn("osd", "ceph-osd", "-f", "-i", osd_id)

            access_key = "STEP3VLTEST" + secrets.token_hex(6).upper()
            secret_key = secrets.token_urlsafe(30)
            rgw = self._spawn("rgw", "radosgw", "-f", "-n", "client.rgw.a")
            endpoint = f"http://127.0.0.1:{rgw_port}"
            self._wait_http(endpoint + "/", rgw, deadline)
            self._run(
                "radosgw-admin user create",
                "radosgw-admin", "user", "create", "--uid=step3vl-test", "--display-name=step3vl test",
                f"--access-key={access_key}", f"--secret-key={secret_key}",
            )  # fmt: skip
        except BaseException:
            self.stop()
            raise
        self.server = S3Server(endpoint=endpoint, access_key=access_key, secret_key=secret_key)
        return self.server

    def stop(self) -> None:
        """Kill every daemon (TERM, then KILL) and delete the temp directory. Safe to call twice."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
        end = time.monotonic() + 2  # memstore holds nothing worth a graceful OSD shutdown
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, end - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.server = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    """CLI: start a server, print ``export`` lines for it, serve until Ctrl-C / SIGTERM."""
    gw = RadosGW()
    started = time.monotonic()
    try:
        server = gw.start()
    except ServerError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"# radosgw ready in {time.monotonic() - started:.1f} s (data in {gw.dir}); Ctrl-C stops it")
    for key, value in server.env().items():
        print(f"export {key}={value}")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
