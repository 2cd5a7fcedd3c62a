"""The OpenAI-compatible HTTP app (FastAPI) over one `EngineLoop`.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (SSE streaming with `"stream": true`),
`GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format).

Safety: every `/v1/*` call needs `Authorization: Bearer <key>` when an API key is set (401 otherwise);
bodies larger than `Limits.max_body_bytes` get 413, malformed JSON / wrong types / out-of-range values 400,
unknown models 404, too many requests in flight 429 — all in OpenAI's error shape. A client that disconnects
(streaming or not) has its engine requests aborted, which frees their KV pages at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxserve.errors import JaxserveError
from jaxserve.server.engine_loop import EngineDead, EngineLoop, Sink
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.protocol import APIError, Limits, OpenAIServing, StreamState, bad_request, new_id

log = logging.getLogger("jaxserve.server")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


@dataclass
class ServerState:
    loop: EngineLoop
    serving: OpenAIServing
    metrics: ServerMetrics
    api_key: Optional[str] = None
    default_priority: str = "interactive"
    max_pending: int = 1024
    in_flight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, limit: int):
    too_big = APIError(413, f"request body is larger than {limit} bytes", "invalid_request_error", None,
                       "request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            declared = int(cl)
        except ValueError:
            raise bad_request("invalid Content-Length header") from None
        if declared > limit:
            # Read (and drop) a bounded amount so the client gets the 413 instead of a connection reset.
            if declared <= 16 * limit:
                async for _ in request.stream():
                    pass
            raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    try:
        return json.loads(bytes(buf), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", None, "invalid_json") from None


async def _watch_disconnect(request: Request, sink: Sink) -> None:
    """Push ClientGone into the sink when the client goes away (the body has been read by now)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            sink.fail(ClientGone())
            return


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """A StreamingResponse whose cleanup runs even if the stream never started (client gone at once)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class _MetricsMiddleware:
    """Counts answers by endpoint and status (pure ASGI: streaming bodies pass straight through)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                    "/metrics") else "other"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, send_wrapper)


