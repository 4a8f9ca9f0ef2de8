"""The OpenAI-compatible HTTP app over one ``Generator``: completions, chat, models, health, metrics.

``create_app(generator, ...)`` returns a FastAPI app whose lifespan starts and stops the engine thread
(``dspark.serve.engine``); ``serve(bundle_dir, ...)`` opens a bundle and runs the app under uvicorn, which
turns SIGTERM/SIGINT into a graceful shutdown: the listening socket closes, in-flight requests get up to
``shutdown_timeout`` seconds to finish, the rest are cancelled, then the engine frees every row and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import signal
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.errors import DsparkError
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams
from dspark.serve.engine import Engine, EngineStopped, Handle, QueueFull
from dspark.serve.metrics import CONTENT_TYPE, ServerMetrics
from dspark.serve.protocol import APIError, ChatRequest, CommonRequest, CompletionRequest, parse

log = logging.getLogger("dspark.serve")

ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


class HTTPMetrics:
    """Pure ASGI middleware: counts every HTTP response by route and status and times it (streams included)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        route = scope["path"] if scope["path"] in ROUTES else "other"

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.http_requests.labels(method=scope["method"], route=route, status=str(status[0])).inc()
            self.metrics.http_duration.labels(method=scope["method"], route=route).observe(time.perf_counter() - start)


