"""`step3vl serve` under hostile traffic: broken JSON and wrong types, slow clients, 400 clients at once.

Every answer must be a 2xx, 4xx or 429 in the OpenAI error shape, never a 5xx or a dropped
connection, and the server must answer normally afterwards (the limit tests live in test_serve.py).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
from test_serve import checkpoint, served  # noqa: F401 (module fixtures: a random tiny checkpoint, loaded)

from step3vl.serve.app import create_app, start_in_thread
from step3vl.serve.config import ServeConfig

KEY = "rel-key"
QUEUE = 128


@pytest.fixture(scope="module")
def server(served):  # noqa: F811
    srv = start_in_thread(create_app(served, ServeConfig(api_key=KEY, max_tokens=64, max_n=4,
                                                         max_request_bytes=512 << 10, max_pending=QUEUE)))
    yield srv
    srv.stop()


def _post(base_url: str, body: bytes, ctype: str = "application/json", timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(urlparse(base_url).netloc, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": ctype})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _healthy(base_url: str, name: str) -> None:
    status, body = _post(base_url, json.dumps({"model": name, "messages": [{"role": "user", "content": "2+2?"}],
                                               "max_tokens": 2}).encode())
    assert status == 200, body


def test_malformed_json_and_wrong_types_are_4xx(server, served, reliability):  # noqa: F811
    ok = {"model": served.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bodies = {
        "truncated JSON": b'{"model": "x", "messages": [',
        "not JSON": b"hello there",
        "invalid UTF-8": b'{"model": "\xff\xfe"}',
        "a JSON array": b"[]",
        "JSON null": b"null",
        "100k-deep nesting": b"[" * 100_000 + b"]" * 100_000,
        "NaN literal": json.dumps({**ok, "temperature": float("nan")}).encode(),
        "messages as a string": json.dumps({**ok, "messages": "hi"}).encode(),
        "role as a number": json.dumps({**ok, "messages": [{"role": 5, "content": "hi"}]}).encode(),
        "content as an object": json.dumps({**ok, "messages": [{"role": "user", "content": {"a": 1}}]}).encode(),
        "max_tokens as text": json.dumps({**ok, "max_tokens": "ten"}).encode(),
        "max_tokens huge": json.dumps({**ok, "max_tokens": 10**30}).encode(),
        "max_tokens negative": json.dumps({**ok, "max_tokens": -1}).encode(),
        "n zero": json.dumps({**ok, "n": 0}).encode(),
        "n over the limit": json.dumps({**ok, "n": 10**6}).encode(),
        "temperature as text": json.dumps({**ok, "temperature": "hot"}).encode(),
        "stop as a number": json.dumps({**ok, "stop": 7}).encode(),
        "seed as a float": json.dumps({**ok, "seed": 1.5}).encode(),
        "image_url not an object": json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": 12}]}]}).encode(),
        "unknown content part": json.dumps({**ok, "messages": [{"role": "user", "content": [
            {"type": "video", "video": "x"}]}]}).encode(),
    }
    codes = {}
    for what, body in bodies.items():
        status, raw = _post(server.base_url, body)
        codes[what] = status
        assert 400 <= status < 500, (what, status, raw[:300])
        err = json.loads(raw)["error"]
        assert {"message", "type", "code"} <= set(err), (what, raw[:300])
    status, _ = _post(server.base_url, json.dumps(ok).encode(), ctype="text/plain")
    assert status < 500
    _healthy(server.base_url, served.name)
    reliability.record("serve-bad-requests", outcome=f"{len(bodies)} malformed/wrong-type bodies: statuses "
                       f"{sorted(set(codes.values()))}, all in the OpenAI error shape; server answered afterwards",
                       data_lost="n/a", statuses=codes)


@pytest.mark.slow
def test_slow_clients_do_not_block_others(server, served, reliability):  # noqa: F811
    host, port = urlparse(server.base_url).netloc.split(":")
    stalled = []
    body = json.dumps({"model": served.name, "messages": [{"role": "user", "content": "hi " * 200}]}).encode()
    for i in range(40):
        s = socket.create_connection((host, int(port)), timeout=10)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        s.sendall(head + body[: len(body) // 2] if i % 2 else head[: len(head) // 2])  # half a body / half headers
        stalled.append(s)
    try:
        t0 = time.perf_counter()
        for _ in range(3):
            _healthy(server.base_url, served.name)
        served_in = (time.perf_counter() - t0) / 3
        assert served_in < 10, f"a normal request took {served_in:.1f} s behind 40 stalled clients"
    finally:
        for s in stalled:
            s.close()
    time.sleep(0.2)
    _healthy(server.base_url, served.name)
    reliability.record("serve-slow-clients", outcome=f"40 stalled connections (half headers / half bodies) held "
                       f"open; normal requests answered in {served_in:.2f} s each meanwhile; healthy after they left",
                       data_lost="n/a")


@pytest.mark.slow
def test_400_concurrent_requests_are_200_or_429(server, served, reliability):  # noqa: F811
    import psutil

    proc = psutil.Process()
    before = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()

    def one(i: int) -> int | str:
        body = json.dumps({"model": served.name, "max_tokens": 4, "seed": i,
                           "messages": [{"role": "user", "content": f"What is {i} + 1?"}]}).encode()
        try:
            status, raw = _post(server.base_url, body, timeout=120)
        except OSError as e:  # a dropped or refused connection
            return type(e).__name__
        if status == 429:
            assert json.loads(raw)["error"]["code"] == "queue_full"
        return status

    t0 = time.perf_counter()
    barrier_start = threading.Barrier(400, timeout=60)

    def together(i: int) -> int | str:
        barrier_start.wait()
        return one(i)

    with ThreadPoolExecutor(400) as pool:
        results = list(pool.map(together, range(400)))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    counts = {str(k): results.count(k) for k in set(results)}
    assert set(results) <= {200, 429}, counts
    assert results.count(200) >= QUEUE // 2, counts
    growth = (peak - before) / 2**20
    assert growth < 500, f"RSS grew by {growth:.0f} MiB"
    assert server.app.state.batcher.pending == 0
    _healthy(server.base_url, served.name)
    reliability.record("serve-overload", outcome=f"400 clients at once (queue {QUEUE}): {results.count(200)} x 200, "
                       f"{results.count(429)} x 429 queue_full, no 5xx or dropped connection, {wall:.1f} s; "
                       f"RSS +{growth:.0f} MiB; healthy afterwards", data_lost="n/a", counts=counts,
                       rss_growth_mib=round(growth))