def build_app(llm, *, served_model_names: Optional[list] = None, api_key: Optional[str] = None,
              limits: Optional[Limits] = None, default_priority: str = "interactive",
              max_pending: int = 1024, health_check: Optional[Callable[[], Optional[str]]] = None,
              health_poll_s: float = 1.0, on_shutdown: Optional[Callable[[], None]] = None) -> FastAPI:
    """An ASGI app serving `llm` (an `LLM` or an `LLMEngine`, idle). The engine thread starts with the app.

    `health_check`: None, or a check polled every `health_poll_s` seconds that returns why the engine cannot serve
    (e.g. a dead process of a multi-host group: parallel/spmd.py), else None. Once it fails, the requests in
    flight get an error, /health answers 503 and new generation requests are refused with 503. `on_shutdown`:
    called once the engine thread has stopped (uvicorn then re-raises SIGTERM, so code after `run_server` may
    never run)."""
    engine = getattr(llm, "engine", llm)
    names = list(served_model_names or [engine.model_cfg.name])
    metrics = ServerMetrics()
    state = ServerState(
        loop=EngineLoop(engine, on_finished=metrics.observe_finished),
        serving=OpenAIServing(engine, names, limits),
        metrics=metrics, api_key=api_key or None, default_priority=default_priority, max_pending=max_pending,
    )

    failed: list = []  # why the health check failed (once it has)

    async def watch_health():
        while True:
            await asyncio.sleep(health_poll_s)
            reason = health_check()
            if reason is not None:
                failed.append(reason)
                log.error("unhealthy: %s; failing the requests in flight", reason)
                state.loop.fail_pending(EngineDead(f"the server cannot serve: {reason}"))
                return

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        watcher = asyncio.ensure_future(watch_health()) if health_check is not None else None
        grammars = getattr(engine, "grammars", None)
        if grammars is not None and engine.tokenizer is not None:  # build the grammar tokenizer off the first request
            threading.Thread(target=grammars.warm, name="jaxserve-grammar-warm", daemon=True).start()
        log.info("engine loop started; serving %s", ", ".join(names))
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.get_running_loop().run_in_executor(None, state.loop.stop)
            log.info("engine loop stopped")
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="jaxserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.jaxserve = state
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None,
                       "not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"internal error: {type(exc).__name__}", "server_error", None, "internal_error")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        if failed:
            return JSONResponse({"status": "unhealthy", "reason": failed[0]}, status_code=503)
        if not state.loop.alive:
            return JSONResponse({"status": "stopping"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        try:
            metrics.snapshot = await state.loop.call(lambda e: e.metrics(), timeout=2.0)
        except (asyncio.TimeoutError, RuntimeError):
            pass  # engine busy or stopped: serve the last snapshot
        metrics.in_flight.set(state.in_flight)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "jaxserve",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        check_auth(request)
        if model not in names:
            raise APIError(404, f"The model `{model}` does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return model_card(model)

    # ------------------------------------------------------------------ generation
    async def generate(request: Request, kind: str):
        check_auth(request)
        if failed:
            raise APIError(503, f"the server cannot serve: {failed[0]}", "server_error", None, "unavailable")
        try:
            body = await _read_json(request, state.serving.limits.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=499)  # left while sending the body: nothing was queued
        # Tokenizing a long prompt takes a while: keep it off the event loop (parse touches no engine state).
        req = await asyncio.to_thread(state.serving.parse, kind, body, request.headers.get("x-priority"))
        if state.in_flight >= state.max_pending:
            raise APIError(429, f"the server has {state.in_flight} requests in flight; retry later",
                           "server_overloaded", None, "too_many_requests")
        request_id = new_id(kind)
        engine_reqs = [(f"{request_id}-{i}", ids, req.params) for i, ids in enumerate(req.prompts)]
        sink = Sink()
        try:
            await state.loop.add(sink, engine_reqs, req.priority or state.default_priority)
        except JaxserveError as e:
            raise bad_request(str(e), None, "invalid_request") from None
        except EngineDead as e:
            raise APIError(503, str(e), "server_error", None, "unavailable") from None
        state.in_flight += 1
        watcher = asyncio.ensure_future(_watch_disconnect(request, sink))
        closed = []

        def close(outcome: str) -> None:
            """outcome: "finished" | "client_gone" (also: cancelled mid-stream) | "error". Runs once."""
            if closed:
                return
            closed.append(outcome)
            watcher.cancel()
            state.in_flight -= 1
            if outcome != "finished":
                state.loop.abort(sink.request_ids)  # frees their KV pages
            if outcome == "client_gone":
                metrics.client_disconnects.inc()

        if req.stream:
            return _SSEResponse(_stream(req, request_id, sink, close), lambda: close("client_gone"),
                                media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals: dict = {}
        outcome = "client_gone"  # also when this handler is cancelled (forced shutdown)
        try:
            while len(finals) < len(req.prompts):
                for i, ro in await sink.get_batch():
                    if ro.finished:
                        finals[i] = ro
            outcome = "finished"
        except ClientGone:
            return Response(status_code=499)  # nobody is listening
        except EngineDead as e:
            outcome = "error"
            raise APIError(500, str(e), "server_error", None, "engine_error") from None
        finally:
            close(outcome)
        return JSONResponse(state.serving.response(req, [finals[i] for i in range(len(req.prompts))], request_id))

    async def _stream(req, request_id: str, sink: Sink, close):
        st = StreamState(state.serving, req, request_id)
        outcome = "client_gone"  # also when cancelled: starlette cancels the stream when the client leaves
        try:
            for ch in st.first_chunks():
                yield _sse(ch)
            while not st.all_finished:
                for i, ro in await sink.get_batch():  # the newest snapshot per prompt: it says everything
                    for ch in st.update(i, ro):
                        yield _sse(ch)
            outcome = "finished"
            if req.include_usage:
                yield _sse(st.usage_chunk())
            yield "data: [DONE]\n\n"
        except ClientGone:
            pass
        except EngineDead as e:
            outcome = "error"
            yield _sse(APIError(500, str(e), "server_error", None, "engine_error").body())
            yield "data: [DONE]\n\n"
        finally:
            close(outcome)

    async def tokenizer_call(request: Request, fn):
        check_auth(request)
        if failed:
            raise APIError(503, f"the server cannot serve: {failed[0]}", "server_error", None, "unavailable")
        try:
            body = await _read_json(request, state.serving.limits.max_body_bytes)
        except ClientDisconnect:
            return Response(status_code=499)
        return await asyncio.to_thread(fn, body)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await tokenizer_call(request, state.serving.tokenize)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        check_auth(request)
        return state.serving.tokenizer_info()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await tokenizer_call(request, state.serving.detokenize)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    return app


def run_server(llm, host: str = "127.0.0.1", port: int = 8000, *, drain_timeout: float = 60.0,
               log_level: str = "info", **app_kw) -> None:
    """Serve until SIGINT/SIGTERM; on either, stop accepting connections, let in-flight requests finish
    (up to `drain_timeout` seconds, after which they are aborted), then stop the engine thread."""
    import uvicorn

    app = build_app(llm, **app_kw)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            lifespan="on")
    uvicorn.Server(config).run()
