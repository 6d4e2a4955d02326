"""The OpenAI-compatible HTTP API: an app factory, auth as a dependency, one error format.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streamed as SSE or not,
through one code path), GET /v1/models, POST /tokenize, POST /detokenize, GET /health,
GET /metrics. Every error is ``{"error": {message, type, param, code}}`` with the status of
its `RealmError` class (realm/errors.py), mapped in `error_response` and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from realm.engine.model_store import StoredModel
from realm.errors import (
    InternalError,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    PayloadTooLarge,
    RealmError,
    Unauthorized,
)
from realm.sandbox.request import build_request
from realm.server.host import Emitted, Failed, Finished, Host, describe_failure, is_guest_trap
from realm.server.metrics import Metrics
from realm.server.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from realm.server.settings import ServerSettings
from realm.server.tenants import Tenant, retry_after_header

log = logging.getLogger("realm.server")

DRAIN_LIMIT = 16 << 20  # bytes of an oversized body read (and dropped) before answering 413


# ---------------------------------------------------------------------------- errors


def error_response(error: RealmError) -> JSONResponse:
    """The one place a RealmError becomes HTTP: its class's status and OpenAI type."""
    body = {
        "error": {
            "message": str(error),
            "type": error.openai_type,
            "param": getattr(error, "param", None),
            "code": _snake(type(error).__name__),
        }
    }
    headers = {}
    if isinstance(error, LimitExceeded) and (after := retry_after_header(error)) is not None:
        headers["Retry-After"] = after
    return JSONResponse(body, status_code=error.http_status, headers=headers)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _invalid(message: str, param: str | None) -> InvalidArgument:
    error = InvalidArgument(message)
    error.param = param  # type: ignore[attr-defined]
    return error


