"""Pytest fixtures that start real servers for integration tests (loaded from conftest.py).

``radosgw_server`` is one Ceph radosgw per test session; ``s3_env`` points step3vl's storage at it
through the ``AWS_*`` environment variables and makes sure the test bucket exists. A test may stop
the server (to check the failure path); the next ``s3_env`` user then gets a fresh one.
Missing Ceph binaries fail the tests rather than skip them: ``make test`` installs them first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers.radosgw import INSTALL_HINT, RadosGW, S3Server, missing_binaries

S3_TEST_BUCKET = "step3vl-test"


@pytest.fixture(scope="session")
def radosgw_server() -> Iterator[RadosGW]:
    """The session's radosgw manager, started; ``.server`` holds endpoint and keys."""
    missing = missing_binaries()
    if missing:
        pytest.fail(f"integration tests need Ceph ({', '.join(missing)} not found); {INSTALL_HINT}", pytrace=False)
    gw = RadosGW()
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def s3_env(radosgw_server: RadosGW, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """``AWS_*`` set for the running radosgw (restarted if a previous test stopped it), bucket created; the node's
    cache of what is fetched from S3 (``s3://`` checkpoints, streamed data) in the test's own folder."""
    from step3vl.storage import NODE_CACHE_ENV, open_store

    monkeypatch.setenv(NODE_CACHE_ENV, str(tmp_path / "node-cache"))

    server = radosgw_server.start()
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    open_store(f"s3://{S3_TEST_BUCKET}", create=True)
    return server
