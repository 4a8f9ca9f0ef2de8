"""The OpenAI-compatible HTTP app over one ``Generator``: completions, chat, models, health, metrics.

``create_app(generator, ...)`` returns a FastAPI app whose lifespan starts and stops the engine thread
(``dspark.serve.engine``); ``serve(bundle_dir, ...)`` opens a bundle and runs the app under uvicorn (``Server``),
which turns SIGTERM/SIGINT into a graceful shutdown: the listening socket closes, in-flight requests get up to
``shutdown_timeout`` seconds to finish, then the engine cancels the rest, each of which still ends its
response (a last chunk, an error event and ``[DONE]``, or a 503), and the process exits.

Hostile input is bounded before it costs anything: bodies over ``max_request_bytes`` are a 413 before they
are read, JSON is checked for depth and lone surrogates, prompts are tokenized in a worker thread (the event
loop keeps answering), and metric labels take a fixed set of values.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from dspark.errors import DsparkError
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams
from dspark.runtime.tokenizer import ChatTemplate, check_prompt
from dspark.serve.engine import Engine, EngineStopped, Handle, QueueFull
from dspark.serve.metrics import CONTENT_TYPE, ServerMetrics
from dspark.serve.protocol import (APIError, ChatChunk, ChatRequest, ChatResponse, CommonRequest, CompletionChunk,
                                   CompletionRequest, CompletionResponse, ErrorBody, Health, ModelList, parse)

log = logging.getLogger("dspark.serve")

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/openapi.json"}
METHODS = {"GET", "HEAD", "POST"}  # any other method is counted as "other": labels stay a fixed set
MAX_TEMPERATURE = 2.0  # OpenAI's bound, an API policy on top of SamplingParams' own checks
LAST_WORDS_S = 5.0  # after the engine cancels at shutdown, how long handlers get to end their responses
UNAVAILABLE = "the server shut down before the request finished"


def default_request_bytes(max_context: int) -> int:
    """A body bound no prompt that fits the context needs: 64 bytes per token (JSON-escaped text or ids), >= 1 MiB."""
    return max(1 << 20, 64 * max_context)


def request_too_large(max_request_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than {max_request_bytes} bytes (--max-request-bytes)",
                    code="request_too_large", headers={"Connection": "close"})


class HTTPMetrics:
    """Pure ASGI middleware: counts every HTTP response by route and status and times it (streams included)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        route = scope["path"] if scope["path"] in ROUTES else "other"
        method = scope["method"] if scope["method"] in METHODS else "other"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_requests.labels(method=method, route=route, status=str(status[0])).inc()
            self.metrics.http_duration.labels(method=method, route=route).observe(time.perf_counter() - start)


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _sse(obj) -> str:
    return "data: " + (obj if isinstance(obj, str) else _json(obj)) + "\n\n"


