"""Serving throughput and latency: ``measure(...)`` drives a server with N concurrent clients.

Each client sends chat completions back to back on its own keep-alive connection; a level's
throughput is the completion tokens all clients received divided by the level's wall time, and
its latencies are the per-request wall times (p50 / p95). With no ``base_url`` the model is
loaded and served in-process on a free port for the run.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from typing import Any, Sequence
from urllib.parse import urlparse


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _client(netloc: str, body: bytes, headers: dict[str, str], n: int, out: list[tuple[float, int, int]]) -> None:
    conn = http.client.HTTPConnection(netloc, timeout=600)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, headers)
            resp = conn.getresponse()
            data = resp.read()
            dt = time.perf_counter() - t0
            tokens = json.loads(data)["usage"]["completion_tokens"] if resp.status == 200 else 0
            out.append((dt, tokens, resp.status))
    finally:
        conn.close()


def _level(netloc: str, body: bytes, headers: dict[str, str], clients: int, per_client: int) -> dict[str, Any]:
    results: list[tuple[float, int, int]] = []
    threads = [threading.Thread(target=_client, args=(netloc, body, headers, per_client, results))
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2] == 200]
    lat = [r[0] for r in ok]
    tokens = sum(r[1] for r in ok)
    return {
        "concurrency": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "completion_tokens": tokens,
        "wall_s": round(wall, 4),
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "p50_latency_s": round(_percentile(lat, 0.50), 4),
        "p95_latency_s": round(_percentile(lat, 0.95), 4),
        "mean_latency_s": round(statistics.fmean(lat), 4) if lat else float("nan"),
    }


def measure(base_url: str | None = None, *, model: str | None = None, concurrency: Sequence[int] = (1, 16),
            requests_per_client: int = 4, max_tokens: int = 32, temperature: float = 1.0,
            prompt: str = "Describe a red square on a white background in one sentence.",
            api_key: str | None = None, model_name: str | None = None) -> dict[str, Any]:
    """Throughput (completion tokens/s) and p50/p95 request latency at each ``concurrency`` level.

    Either ``base_url`` of a running server (``http://host:port``) or ``model`` (a checkpoint URI,
    served in-process for the run). Returns ``{"model", "max_tokens", "levels": {"1": {...}, ...}}``
    where each level has ``tokens_per_s``, ``p50_latency_s``, ``p95_latency_s``, ``requests``,
    ``errors`` and ``wall_s``.
    """
    if (base_url is None) == (model is None):
        raise ValueError("give exactly one of base_url (a running server) or model (a checkpoint to serve)")
    server = None
    if base_url is None:
        from step3vl.serve.app import create_app, load_served, start_in_thread
        from step3vl.serve.config import ServeConfig

        served = load_served(str(model))
        cfg = ServeConfig(max_tokens=max(max_tokens, 1), max_pending=max(256, 2 * max(concurrency)))
        server = start_in_thread(create_app(served, cfg))
        base_url, model_name = server.base_url, served.name
    try:
        netloc = urlparse(base_url).netloc
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if model_name is None:
            conn = http.client.HTTPConnection(netloc, timeout=60)
            conn.request("GET", "/v1/models", headers=headers)
            model_name = json.loads(conn.getresponse().read())["data"][0]["id"]
            conn.close()
        body = json.dumps({"model": model_name, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        _level(netloc, body, headers, 1, 1)  # warm-up: first-call allocations, lazy imports
        levels = {str(c): _level(netloc, body, headers, int(c), requests_per_client) for c in concurrency}
        return {"model": model_name, "max_tokens": max_tokens, "levels": levels}
    finally:
        if server is not None:
            server.stop()
