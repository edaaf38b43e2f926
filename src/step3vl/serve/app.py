"""The OpenAI-compatible HTTP API over one loaded model (``step3vl serve``).

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` data-URI parts, ``n``,
``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``stream`` as server-sent events,
and the ``pacore`` extension), ``GET /v1/models``, ``GET /health``; the OpenAPI spec is at
``/openapi.json``. Generation goes through one :class:`~step3vl.serve.batcher.Batcher`, so
requests from different clients are batched into the same engine calls.

Guarding: an API key when configured (401), request/image byte limits (413), pixel, ``n``,
``max_tokens``, image-count and context limits (400), a bounded queue (429). Every error is the
OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``; the official ``openai``
client maps these statuses to its typed exceptions.

Streaming sends the completion as SSE chunks once its batch has finished (the torch engine decodes
a batch in one call); the chunk format is OpenAI's, so streaming clients work unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import importlib.util
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from step3vl.api import DEFAULT_ROUNDS, parse_mode
from step3vl.rl.rollout import Completion, Prompt, SamplingParams
from step3vl.serve import schema
from step3vl.serve.batcher import Batcher, Job, QueueFull
from step3vl.serve.config import ServeConfig

log = logging.getLogger(__name__)

_DATA_URI = re.compile(r"data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": schema.ErrorResponse} for code in (400, 401, 404, 413, 429)}


class APIError(Exception):
    """A request the server refuses: becomes ``status`` with the OpenAI error body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


# --------------------------------------------------------------------------- the model being served


@dataclass
class ServedModel:
    """What the server needs of a model: an engine with ``generate``, its tokenizer and processor."""

    engine: Any
    tokenizer: Any
    processor: Any
    name: str
    context_len: int

    @classmethod
    def from_loaded(cls, loaded: Any, name: str = "") -> "ServedModel":
        """Wrap ``step3vl.model.loading.load_model``'s result in the embedded torch engine, on the model's device."""
        from step3vl.rl.rollout import TorchEngine

        engine = TorchEngine(loaded.model, loaded.tokenizer, loaded.processor)
        return cls(engine, loaded.tokenizer, loaded.processor, name or loaded.cfg.name,
                   int(loaded.cfg.text.max_position_embeddings))


# --------------------------------------------------------------------------- guard middleware