class Api:
    """The request handling of one app: read, check, tokenize, submit to the engine, answer."""

    def __init__(self, generator: Generator, engine: Engine, model_name: str, api_key: str | None, template,
                 max_request_bytes: int):
        self.generator, self.engine, self.model_name, self.api_key = generator, engine, model_name, api_key
        self.template, self.max_request_bytes = template, max_request_bytes
        self.max_context = generator.bundle.limits.max_context
        self.vocab_size = generator.bundle.target.config.vocab_size
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------- input
    def authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read(self, request: HTTPRequest, model: type[CommonRequest]) -> CommonRequest:
        """The authorized, size-bounded, validated body; a 413 comes before the body is read when it says its size."""
        self.authorize(request)
        too_large = request_too_large(self.max_request_bytes)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large
        req = parse(model, bytes(body))
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        req.refuse_unsupported()
        return req

    async def completion_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.generator.tokenizer.too_long(prompt, self.max_context - 1):  # refused without tokenizing
                raise APIError(400, f"This model's maximum context length is {self.max_context} tokens; a prompt of "
                                    f"{len(prompt)} characters has more", param="prompt", code="context_length_exceeded")
            # a worker thread: a long prompt must not stall the event loop
            return await asyncio.to_thread(self.generator.tokenizer.encode, prompt)
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"token ids must be in [0, {self.vocab_size})", param="prompt", code="invalid_value")
        return list(prompt)

    async def chat_ids(self, req: ChatRequest) -> list[int]:
        if self.template is None:
            raise APIError(400, f"the bundle '{self.model_name}' has no chat template (tokenizer_config.json has no "
                                "'chat_template'); use /v1/completions or start the server with --chat-template FILE",
                           param="messages", code="no_chat_template")
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        return await asyncio.to_thread(self._render_chat, req)

    def _render_chat(self, req: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            return self.template.ids(messages)
        except DsparkError as e:
            raise APIError(400, str(e), param="messages") from None

    def build_request(self, req: CommonRequest, ids: list[int], prompt_param: str, max_tokens: int | None,
                      default_max_tokens: int) -> Request:
        """The runtime's request; its own checks (prompt, sampling) answer as 400s naming the field."""
        try:
            check_prompt(ids, self.max_context)
        except DsparkError as e:
            raise APIError(400, str(e), param=prompt_param,
                           code="context_length_exceeded" if ids else "invalid_value") from None
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens", code="invalid_value")
        if len(ids) + max_tokens > self.max_context:
            raise APIError(400, f"This model's maximum context length is {self.max_context} tokens; you requested "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion); reduce max_tokens or the prompt", param="max_tokens",
                           code="context_length_exceeded")
        stop = req.stop_strings()
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop", code="invalid_value")
        seed = secrets.randbits(63) if req.seed is None else req.seed % (1 << 64)
        return Request(list(ids), max_tokens, sampling_params(req), seed, stop, req.ignore_eos)

    # ------------------------------------------------------------------------------------------- output
    def submit(self, request: Request) -> Handle:
        try:
            return self.engine.submit(request, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e}); retry later", type="rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except DsparkError as e:
            raise APIError(400, str(e), param=e.param) from None

    async def result(self, request: HTTPRequest, handle: Handle):
        """Wait for a non-streamed request; None when the client went away (its row is freed at the next round)."""
        gone = asyncio.Event()

        async def watch_client():
            # the body has been read, so the next message is the disconnect, the moment the socket closes
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()
            self.engine.cancel(handle)

        watcher = asyncio.create_task(watch_client())
        try:
            while True:
                kind, payload = await handle.events.get()
                if kind == "done":
                    if payload.finish_reason != "cancelled":
                        return payload
                    if gone.is_set():
                        return None
                    raise APIError(503, UNAVAILABLE, type="server_error", code="unavailable")
                if kind == "error":
                    raise APIError(500, payload, type="server_error")
        finally:
            watcher.cancel()
            self.engine.cancel(handle)  # no-op once finished; frees the row if this handler is itself cancelled

    def stream(self, handle: Handle, chat: bool, rid: str, include_usage: bool) -> StreamingResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events():
            done = False
            try:
                if chat:
                    yield chunk(None, role=True)
                while True:
                    batch = [await handle.events.get()]
                    while not handle.events.empty():
                        batch.append(handle.events.get_nowait())
                    text = "".join(p for k, p in batch if k == "text")
                    if text:
                        yield chunk(text)
                    last_kind, last = batch[-1]
                    if last_kind == "text":
                        continue
                    done = True
                    if last_kind == "error":
                        yield _sse(APIError(500, last, type="server_error").body())
                    else:
                        yield chunk(None, last.finish_reason)
                        if last.finish_reason == "cancelled":  # shutdown: say why after the last chunk
                            yield _sse(APIError(503, UNAVAILABLE, type="server_error", code="unavailable").body())
                        elif include_usage:
                            yield _sse({"id": rid, "object": obj, "created": int(time.time()), "model": self.model_name,
                                        "choices": [], "usage": usage(last)})
                    yield _sse("[DONE]")
                    return
            finally:
                if not done:  # the client disconnected (or the server is cancelling us): free the row
                    self.engine.cancel(handle)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def respond(self, request: HTTPRequest, req: CommonRequest, runtime_request: Request, chat: bool):
        """The stream of a request, or its whole response once it has finished."""
        handle = self.submit(runtime_request)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            return self.stream(handle, chat, rid, bool(req.stream_options and req.stream_options.include_usage))
        seq = await self.result(request, handle)
        if seq is None:
            return Response(status_code=499)
        if chat:
            kind, choice = "chat.completion", {"message": {"role": "assistant", "content": seq.text}}
        else:
            kind, choice = "text_completion", {"text": seq.text}
        choice.update(index=0, logprobs=None, finish_reason=seq.finish_reason)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": self.model_name,
                             "choices": [choice], "usage": usage(seq)})

    # ------------------------------------------------------------------------------------------- routes
    async def completions(self, request: HTTPRequest):
        req = await self.read(request, CompletionRequest)
        ids = await self.completion_ids(req)
        return await self.respond(request, req, self.build_request(req, ids, "prompt", req.max_tokens, 16), chat=False)

    async def chat_completions(self, request: HTTPRequest):
        req = await self.read(request, ChatRequest)
        ids = await self.chat_ids(req)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        default = max(1, self.max_context - len(ids))
        return await self.respond(request, req, self.build_request(req, ids, "messages", max_tokens, default), chat=True)

    async def models(self, request: HTTPRequest):
        self.authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "dspark", "max_model_len": self.max_context}]}

    async def health(self):
        if not self.engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}


