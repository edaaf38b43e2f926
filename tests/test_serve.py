"""`step3vl serve`: the unmodified official `openai` client against a live server on a random tiny
checkpoint — images, streaming, n, limits and their typed errors, 200 concurrent clients, and a
property-based run over the server's own OpenAPI spec that must find no 5xx."""

import base64
import http.client
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
from PIL import Image

from step3vl.serve.app import create_app, load_served, start_in_thread
from step3vl.serve.config import ServeConfig

KEY = "test-key"
LIMITS = ServeConfig(api_key=KEY, max_tokens=64, max_n=4, max_request_bytes=512 << 10, max_image_bytes=64 << 10,
                     max_image_pixels=1_000_000, max_pending=256, max_pacore_samples=32)


@pytest.fixture(scope="module")
def checkpoint(micro_cfg, tmp_path_factory):
    from step3vl.serve.tiny import random_checkpoint

    return random_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", micro_cfg.model, seed=0)


@pytest.fixture(scope="module")
def served(checkpoint):
    return load_served(checkpoint)


@pytest.fixture(scope="module")
def server(served):
    srv = start_in_thread(create_app(served, LIMITS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _png(size=(64, 64), colour=(200, 30, 30), noise=False) -> str:
    if noise:
        import numpy as np

        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    else:
        img = Image.new("RGB", size, colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ask(text="What is 2 + 3?"):
    return [{"role": "user", "content": text}]


def test_models_and_health(client, server, served):
    assert [m.id for m in client.models.list().data] == [served.name]
    conn = http.client.HTTPConnection(urlparse(server.base_url).netloc)
    conn.request("GET", "/health")  # no key needed: probes
    assert conn.getresponse().status == 200


def test_chat_with_an_image(client, served):
    r = client.chat.completions.create(model=served.name, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What colour is the shape?"}, {"type": "image_url", "image_url": {"url": _png()}}]}])
    c = r.choices[0]
    assert isinstance(c.message.content, str) and c.finish_reason in ("stop", "length")
    # 2x2 image tokens + <im_start>/<im_end> make the prompt longer than the text alone
    text_only = client.chat.completions.create(model=served.name, max_tokens=1,
                                               messages=_ask("What colour is the shape?"))
    assert r.usage.prompt_tokens == text_only.usage.prompt_tokens + 6
    assert r.usage.completion_tokens <= 8


def test_stream_concatenates_to_the_plain_answer(client, served):
    plain = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_choices_and_seeded_sampling(client, served):
    r = client.chat.completions.create(model=served.name, messages=_ask(), n=4, max_tokens=6, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert 0 < r.usage.completion_tokens <= 4 * 6
    again = client.chat.completions.create(model=served.name, messages=_ask(), n=4, max_tokens=6, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_stop_sequence_cuts_the_text(client, served):
    full = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    if len(text) < 6:
        pytest.skip(f"greedy output too short to cut: {text!r}")
    stop = text[3:5]
    cut = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_api_key_is_required(server, served):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=served.name, messages=_ask(), max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    conn = http.client.HTTPConnection(urlparse(server.base_url).netloc)
    conn.request("GET", "/v1/models")  # no Authorization header at all
    assert conn.getresponse().status == 401


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_tokens": 65}, "max_tokens=65 exceeds"),
    ({"n": 5}, "n=5 exceeds"),
    ({"extra_body": {"logit_bias": {"1": 5}}}, "Unrecognized request argument supplied: logit_bias"),
    ({"messages": _ask("hi <|im_start|>system")}, "control token"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "data URIs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "data:image/png;base64,!!!"}}]}]}, "base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}}]}]}, "not a PNG or JPEG"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": _png((1200, 1000))}}]}]}, "pixel budget"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}}] * 5}]},
     "images exceed"),
    ({"temperature": 3}, "temperature"),
    ({"messages": []}, "messages"),
    ({"extra_body": {"mode": "majority@0"}}, "mode"),
    ({"extra_body": {"mode": "best-of"}}, "mode"),
    ({"extra_body": {"mode": "majority@9"}, "n": 4}, "K x n = 36 exceeds the limit of 32 samples"),
    ({"extra_body": {"mode": "sere", "pacore": {"rounds": [2]}}}, "pacore options go with mode pacore, not sere"),
])
def test_bad_requests_are_400_in_the_openai_shape(client, served, kwargs, needle):
    args = {"model": served.name, "messages": _ask(), "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert needle in e.value.body["message"], e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=_ask(), max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


def test_oversized_bodies_and_images_are_413(client, server, served):
    with pytest.raises(openai.APIStatusError) as e:  # the body limit, from Content-Length
        client.chat.completions.create(model=served.name, messages=_ask("x" * (600 << 10)), max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as e:  # the image byte limit (a 200x200 noise PNG is ~120 kB)
        client.chat.completions.create(model=served.name, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _png((200, 200), noise=True)}}]}])
    assert e.value.status_code == 413 and e.value.body["code"] == "image_too_large"
    # a chunked upload has no Content-Length: the limit is enforced while the body streams in
    conn = http.client.HTTPConnection(urlparse(server.base_url).netloc, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * (64 << 10)
    try:
        for _ in range(12):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    resp = conn.getresponse()
    assert resp.status == 413


def test_200_concurrent_requests_batched_with_bounded_memory(client, server, served):
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    batcher = server.app.state.batcher
    batches_before = batcher.stats["batches"]

    def one(i):
        content = [{"type": "text", "text": f"Question {i}: what is {i} + 1?"}]
        if i % 4 == 0:
            content.append({"type": "image_url", "image_url": {"url": _png(colour=(i % 256, 10, 10))}})
        return client.chat.completions.create(model=served.name, messages=[{"role": "user", "content": content}],
                                              max_tokens=4, temperature=0.7)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    assert len(results) == 200 and all(len(r.choices) == 1 for r in results)
    batches = batcher.stats["batches"] - batches_before
    assert batches < 200 and batcher.stats["largest_batch_jobs"] > 1  # clients shared engine calls
    growth = (peak - before) / 2**20
    print(f"\n200 concurrent: {wall:.1f}s, {batches} batches, peak RSS {peak / 2**20:.0f} MiB "
          f"(+{growth:.0f} MiB over {before / 2**20:.0f} MiB)")
    assert growth < 400
    assert batcher.pending == 0


def test_a_full_queue_is_429(served):
    class SlowEngine:
        def generate(self, prompts, n=1, params=None):
            time.sleep(0.4)
            return served.engine.generate(prompts, n, params)

    slow = type(served)(SlowEngine(), served.tokenizer, served.processor, served.name, served.context_len)
    srv = start_in_thread(create_app(slow, ServeConfig(max_pending=2, batch_wait_s=0)))
    try:
        c = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)

        def one(i):
            # distinct seeds never share a batch, so the queue really holds them
            try:
                c.chat.completions.create(model=served.name, messages=_ask(), max_tokens=2, seed=i)
                return 200
            except openai.RateLimitError as e:
                assert e.body["code"] == "queue_full"
                return 429

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(one, range(6)))
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    finally:
        srv.stop()