class _Guard:
    """Pure ASGI middleware for ``/v1``: the API key (401) and the request body limit (413).

    The body limit is checked on ``Content-Length`` before anything is read and again while the
    body streams in (chunked uploads), so an oversized request never sits in memory.
    """

    def __init__(self, app: Any, cfg: ServeConfig) -> None:
        self.app, self.cfg = app, cfg
        self._key = cfg.api_key.encode() if cfg.api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self._key is not None:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self._key):
                resp = _error(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                              "invalid_api_key")
                return await resp(scope, receive, send)
        limit = self.cfg.max_request_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _error(400, "invalid Content-Length header")(scope, receive, send)
            if too_big:
                return await _error(413, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes",
                                    "request_too_large")(scope, receive, send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


# --------------------------------------------------------------------------- request → prompt


def _special_tokens() -> tuple[str, ...]:
    from step3vl.model.tokenizer import SPECIAL_TOKENS, THINK_END, THINK_START

    return tuple(t for t in SPECIAL_TOKENS if t not in (THINK_START, THINK_END))


def _decode_data_uri(url: str, where: str, cfg: ServeConfig) -> Any:
    from step3vl.data.io import DataError, decode_image

    m = _DATA_URI.match(url)
    if m is None:
        raise APIError(400, f"{where}: only PNG/JPEG data URIs (data:image/png;base64,...) are accepted; "
                            "this server fetches no URLs", code="invalid_image_url", param=where)
    payload = url[m.end():]
    if len(payload) * 3 // 4 > cfg.max_image_bytes + 2:
        raise APIError(413, f"{where}: image of about {len(payload) * 3 // 4} bytes exceeds the limit of "
                            f"{cfg.max_image_bytes} bytes", code="image_too_large", param=where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the data URI is not valid base64", code="invalid_image", param=where) from None
    if len(data) > cfg.max_image_bytes:
        raise APIError(413, f"{where}: image of {len(data)} bytes exceeds the limit of {cfg.max_image_bytes} bytes",
                       code="image_too_large", param=where)
    declared = "JPEG" if m.group(1).lower() in ("jpeg", "jpg") else "PNG"
    try:
        return decode_image(data, ref=where, expected_format=declared, max_pixels=cfg.max_image_pixels)
    except DataError as e:
        raise APIError(400, str(e), code="invalid_image", param=where) from None


def build_prompt(messages: list[schema.Message], cfg: ServeConfig) -> Prompt:
    """Chat messages → a :class:`Prompt`: image parts become ``<image>`` markers, in order.

    Text may not contain the model's control tokens (turn and image markers): they would let a
    client forge turns or ask for image embeddings that do not exist.
    """
    from step3vl.model.tokenizer import IMAGE_TOKEN

    if len(messages) > cfg.max_messages:
        raise APIError(400, f"{len(messages)} messages exceed the limit of {cfg.max_messages}", param="messages")
    n_images = sum(1 for m in messages if not isinstance(m.content, str)
                   for p in m.content if isinstance(p, schema.ImagePart))
    if n_images > cfg.max_images:
        raise APIError(400, f"{n_images} images exceed the limit of {cfg.max_images} per request",
                       code="too_many_images", param="messages")
    specials = _special_tokens()
    out, images = [], []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            texts, text = [m.content], m.content
        else:
            pieces, texts = [], []
            for j, part in enumerate(m.content):
                if isinstance(part, schema.TextPart):
                    pieces.append(part.text)
                    texts.append(part.text)
                else:
                    images.append(_decode_data_uri(part.image_url.url, f"messages[{i}].content[{j}].image_url", cfg))
                    pieces.append(IMAGE_TOKEN)
            text = "".join(pieces)
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from JSON "\ud800" escapes
                raise APIError(400, f"messages[{i}]: text is not valid Unicode", param=f"messages[{i}].content") from None
            bad = next((s for s in specials if s in t), None)
            if bad is not None:
                raise APIError(400, f"messages[{i}]: text may not contain the control token {bad!r}",
                               param=f"messages[{i}].content")
        out.append({"role": m.role, "content": text})
    return Prompt(out, images)


# --------------------------------------------------------------------------- responses


def _new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def _text_deltas(tokenizer: Any, c: Completion) -> list[str]:
    """The completion's text cut at token boundaries (pieces concatenate to exactly ``c.text``)."""
    out, emitted = [], 0
    for k in range(1, len(c.token_ids) + 1):
        prefix = tokenizer.decode(c.token_ids[:k], skip_special_tokens=True)
        if len(prefix) > emitted and c.text.startswith(prefix):
            out.append(prefix[emitted:])
            emitted = len(prefix)
    if emitted < len(c.text):
        out.append(c.text[emitted:])
    return out


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# --------------------------------------------------------------------------- the app


def create_app(served: ServedModel, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The FastAPI app serving ``served`` under ``cfg``'s limits (its batcher runs while the app is up)."""
    model_name = cfg.model_name or served.name
    batcher = Batcher(served.engine, max_pending=cfg.max_pending, max_batch_sequences=cfg.max_batch_sequences,
                      batch_wait_s=cfg.batch_wait_s)
    started = int(time.time())
    pacore_available = importlib.util.find_spec("step3vl.pacore") is not None and \
        importlib.util.find_spec("step3vl.pacore.inference") is not None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)

    app = FastAPI(title="step3vl", version="1", lifespan=lifespan,
                  description="OpenAI-compatible chat completions for STEP3-VL checkpoints (with a PaCoRe extension).")
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # the one model this server serves, so clients and spec-driven testers know the valid id
            spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"] = [model_name]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.batcher = batcher
    app.state.served = served
    app.add_middleware(_Guard, cfg=cfg)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError) -> JSONResponse:
        return _error(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {loc[-1] if loc else '?'}"
        return _error(400, f"{msg}" + (f" (at {param})" if param else ""), "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}", "internal_error")

    @app.get("/health", response_model=schema.Health)
    async def health() -> schema.Health:
        return schema.Health(status="ok", model=model_name, pending=batcher.pending)

    @app.get("/v1/models", response_model=schema.ModelList, responses=_ERROR_RESPONSES)
    async def models() -> schema.ModelList:
        return schema.ModelList(data=[schema.ModelCard(id=model_name, created=started)])

    @app.post("/v1/chat/completions", response_model=schema.ChatCompletion, responses={
        **_ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}})
    async def chat_completions(req: schema.ChatCompletionRequest) -> Any:
        if req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'",
                           code="model_not_found", param="model")
        params, job = await _make_job(req)
        try:
            fut = batcher.submit(job)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry later", code="queue_full") from None
        try:
            result = await asyncio.wrap_future(fut)
        except ValueError as e:
            raise APIError(400, f"cannot generate for this request: {e}") from None
        extended = job.pacore_rounds is not None or job.vote_k is not None  # PaCoReResult or Vote per choice
        completions = [r.completion for r in result] if extended else list(result)
        body = _completion_body(job, completions, result if extended else None)
        if not req.stream:
            return JSONResponse(body)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(body, completions, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _make_job(req: schema.ChatCompletionRequest) -> tuple[SamplingParams, Job]:
        if req.n > cfg.max_n:
            raise APIError(400, f"n={req.n} exceeds the limit of {cfg.max_n}", param="n")
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens")
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.max_tokens
        if max_tokens > cfg.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds the limit of {cfg.max_tokens}",
                           param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
            raise APIError(400, "stop: at most 4 sequences, each 1 to 256 characters", param="stop")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        rounds, vote_k = None, None
        mode = req.mode or ("pacore" if req.pacore is not None else "sere")
        if req.pacore is not None and mode != "pacore":
            raise APIError(400, f"pacore options go with mode pacore, not {mode}", param="pacore")
        kind, k = parse_mode(mode)  # the schema's pattern admitted it
        if kind == "majority":
            vote_k = k
            if vote_k * req.n > cfg.max_pacore_samples:
                raise APIError(400, f"{mode}: K x n = {vote_k * req.n} exceeds the limit of "
                                    f"{cfg.max_pacore_samples} samples", param="mode")
        if mode == "pacore":
            if not pacore_available:
                raise APIError(400, "pacore is not available on this server (step3vl.pacore is not installed)",
                               param="pacore")
            rounds = tuple(req.pacore.rounds) if req.pacore is not None else DEFAULT_ROUNDS
            if not any(m.role == "user" for m in req.messages):  # its controller prompt replaces the last one
                raise APIError(400, "pacore needs a user turn in messages", param="messages")
            if sum(rounds) * req.n > cfg.max_pacore_samples:
                raise APIError(400, f"pacore: sum(rounds) x n = {sum(rounds) * req.n} exceeds the limit of "
                                    f"{cfg.max_pacore_samples}", param="pacore.rounds")
        prompt, prompt_len = await run_in_threadpool(_prepare_prompt, req.messages)
        if prompt_len + max_tokens > served.context_len:
            raise APIError(400, f"this model's context is {served.context_len} tokens; the prompt has {prompt_len} "
                                f"and max_tokens asks for {max_tokens} more", code="context_length_exceeded",
                           param="messages")
        # a vanishing temperature is the engine's to take at its limit (argmax), like any other caller's
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                                stop=tuple(stop), seed=req.seed)
        return params, Job(prompt, req.n, params, pacore_rounds=rounds, vote_k=vote_k)

    def _prepare_prompt(messages: list[schema.Message]) -> tuple[Prompt, int]:
        from step3vl.rl.rollout import encode_prompt

        prompt = build_prompt(messages, cfg)
        try:
            ids, _ = encode_prompt(prompt, served.tokenizer, served.processor)
        except ValueError as e:  # e.g. an image the processor refuses
            raise APIError(400, f"cannot encode the prompt: {e}", param="messages") from None
        return prompt, len(ids)

    def _completion_body(job: Job, completions: list[Completion],
                         extended: list[Any] | None) -> dict[str, Any]:
        prompt_tokens = completions[0].prompt_tokens if completions else 0
        completion_tokens = sum(len(c.token_ids) for c in completions)
        body = schema.ChatCompletion(
            id=_new_id(), created=int(time.time()), model=model_name,
            choices=[schema.Choice(index=i, message=schema.AssistantMessage(content=c.text),
                                   finish_reason="stop" if c.finish_reason == "stop" else "length")
                     for i, c in enumerate(completions)],
            usage=schema.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               total_tokens=prompt_tokens + completion_tokens),
            pacore=None if job.pacore_rounds is None else schema.PaCoReInfo(
                rounds=list(job.pacore_rounds), round_tokens=[list(r.round_tokens) for r in extended]),
            majority=None if job.vote_k is None else schema.MajorityInfo(
                k=job.vote_k, votes=[v.votes for v in extended], sample_tokens=[v.sample_tokens for v in extended]),
        ).model_dump(exclude_none=True)
        for choice in body["choices"]:
            choice["logprobs"] = None
        return body

    async def _stream(body: dict[str, Any], completions: list[Completion], include_usage: bool) -> AsyncIterator[str]:
        base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"],
                "model": body["model"]}
        for i, c in enumerate(completions):
            yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None, "logprobs": None}]})
            for piece in await run_in_threadpool(_text_deltas, served.tokenizer, c):
                yield _sse({**base, "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None,
                                                 "logprobs": None}]})
            yield _sse({**base, "choices": [{"index": i, "delta": {},
                                             "finish_reason": body["choices"][i]["finish_reason"],
                                             "logprobs": None}]})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": body["usage"]})
        yield "data: [DONE]\n\n"

    return app