def sampling_params(req: CommonRequest) -> SamplingParams:
    """OpenAI's defaults (temperature 1) and vLLM's top_k -1, checked by ``SamplingParams`` itself."""
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    try:
        params = SamplingParams(1.0 if req.temperature is None else req.temperature,
                                1.0 if req.top_p is None else req.top_p, top_k)
    except DsparkError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_value") from None
    if params.temperature > MAX_TEMPERATURE:
        raise APIError(400, f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {req.temperature}", param="temperature",
                       code="invalid_value")
    return params


def usage(seq) -> dict:
    p, c = len(seq.request.prompt_ids), len(seq.generated)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 429, 500, 503)}
STREAM = {"text/event-stream": {}}  # each event's schema: see openapi_schema


def create_app(generator: Generator, model_name: str | None = None, api_key: str | None = None, max_queue: int = 64,
               chat_template: str | None = None, max_request_bytes: int | None = None) -> FastAPI:
    """An OpenAI-compatible app over ``generator``; the engine thread runs while the app's lifespan does."""
    model_name = model_name or Path(generator.bundle.path).name
    metrics = ServerMetrics(generator, model_name)
    engine = Engine(generator, max_queue=max_queue, on_finish=metrics.request_finished)
    max_context = generator.bundle.limits.max_context
    api = Api(generator, engine, model_name, api_key, ChatTemplate.load(generator.tokenizer, chat_template),
              max_request_bytes or default_request_bytes(max_context))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        log.info("dspark serving %s: %d rows, queue %d", model_name, generator.max_batch, max_queue)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    # the schema is served below, behind the API key like the rest of /v1
    app = FastAPI(title="dspark", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.generator, app.state.model_name = engine, metrics, generator, model_name

    async def exposition() -> bytes:
        return metrics.exposition()

    app.state.exposition = exposition  # a Ray Serve replica swaps in every replica's metrics (dspark.serve.cluster)
    app.add_middleware(HTTPMetrics, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), code=None).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error").body(), status_code=500)

    app.add_api_route("/v1/completions", api.completions, methods=["POST"], openapi_extra=body_schema(CompletionRequest),
                      responses={200: {"model": CompletionResponse, "content": STREAM}, **ERRORS})
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], openapi_extra=body_schema(ChatRequest),
                      responses={200: {"model": ChatResponse, "content": STREAM}, **ERRORS})
    app.add_api_route("/v1/models", api.models, methods=["GET"], responses={200: {"model": ModelList}, 401: ERRORS[401]})
    app.add_api_route("/health", api.health, methods=["GET"], responses={200: {"model": Health}, 503: {"model": Health}})
    app.add_api_route("/health", api.health, methods=["HEAD"], include_in_schema=False)  # load balancers probe with HEAD

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def prometheus():
        return Response(await app.state.exposition(), media_type=CONTENT_TYPE)

    schema = []

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: HTTPRequest):
        api.authorize(request)
        if not schema:
            schema.append(openapi_schema(app))
        return schema[0]

    return app