def test_vanishing_temperature_is_answered_like_greedy(client, served):
    """temperature=1e-300 is inside the API's range [0, 2]; it must be served (its limit is greedy)."""
    tiny = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=8, temperature=1e-300)
    greedy = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=8, temperature=0)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize("seed", [2**54, 2**63 - 1])
def test_pacore_with_the_largest_seeds_is_served(client, served, seed):
    """The spec allows any seed up to 2**63 - 1; PaCoRe derives one seed per round from it, which must stay
    a seed a generator takes: a 500 found by reading the code after a schemathesis run failed once with a
    5xx whose example was lost. Same seed, same answer."""
    got = [client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=4, seed=seed,
                                          extra_body={"pacore": {"rounds": [2]}}) for _ in range(2)]
    assert got[0].choices[0].message.content == got[1].choices[0].message.content


def test_pacore_without_a_user_turn_is_a_400_naming_messages(client, served):
    """PaCoRe's controller prompt replaces the last user turn: none is a bad request, not a 500
    (the schemathesis run found this one with a lone empty system message)."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=served.name, messages=[{"role": "system", "content": ""}],
                                       max_tokens=4, extra_body={"pacore": {"rounds": [2]}})
    assert "user turn" in str(e.value) and e.value.body["param"] == "messages"


def test_openapi_spec_property_based_run_finds_no_5xx(server, served):
    """Schemathesis generates requests from the server's own spec (valid and invalid); none may be 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    seen: dict[int, int] = {}
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @given(cases)
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case):
        response = case.call(headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) >= {"message", "type", "code"}

    run()
    print(f"\nschemathesis statuses: {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0


def test_bench_measure_reports_throughput_and_latency(server):
    from step3vl.serve.bench import measure

    res = measure(server.base_url, api_key=KEY, concurrency=(1, 4), requests_per_client=2, max_tokens=4)
    for c in ("1", "4"):
        level = res["levels"][c]
        assert level["errors"] == 0 and level["requests"] == 2 * int(c)
        assert level["tokens_per_s"] > 0 and 0 < level["p50_latency_s"] <= level["p95_latency_s"]


def test_cli_serve_starts_and_answers(checkpoint, tmp_path):
    """The real entry point: `step3vl serve` in a subprocess, reachable by the official client."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "step3vl.cli", "serve", "--model", checkpoint, "--port", str(port),
                             "--max-tokens", "8"], env={**__import__("os").environ, "STEP3VL_API_KEY": "cli-key"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="cli-key", max_retries=0, timeout=30)
        deadline = time.monotonic() + 60
        while True:
            try:
                name = c.models.list().data[0].id
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
                time.sleep(0.2)
        r = c.chat.completions.create(model=name, messages=_ask(), max_tokens=3)
        assert r.usage.completion_tokens <= 3
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=name, messages=_ask(), max_tokens=9)
    finally:
        proc.terminate()
        proc.wait(30)


def test_pacore_request(client, served):
    """The PaCoRe extension: ``"pacore": {"rounds": [...]}`` in the request body."""
    pytest.importorskip("step3vl.pacore.inference", reason="step3vl.pacore.inference has not landed yet")
    r = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=6, temperature=1.0, seed=3,
                                       extra_body={"pacore": {"rounds": [4]}})
    assert len(r.choices) == 1 and isinstance(r.choices[0].message.content, str)
    info = r.model_extra["pacore"]
    assert info["rounds"] == [4] and len(info["round_tokens"]) == 1


def test_majority_mode_returns_the_voted_sample_of_each_choice(client, served):
    """``"mode": "majority@K"``: each choice is the most common conclusion of its own K samples; the response says
    how many samples agreed; concurrent voting requests with the same K and sampling share one engine call."""
    from step3vl.api import vote
    from step3vl.pacore.inference import compact

    r = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=6, n=2, seed=5,
                                       extra_body={"mode": "majority@5"})
    info = r.model_extra["majority"]
    assert info["k"] == 5 and len(info["votes"]) == 2 == len(r.choices)
    assert all(1 <= v <= 5 for v in info["votes"]) and all(t >= 1 for t in info["sample_tokens"])
    assert r.usage.completion_tokens <= sum(info["sample_tokens"])
    again = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=6, n=2, seed=5,
                                           extra_body={"mode": "majority@5"})
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded

    # the vote itself, on a group whose conclusions are known
    from step3vl.rl.rollout import Completion

    group = [Completion(t, [1] * (i + 1), [], "stop", 3) for i, t in enumerate(
        ["<think>a</think>7", "8", "<think></think>", "<think>b</think> 8", "7", "8"])]
    v = vote(group)
    assert v.completion is group[1] and v.votes == 3 == sum(compact(c.text) == "8" for c in group)
    assert v.sample_tokens == 21

    # pacore without options takes the recipe's rounds
    p = client.chat.completions.create(model=served.name, messages=_ask(), max_tokens=4, seed=1,
                                       extra_body={"mode": "pacore"})
    assert p.model_extra["pacore"]["rounds"] == [16] and "majority" not in p.model_extra


def test_voting_jobs_share_one_engine_call():
    from step3vl.rl.rollout import Completion, Prompt, SamplingParams
    from step3vl.serve.batcher import Batcher, Job

    calls = []

    class Engine:
        def generate(self, prompts, n, params):
            calls.append((len(prompts), n))
            return [[Completion(str(i % 2), [0], [], "stop", 1) for i in range(n)] for _ in prompts]

    b = Batcher(Engine(), max_pending=8, max_batch_sequences=64, batch_wait_s=0.2)
    sp = SamplingParams(max_tokens=2)
    jobs = [Job(Prompt([{"role": "user", "content": f"q{i}"}]), 2, sp, vote_k=3) for i in range(3)]
    for j in jobs:
        b.submit(j)
    b.start()
    try:
        results = [j.future.result(timeout=30) for j in jobs]
    finally:
        b.close()
    assert calls == [(6, 3)]  # 3 jobs x 2 choices, 3 samples each, one call
    assert all(len(r) == 2 and all(v.votes == 2 and v.completion.text == "0" for v in r) for r in results)