# --------------------------------------------------------------------------- running it


def load_served(model_uri: str, name: str = "") -> ServedModel:
    """Load a checkpoint (path, ``s3://``, ``models:/NAME@alias``) for serving on CPU."""
    from step3vl.devices import default_device
    from step3vl.model.loading import load_model

    return ServedModel.from_loaded(load_model(model_uri, device=default_device()), name)


def serve(model_uri: str, *, host: str = "127.0.0.1", port: int = 8000, cfg: ServeConfig = ServeConfig(),
          log_level: str = "info") -> None:
    """Load ``model_uri`` and serve it until interrupted (the ``step3vl serve`` command)."""
    import uvicorn

    app = create_app(load_served(model_uri, cfg.model_name), cfg)
    uvicorn.run(app, host=host, port=port, log_level=log_level, backlog=2048, timeout_keep_alive=30)


@dataclass
class RunningServer:
    """A server started by :func:`start_in_thread`; ``stop()`` shuts it down."""

    base_url: str
    server: Any
    thread: threading.Thread
    app: FastAPI

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0,
                    log_level: str = "warning") -> RunningServer:
    """Serve ``app`` with uvicorn in a background thread (tests, benchmarks); port 0 picks a free one."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=2048,
                                           timeout_keep_alive=30, lifespan="on"))
    thread = threading.Thread(target=server.run, name="step3vl-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()
    return RunningServer(f"http://{bound[0]}:{bound[1]}", server, thread, app)