def _dotted(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


async def parse_body(request: Request, schema: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _invalid(f"the request body is not valid JSON: {e}", None) from None
    if not isinstance(data, dict):
        raise _invalid("the request body must be a JSON object", None)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = _dotted(tuple(first["loc"])) or None
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise _invalid(f"{param or 'body'}: {first['msg']}{more}", param) from None


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before anything parses it.
    The body is read here (at most `max_bytes`) and replayed to the app."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"the request body is larger than this server's limit of {self.max_bytes} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._drain(receive, int(declared))
            await error_response(too_large)(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                if message.get("more_body"):
                    await self._drain(receive, DRAIN_LIMIT)
                await error_response(too_large)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive: Callable, declared: int) -> None:
        """Read what the client is still sending (so it sees our answer), up to a limit."""
        if declared > DRAIN_LIMIT:
            return
        read = 0
        while read <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body"):
                return


# ---------------------------------------------------------------------------- per-request accounting


@dataclass
class Tracker:
    """One generation request's metrics: TTFT, time per output token, status, usage."""

    metrics: Metrics
    tenant: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    done: bool = False

    def token(self) -> None:
        now = time.perf_counter()
        labels = (self.tenant, self.model)
        if self.first is None:
            self.first = now
            self.metrics.ttft.labels(*labels).observe(now - self.started)
        else:
            self.metrics.tpot.labels(*labels).observe(now - self.last)
        self.last = now

    def finish(self, status: int, prompt: int = 0, completion: int = 0) -> None:
        if self.done:
            return
        self.done = True
        m, labels = self.metrics, (self.tenant, self.model)
        m.requests.labels(*labels, str(status)).inc()
        if prompt:
            m.prompt_tokens.labels(*labels).inc(prompt)
        if completion:
            m.completion_tokens.labels(*labels).inc(completion)


# ---------------------------------------------------------------------------- the app


def create_app(settings: ServerSettings | None = None, *, host: Host | None = None) -> FastAPI:
    """The server for `settings`. Models load on a background thread at startup; until
    they are loaded /health answers 503 and so does every other endpoint."""
    settings = settings or ServerSettings()
    metrics = host.metrics if host is not None else Metrics()
    host = host or Host(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def load() -> None:
            try:
                host.load()
            except BaseException as e:  # kept in host.load_error: /health reports it
                log.error("the server failed to start: %s", e, exc_info=not isinstance(e, RealmError))
                if app.state.on_load_error is not None:
                    app.state.on_load_error(e)

        if not host.ready.is_set() and host.load_error is None:
            threading.Thread(target=load, name="realm-loader", daemon=True).start()
        yield
        host.close()

    app = FastAPI(title="Realm", description="OpenAI-compatible multi-tenant LLM serving", lifespan=lifespan)
    app.state.host = host
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.on_load_error = None
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    # -- errors -----------------------------------------------------------------------

    def count_error(request: Request, status: int) -> None:
        tracker: Tracker | None = getattr(request.state, "tracker", None)
        if tracker is None:
            tracker = Tracker(
                metrics, getattr(request.state, "tenant", "") or "", getattr(request.state, "model", "") or ""
            )
        tracker.finish(status)

    @app.exception_handler(RealmError)
    async def realm_error(request: Request, error: RealmError) -> JSONResponse:
        if getattr(request.state, "generation", False):
            count_error(request, error.http_status)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(NotFound(f"no such endpoint: {request.method} {request.url.path}"))
        response = error_response(InvalidArgument(str(error.detail)))
        response.status_code = error.status_code  # 405 and friends keep their own status
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if getattr(request.state, "generation", False):
            count_error(request, 500)
        return error_response(InternalError("internal error; details are in the server's log"))

    # -- auth -------------------------------------------------------------------------

    async def authenticate(request: Request) -> Tenant:
        host.check_ready()
        header = request.headers.get("authorization")
        key = None
        if header:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise Unauthorized("send the API key as `Authorization: Bearer KEY`")
            key = value.strip()
        tenant = host.keys.tenant_of(key) if key else None
        if tenant is not None:
            found = host.tenants[tenant]
        elif host.open_tenant is not None and (key is None or len(host.keys) == 0):
            found = host.open_tenant
        else:
            raise Unauthorized("no API key given" if key is None else "invalid API key")
        request.state.tenant = found.name
        return found

    # -- generation -------------------------------------------------------------------

    async def generate(request: Request, tenant: Tenant, body: CompletionRequest | ChatRequest, chat: bool) -> Response:
        request.state.generation = True
        model_name = body.model or host.default_model(tenant)
        request.state.model = model_name
        entry = host.model(tenant, model_name)
        messages = body.message_dicts() if chat else None
        prompt = None if chat else body.prompt_text()
        params = body.sampling()
        stops = body.stops()
        prompt_ids = await asyncio.to_thread(host.prompt_tokens, entry, prompt, messages)
        n_prompt = len(prompt_ids)
        host.check_context(entry, n_prompt)
        asked = body.requested_max_tokens() if chat else body.max_tokens
        if asked is not None:
            tenant.check_max_tokens(asked)
        room = entry.model.config.context_length - n_prompt
        max_tokens = min(asked if asked is not None else (tenant.settings.limits.max_tokens if chat else 16), room)
        guest_request = build_request(
            entry,
            prompt=prompt,
            messages=messages,
            max_tokens=max_tokens,
            params=params,
            stop=stops,
            name=model_name,
            prompt_tokens=prompt_ids,
        )
        tracker = Tracker(metrics, tenant.name, model_name)
        request.state.tracker = tracker
        admission = tenant.admit(n_prompt + max_tokens)
        cancel = threading.Event()
        events = host.start(tenant, guest_request, admission, cancel, prompt_tokens=n_prompt, max_tokens=max_tokens)
        reply = Reply(chat, model_name, entry, n_prompt, body.include_usage())

        watcher = asyncio.create_task(_watch_disconnect(request, cancel))
        try:
            if not body.stream:
                async for event in events:
                    if isinstance(event, Emitted):
                        if event.token >= 0:
                            tracker.token()
                    else:
                        return finish_plain(event, reply, tenant, tracker)
                raise InternalError("the guest's output ended without a result")
            first = await anext(events)
        finally:
            watcher.cancel()
        if isinstance(first, Failed):
            fail(first, tenant, tracker)
        return StreamingResponse(
            stream(first, events, reply, tenant, tracker, cancel),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def fail(event: Failed, tenant: Tenant, tracker: Tracker) -> None:
        error = describe_failure(event.error)
        if is_guest_trap(event.error):
            metrics.guest_traps.labels(tenant.name).inc()
        tracker.finish(error.http_status)
        raise error

    def finish_plain(event: Finished | Failed, reply: Reply, tenant: Tenant, tracker: Tracker) -> JSONResponse:
        if isinstance(event, Failed):
            fail(event, tenant, tracker)
        result = event.result
        completion = len(result.tokens)
        tracker.finish(200, reply.prompt_tokens, completion)
        return JSONResponse(reply.whole(result.text, result.finish_reason, completion))

    async def stream(first, events, reply: Reply, tenant: Tenant, tracker: Tracker, cancel: threading.Event):
        status = 499  # unless it ends one way or another below: the client went away
        try:
            if reply.chat:
                yield reply.sse(reply.chunk({"role": "assistant", "content": ""}, None))
            event = first
            while True:
                if isinstance(event, Emitted):
                    if event.token >= 0:
                        tracker.token()
                    if event.text:
                        yield reply.sse(reply.delta(event.text))
                elif isinstance(event, Finished):
                    result = event.result
                    completion = len(result.tokens)
                    yield reply.sse(reply.chunk({} if reply.chat else "", result.finish_reason))
                    if reply.include_usage:
                        yield reply.sse(reply.usage_chunk(completion))
                    yield b"data: [DONE]\n\n"
                    status = 200
                    tracker.finish(200, reply.prompt_tokens, completion)
                    return
                else:  # the guest failed after the response started: report it in the stream
                    error = describe_failure(event.error)
                    if is_guest_trap(event.error):
                        metrics.guest_traps.labels(tenant.name).inc()
                    status = error.http_status
                    yield reply.sse(json.loads(error_response(error).body))
                    yield b"data: [DONE]\n\n"
                    return
                event = await anext(events)
        finally:
            cancel.set()  # no await here: this may run inside a cancelled scope (client gone)
            tracker.finish(status)

    @app.post("/v1/completions")
    async def completions(request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        return await generate(request, tenant, await parse_body(request, CompletionRequest), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, tenant: Tenant = Depends(authenticate)) -> Response:
        return await generate(request, tenant, await parse_body(request, ChatRequest), chat=True)

    # -- models, tokens, health, metrics -----------------------------------------------

    def model_card(name: str, entry: StoredModel) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": host.loaded_at.get(name, 0),
            "owned_by": "realm",
            "sha256": entry.sha256,
            "info": entry.info(),
        }

    @app.get("/v1/models")
    async def list_models(tenant: Tenant = Depends(authenticate)) -> dict:
        data = [
            model_card(name, e) for name, e in host.models.items() if tenant.allowed(name) or tenant.allowed(e.sha256)
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, tenant: Tenant = Depends(authenticate)) -> dict:
        return model_card(model, host.model(tenant, model))

    @app.post("/tokenize")
    async def tokenize(request: Request, tenant: Tenant = Depends(authenticate)) -> dict:
        body: TokenizeRequest = await parse_body(request, TokenizeRequest)
        name = body.model or host.default_model(tenant)
        tok = host.model(tenant, name).model.tokenizer
        tokens = await asyncio.to_thread(
            tok.encode, body.content, add_bos=body.add_special and tok.add_bos, parse_special=body.parse_special
        )
        return {"model": name, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request, tenant: Tenant = Depends(authenticate)) -> dict:
        body: DetokenizeRequest = await parse_body(request, DetokenizeRequest)
        name = body.model or host.default_model(tenant)
        tok = host.model(tenant, name).model.tokenizer
        bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
        if bad is not None:
            raise _invalid(f"token id {bad} is outside the vocabulary (size {tok.vocab_size})", "tokens")
        return {"model": name, "content": await asyncio.to_thread(tok.decode, body.tokens)}

    @app.get("/health")
    async def health() -> dict:
        host.check_ready()
        return {
            "status": "ok",
            "models": list(host.models),
            "tenants": len(host.tenants),
            "decode_steps": {name: entry.model.decode_step for name, entry in host.models.items()},
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Until cancelled: if the client disconnects, tell the guest to stop."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


# ---------------------------------------------------------------------------- response bodies


class Reply:
    """OpenAI's response objects for one request: whole, or chunk by chunk."""

    def __init__(self, chat: bool, model: str, entry: StoredModel, prompt_tokens: int, include_usage: bool) -> None:
        self.chat = chat
        self.model = model
        self.fingerprint = "realm-" + entry.sha256[:12]
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def whole(self, text: str, finish_reason: str, completion: int) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage(completion)}

    def chunk(self, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(obj), "choices": [choice]}

    def delta(self, text: str) -> dict[str, Any]:
        return self.chunk({"content": text} if self.chat else text, None)

    def usage_chunk(self, completion: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(completion)}

    @staticmethod
    def sse(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