def load_chat_template(generator: Generator, chat_template: str | None) -> str | None:
    if chat_template is not None:
        return chat_template
    template = generator.tokenizer.config.get("chat_template")
    if isinstance(template, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def _token_text(value) -> str:
    if isinstance(value, dict):  # an AddedToken written out by transformers
        return value.get("content", "")
    return value if isinstance(value, str) else ""


def create_app(generator: Generator, model_name: str | None = None, api_key: str | None = None, max_queue: int = 64,
               chat_template: str | None = None) -> FastAPI:
    """An OpenAI-compatible app over ``generator``; the engine thread runs while the app's lifespan does."""
    model_name = model_name or Path(generator.bundle.path).name
    metrics = ServerMetrics(generator, model_name)
    engine = Engine(generator, max_queue=max_queue, on_finish=metrics.request_finished)
    template_source = load_chat_template(generator, chat_template)
    template = None
    if template_source is not None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise APIError(400, f"the chat template refused the messages: {message}", param="messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: time.strftime(fmt))
        template = env.from_string(template_source)
    config = generator.tokenizer.config
    max_context = generator.bundle.limits["max_context"]
    vocab_size = generator.bundle.target["config"]["vocab_size"]
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        log.info("dspark serving %s: %d rows, queue %d", model_name, generator.max_batch, max_queue)
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="dspark", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics, app.state.generator, app.state.model_name = engine, metrics, generator, model_name
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

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def check_model(req: CommonRequest) -> None:
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def build_request(req: CommonRequest, prompt_ids: list[int], prompt_param: str, max_tokens: int | None,
                      default_max_tokens: int) -> Request:
        req.refuse_unsupported()
        if not prompt_ids:
            raise APIError(400, "the prompt is empty; give at least one token", param=prompt_param)
        if len(prompt_ids) + 1 > max_context:
            raise APIError(400, f"This model's maximum context length is {max_context} tokens; the prompt has "
                                f"{len(prompt_ids)} tokens", param=prompt_param, code="context_length_exceeded")
        max_tokens = default_max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens", code="invalid_value")
        if len(prompt_ids) + max_tokens > max_context:
            raise APIError(400, f"This model's maximum context length is {max_context} tokens; you requested "
                                f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                                "completion); reduce max_tokens or the prompt", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature
        if not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature", code="invalid_value")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
        top_k = 0 if req.top_k in (None, -1) else req.top_k
        if top_k < 0:
            raise APIError(400, f"top_k must be -1, 0 (off) or positive, got {top_k}", param="top_k", code="invalid_value")
        stop = req.stop_strings()
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop", code="invalid_value")
        seed = secrets.randbits(63) if req.seed is None else req.seed % (1 << 64)
        try:
            sampling = SamplingParams(temperature, top_p, top_k)
        except DsparkError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        return Request(list(prompt_ids), max_tokens, sampling, seed, stop, req.ignore_eos)

    def submit(request: Request) -> Handle:
        try:
            return engine.submit(request, asyncio.get_running_loop())
        except QueueFull as e:
            raise APIError(429, f"the server is at capacity ({e}); retry later", type="rate_limit_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except DsparkError as e:
            raise APIError(400, str(e)) from None

    def usage(seq) -> dict:
        p, c = len(seq.request.prompt_ids), len(seq.generated)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def finish(request: HTTPRequest, handle: Handle):
        """Wait for a non-streamed request; cancel it when the client goes away."""
        done = False
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(handle.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if kind == "done":
                    done = True
                    if payload.finish_reason == "cancelled":
                        raise APIError(503, "the server shut down before the request finished", type="server_error",
                                       code="unavailable")
                    return payload
                if kind == "error":
                    done = True
                    raise APIError(500, payload, type="server_error")
        finally:
            if not done:
                engine.cancel(handle)

    def stream(handle: Handle, chat: bool, rid: str, include_usage: bool) -> StreamingResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            body = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return "data: " + _json(body) + "\n\n"

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
                    if last_kind == "done":
                        done = True
                        if last.finish_reason == "cancelled":
                            yield "data: " + _json(APIError(503, "the server shut down before the request finished",
                                                            type="server_error", code="unavailable").body()) + "\n\n"
                        else:
                            yield chunk(None, last.finish_reason)
                            if include_usage:
                                body = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                                        "choices": [], "usage": usage(last)}
                                yield "data: " + _json(body) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    if last_kind == "error":
                        done = True
                        yield "data: " + _json(APIError(500, last, type="server_error").body()) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:
                if not done:  # the client disconnected (or the server is cancelling us): free the row
                    engine.cancel(handle)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        authorize(request)
        req = parse(CompletionRequest, await request.body())
        check_model(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = generator.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < vocab_size for t in ids):
                raise APIError(400, f"token ids must be in [0, {vocab_size})", param="prompt", code="invalid_value")
        handle = submit(build_request(req, ids, "prompt", req.max_tokens, 16))
        return await respond(request, req, handle, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        authorize(request)
        req = parse(ChatRequest, await request.body())
        check_model(req)
        if template is None:
            raise APIError(400, f"the bundle '{model_name}' has no chat template (tokenizer_config.json has no "
                                "'chat_template'); use /v1/completions or start the server with --chat-template FILE",
                           param="messages", code="no_chat_template")
        if not req.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        try:
            text = template.render(messages=[{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                                             for m in req.messages],
                                   add_generation_prompt=True, bos_token=_token_text(config.get("bos_token")),
                                   eos_token=_token_text(config.get("eos_token")))
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}",
                           param="messages") from None
        ids = generator.tokenizer.fast.encode(text, add_special_tokens=False).ids  # the template writes special tokens
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        handle = submit(build_request(req, ids, "messages", max_tokens, max(1, max_context - len(ids))))
        return await respond(request, req, handle, chat=True)

    async def respond(request: HTTPRequest, req, handle, chat: bool):
        """The stream of a request, or its whole response once it has finished."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if req.stream:
            return stream(handle, chat, rid, bool(req.stream_options and req.stream_options.include_usage))
        seq = await finish(request, handle)
        if seq is None:
            return Response(status_code=499)
        if chat:
            kind, choice = "chat.completion", {"message": {"role": "assistant", "content": seq.text}}
        else:
            kind, choice = "text_completion", {"text": seq.text}
        choice.update(index=0, logprobs=None, finish_reason=seq.finish_reason)
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": model_name,
                             "choices": [choice], "usage": usage(seq)})

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "dspark",
                                            "max_model_len": max_context}]}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def _json(obj) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def serve(bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          api_key: str | None = None, max_batch: int | None = None, max_queue: int = 64, scheduler: str = "fixed",
          threshold: float = 0.5, num_draft_tokens: int | None = None, use_draft: bool = True, threads: int = 0,
          chat_template: str | None = None, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Open ``bundle_dir`` and serve it until SIGTERM/SIGINT (graceful: see the module docstring)."""
    import uvicorn

    generator = Generator(bundle_dir, threads=threads, use_draft=use_draft, num_draft_tokens=num_draft_tokens,
                          scheduler=scheduler, threshold=threshold, max_batch=max_batch)
    app = create_app(generator, model_name=model_name, api_key=api_key, max_queue=max_queue, chat_template=chat_template)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http="h11", lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully, which would end the process
    # "killed by SIGTERM"; the shutdown was clean, so swallow that re-raise and return (exit status 0)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda *_: None) for s in handled} if threading.current_thread() is threading.main_thread() else {}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("dspark serve: shut down")
