"""The OpenAI-compatible HTTP API: one app factory, the error handlers, the body limit.

The endpoints are in routes.py. Every error is `{"error": {message, type, param, code}}`
(openai_format.error_body) with the status of its `RealmError` class (realm/errors.py),
turned into a response in `error_response` and nowhere else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from realm.errors import (
    InternalError,
    InvalidArgument,
    LimitExceeded,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RealmError,
)
from realm.server.admin_routes import admin_router
from realm.server.host import Host
from realm.server.metrics import Metrics, Tracker
from realm.server.openai_format import error_body
from realm.server.openapi import document
from realm.server.routes import router
from realm.server.settings import ServerSettings
from realm.server.tenants import retry_after_header

log = logging.getLogger("realm.server")

DRAIN_LIMIT = 16 << 20  # bytes of an oversized body read (and dropped) before answering 413


def create_app(settings: ServerSettings | None = None, *, host: Host | None = None) -> FastAPI:
    """The server for `settings` (or around `host`, which a test may give). Models load on a
    background thread at startup; until they are loaded /health answers 503 and so does
    every other endpoint but /metrics. `app.state.on_load_error`, if set, is called with a
    loading failure."""
    settings = settings or ServerSettings()
    docs = settings.docs
    app = FastAPI(
        title="Realm",
        description="OpenAI-compatible multi-tenant LLM serving",
        lifespan=_lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.host = host or Host(settings, Metrics())
    app.state.on_load_error = None
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RealmError, realm_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unexpected)
    app.include_router(router)
    app.include_router(admin_router)
    app.openapi = lambda: document(app)  # type: ignore[method-assign]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    host: Host = app.state.host

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


# ---------------------------------------------------------------------------- errors


def error_response(error: RealmError) -> JSONResponse:
    """The one place a RealmError becomes HTTP: its class's status, the one error body."""
    headers = {}
    if isinstance(error, LimitExceeded) and (after := retry_after_header(error)) is not None:
        headers["Retry-After"] = after
    return JSONResponse(error_body(error), status_code=error.http_status, headers=headers)


async def realm_error(request: Request, error: RealmError) -> JSONResponse:
    _count_failed_generation(request, error.http_status)
    return error_response(error)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route has not) in the error format,
    with their headers (a 405's `Allow`)."""
    where = f"{request.method} {request.url.path}"
    realm: RealmError
    if error.status_code == 404:
        realm = NotFound(f"no such endpoint: {where}")
    elif error.status_code == 405:
        realm = MethodNotAllowed(f"no such method: {where} (allowed: {(error.headers or {}).get('Allow', 'none')})")
    else:
        realm = InvalidArgument(str(error.detail))
    response = error_response(realm)
    response.status_code = error.status_code  # others keep their own status
    response.headers.update(error.headers or {})
    return response


async def unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    _count_failed_generation(request, 500)
    return error_response(InternalError("internal error; details are in the server's log"))


def _count_failed_generation(request: Request, status: int) -> None:
    """A generation request that failed is counted under its tenant and model (as far as
    it got before failing); other requests are not counted."""
    if not getattr(request.state, "generation", False):
        return
    tracker: Tracker | None = getattr(request.state, "tracker", None)
    if tracker is None:
        state = request.state
        tracker = Tracker(request.app.state.host.metrics, getattr(state, "tenant", ""), getattr(state, "model", ""))
    tracker.finish(status)


# ---------------------------------------------------------------------------- the body limit


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
