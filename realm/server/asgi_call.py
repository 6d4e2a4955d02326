"""One HTTP request run through an ASGI app in this process, its response streamed back as
plain data: how a Ray replica runs the very app `realm serve` runs (routes, auth, limits,
errors, SSE) for a request its cluster's ingress received.

The request and the response's head cross processes as dictionaries and the body as
bytes, so they pickle. Closing the iterator early (the client left) is the app's
`http.disconnect`: its generation is cancelled as it is under uvicorn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp


@dataclass
class HttpRequest:
    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), None)


@dataclass
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), None)


async def call(app: ASGIApp, request: HttpRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Run `request` through `app`: yields the response's head, then its body's chunks."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("utf-8"),
        "query_string": request.query,
        "root_path": "",
        "headers": request.headers,
        "client": None,
        "server": None,
    }
    out: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                started = True
                yield ResponseHead(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body"):
                    break
    finally:
        gone.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:
            if not started:  # the app answered nothing: the caller reports it
                raise
            # Starlette re-raises an error it has already answered (500): nothing more to send