def body_schema(model) -> dict:
    """The request body of a route that parses its body itself (strictly, see ``protocol.parse``)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema, with the request bodies' shared definitions moved to components where refs point, and
    the events of the streams described (each ``data`` is a chunk, an error, or ``[DONE]``)."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path in schema["paths"].values():
        for operation in path.values():
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            components.update(body.pop("$defs", {}))
    for path, chunk in (("/v1/completions", CompletionChunk), ("/v1/chat/completions", ChatChunk)):
        chunk_schema = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(chunk_schema.pop("$defs", {}))
        components[chunk.__name__] = chunk_schema
        json_event = {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": f"#/components/schemas/{chunk.__name__}"}, {"$ref": "#/components/schemas/ErrorBody"}]}}
        event = {"type": "object", "required": ["data"],
                 "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_event]}}}
        schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"itemSchema": event}
    return schema


# ----------------------------------------------------------------------------------------------- uvicorn
class H11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection that sends nothing for the keep-alive timeout.

    uvicorn arms that timer only between requests, so a connection that never sends a request stays open forever.
    """

    def connection_made(self, transport):
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


class Server(uvicorn.Server):
    """uvicorn, with a shutdown that ends every in-flight response cleanly.

    uvicorn cancels request handlers when the grace period ends, before the lifespan stops the engine, which
    cuts streams mid-response. Here the engine cancels every request when the grace period ends, so each
    handler writes its own last words (a final chunk, an error event and ``[DONE]``, or the 503); uvicorn's own
    deadline, ``LAST_WORDS_S`` later, is only the backstop.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float):
        config.timeout_graceful_shutdown = shutdown_timeout + LAST_WORDS_S
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    async def shutdown(self, sockets=None):
        cutoff = asyncio.create_task(self._cancel_in_flight())
        try:
            await super().shutdown(sockets)
        finally:
            cutoff.cancel()

    async def _cancel_in_flight(self):
        await asyncio.sleep(self.shutdown_timeout)
        log.warning("shutdown timeout of %gs passed: cancelling %d in-flight request(s)", self.shutdown_timeout,
                    self.engine.in_flight())
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                keep_alive_timeout: float = 5.0, log_level: str = "info") -> Server:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=H11, lifespan="on",
                            timeout_keep_alive=keep_alive_timeout)
    return Server(config, app.state.engine, shutdown_timeout)


def serve(bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          api_key: str | None = None, max_batch: int | None = None, max_queue: int = 64, scheduler: str = "auto",
          threshold: float = 0.5, num_draft_tokens: int | None = None, use_draft: bool = True,
          block_schedule: dict[int, int] | str | None = "auto", lookup: int = 0, threads: int = 0,
          chat_template: str | None = None, shutdown_timeout: float = 30.0, keep_alive_timeout: float = 5.0,
          max_request_bytes: int | None = None, log_level: str = "info", backend: str = "ort",
          device: str = "cpu") -> None:
    """Open ``bundle_dir`` and serve it until SIGTERM/SIGINT (graceful: see the module docstring)."""
    generator = Generator(bundle_dir, backend=backend, threads=threads, use_draft=use_draft,
                          num_draft_tokens=num_draft_tokens, scheduler=scheduler, threshold=threshold,
                          block_schedule=block_schedule, lookup=lookup, max_batch=max_batch, device=device)
    app = create_app(generator, model_name=model_name, api_key=api_key, max_queue=max_queue, chat_template=chat_template,
                     max_request_bytes=max_request_bytes)
    run_server(make_server(app, host, port, shutdown_timeout, keep_alive_timeout, log_level))
    log.info("dspark serve: shut down")


def run_server(server: Server) -> None:
    """Run ``server`` until SIGTERM/SIGINT has shut it down gracefully."""
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully, which would end the process
    # "killed by SIGTERM"; the shutdown was clean, so swallow that re-raise and return (exit status 0)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in handled} if threading.current_thread() is threading.main_thread() else {}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
