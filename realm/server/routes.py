"""The endpoints: each parses its request, asks the Host (a dependency: the app's
`state.host`) and formats the answer. Auth is a dependency too; the policy (which model,
how many tokens, admission) is the Host's, the wire format is openai_format's.

POST /v1/chat/completions and POST /v1/completions (both streamed as SSE or not, through
one code path, n choices), POST /v1/embeddings, GET /v1/models, GET /v1/models/{id},
POST /tokenize, POST /detokenize, GET /health, GET /metrics.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from realm.errors import InternalError, RealmError, Unauthorized, UnsupportedMediaType
from realm.sandbox.instance import GuestResult
from realm.server.embeddings import embeddings
from realm.server.host import Emitted, Event, Failed, Finished, Host, describe_failure, is_guest_trap
from realm.server.metrics import Tracker
from realm.server.off_loop import off_loop
from realm.server.openai_format import Reply
from realm.server.openapi import (
    ChatCompletion,
    Completion,
    EmbeddingList,
    Health,
    ModelCard,
    ModelList,
    Text,
    Tokens,
    answers,
    request_body,
)
from realm.server.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    invalid,
)
from realm.server.settings import dotted
from realm.server.tenants import Tenant

router = APIRouter()
Body = TypeVar("Body", bound=BaseModel)


def get_host(request: Request) -> Host:
    host: Host = request.app.state.host
    return host


def bearer_key(request: Request) -> str | None:
    """The key of the request's `Authorization: Bearer KEY`, None if it has no such header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("send the API key as `Authorization: Bearer KEY`")
    return value.strip()


async def authenticate(request: Request, host: Annotated[Host, Depends(get_host)]) -> Tenant:
    """The tenant of the request's `Authorization: Bearer KEY` (401 if none is)."""
    host.check_ready()
    tenant = host.tenant_for_key(bearer_key(request))
    request.state.tenant = tenant.name
    return tenant


async def metrics_reader(request: Request, host: Annotated[Host, Depends(get_host)]) -> None:
    """Lets the request read /metrics if the server's `metrics_keys` allow its key (401 if not)."""
    host.check_metrics_key(bearer_key(request))


HostDep = Annotated[Host, Depends(get_host)]
TenantDep = Annotated[Tenant, Depends(authenticate)]


async def parse_body(request: Request, schema: type[Body]) -> Body:
    """The request's JSON body as `schema`: UnsupportedMediaType (415) unless it is declared
    JSON, InvalidArgument (400) naming the first bad field."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"the request body must be JSON, sent with `Content-Type: application/json` (not {media_type or 'none'})"
        )
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", None) from None
    except RecursionError:  # the C parser's guard against deep nesting (about 1000 levels)
        raise invalid("the request body's JSON nests too deeply", None) from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", None)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        param = dotted(first["loc"]) or None
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise invalid(f"{param or 'body'}: {first['msg']}{more}", param) from None


# ---------------------------------------------------------------------------- generation


@router.post(
    "/v1/completions",
    response_model=None,
    openapi_extra=request_body(CompletionRequest),
    responses=answers(Completion, stream=True),
)
async def completions(request: Request, host: HostDep, tenant: TenantDep) -> Response:
    return await generate(request, host, tenant, await parse_body(request, CompletionRequest))


@router.post(
    "/v1/chat/completions",
    response_model=None,
    openapi_extra=request_body(ChatRequest),
    responses=answers(ChatCompletion, stream=True),
)
async def chat_completions(request: Request, host: HostDep, tenant: TenantDep) -> Response:
    return await generate(request, host, tenant, await parse_body(request, ChatRequest))


async def generate(request: Request, host: Host, tenant: Tenant, body: CompletionRequest | ChatRequest) -> Response:
    """One (chat) completion: the host plans and starts it; the reply is whole or streamed.
    `request.state` carries the labels the error handlers count a failure under."""
    request.state.generation = True
    request.state.model = host.model_name(tenant, body.model)
    job = await off_loop(host.plan, tenant, request.state.model, body)
    request.state.model = job.model.name  # a model named by its hash counts under its served name
    tracker = request.state.tracker = Tracker(host.metrics, tenant.name, job.model.name)
    cancel = threading.Event()
    events = host.start(tenant, job, cancel)
    tokenizer = job.model.entry.model.tokenizer
    reply = Reply(
        job.chat,
        job.model.name,
        job.model.entry.sha256,
        job.prompt_tokens,
        body.include_usage(),
        n=job.n,
        token_bytes=(lambda t: tokenizer.token_bytes(t, special=True)) if job.logprobs else None,
        tools=job.tools,
    )
    if body.stream:
        return await _streamed(request, events, reply, tracker, cancel)
    return await _whole(request, events, reply, tracker, cancel)


async def _whole(
    request: Request, events: AsyncIterator[Event], reply: Reply, tracker: Tracker, cancel: threading.Event
) -> JSONResponse:
    results: dict[int, GuestResult] = {}
    async with _cancel_on_disconnect(request, cancel):
        async for event in events:
            if isinstance(event, Emitted):
                if event.token >= 0:
                    tracker.token()
            elif isinstance(event, Failed):
                raise _failure(event, tracker)
            else:
                results[event.index] = event.result
    if len(results) != reply.n:
        raise InternalError("the guest's output ended without a result")
    choices = [results[i] for i in range(reply.n)]
    tracker.finish(200, reply.prompt_tokens, sum(len(r.tokens) for r in choices))
    return JSONResponse(reply.whole(choices))


async def _streamed(
    request: Request, events: AsyncIterator[Event], reply: Reply, tracker: Tracker, cancel: threading.Event
) -> StreamingResponse:
    """A failure before the first output is an HTTP error; after it, an event in the stream."""
    async with _cancel_on_disconnect(request, cancel):
        first = await anext(events)
    if isinstance(first, Failed):
        raise _failure(first, tracker)
    return StreamingResponse(
        _sse(first, events, reply, tracker, cancel),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(
    first: Event, events: AsyncIterator[Event], reply: Reply, tracker: Tracker, cancel: threading.Event
) -> AsyncIterator[bytes]:
    status = 499  # unless it ends one way or another below: the client went away
    running, completion = reply.n, 0
    try:
        for opening in reply.opening():
            yield opening
        event = first
        while True:
            if isinstance(event, Emitted):
                if event.token >= 0:
                    tracker.token()
                if (event.text or event.logprobs is not None) and (
                    piece := reply.text(event.index, event.text, [event.logprobs] if event.logprobs else [])
                ):
                    yield piece
            elif isinstance(event, Finished):
                completion += len(event.result.tokens)
                for piece in reply.finished(event.index, event.result.finish_reason):
                    yield piece
                running -= 1
                if running == 0:
                    for closing in reply.closing(completion):
                        yield closing
                    status = 200
                    tracker.finish(200, reply.prompt_tokens, completion)
                    return
            else:
                error = _failure(event, tracker)
                status = error.http_status
                for closing in reply.failure(error):
                    yield closing
                return
            event = await anext(events)
    finally:
        cancel.set()  # no await here: this may run inside a cancelled scope (client gone)
        tracker.finish(status)


def _failure(event: Failed, tracker: Tracker) -> RealmError:
    """The error to report for a failed generation, counted (status, guest traps)."""
    error = describe_failure(event.error)
    if is_guest_trap(event.error):
        tracker.metrics.guest_traps.labels(tracker.tenant).inc()
    tracker.finish(error.http_status)
    return error


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> AsyncIterator[None]:
    """While inside: if the client disconnects, tell the guest to stop."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


# ---------------------------------------------------------------------------- embeddings


@router.post(
    "/v1/embeddings",
    response_model=None,
    openapi_extra=request_body(EmbeddingRequest),
    responses=answers(EmbeddingList, errors=(400, 401, 403, 404, 413, 415, 429, 503)),
)
async def create_embeddings(request: Request, host: HostDep, tenant: TenantDep) -> dict[str, Any]:
    body = await parse_body(request, EmbeddingRequest)
    return await off_loop(embeddings, host, tenant, body)


# ---------------------------------------------------------------------------- models, tokens, health, metrics


@router.get("/v1/models", response_model=None, responses=answers(ModelList, errors=(401, 503)))
async def list_models(host: HostDep, tenant: TenantDep) -> dict[str, Any]:
    return {"object": "list", "data": host.model_cards(tenant)}


@router.get("/v1/models/{model:path}", response_model=None, responses=answers(ModelCard, errors=(401, 403, 404, 503)))
async def get_model(model: str, host: HostDep, tenant: TenantDep) -> dict[str, Any]:
    return host.model_card(tenant, model)


@router.post(
    "/tokenize",
    response_model=None,
    openapi_extra=request_body(TokenizeRequest),
    responses=answers(Tokens, errors=(400, 401, 403, 404, 413, 415, 503)),
)
async def tokenize(request: Request, host: HostDep, tenant: TenantDep) -> dict[str, Any]:
    body = await parse_body(request, TokenizeRequest)
    served = await off_loop(host.resolve, tenant, host.model_name(tenant, body.model))  # may load it
    tok = served.entry.model.tokenizer
    host.check_text_fits(served, body.content, "content")
    tokens = await off_loop(
        tok.encode, body.content, add_bos=body.add_special and tok.add_bos, parse_special=body.parse_special
    )
    return {"model": served.name, "tokens": tokens}


@router.post(
    "/detokenize",
    response_model=None,
    openapi_extra=request_body(DetokenizeRequest),
    responses=answers(Text, errors=(400, 401, 403, 404, 413, 415, 503)),
)
async def detokenize(request: Request, host: HostDep, tenant: TenantDep) -> dict[str, Any]:
    body = await parse_body(request, DetokenizeRequest)
    served = await off_loop(host.resolve, tenant, host.model_name(tenant, body.model))  # may load it
    tok = served.entry.model.tokenizer
    bad = next((t for t in body.tokens if not 0 <= t < tok.vocab_size), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary (size {tok.vocab_size})", "tokens")
    return {"model": served.name, "content": await off_loop(tok.decode, body.tokens)}


@router.get("/health", response_model=None, responses=answers(Health, errors=(503,)))
async def health(host: HostDep) -> dict[str, Any]:
    host.check_ready()
    return {
        "status": "ok",
        "models": list(host.models),
        "tenants": len(host.tenants),
        "decode_steps": {name: entry.model.decode_step for name, entry in host.models.items()},
    }


@router.get(
    "/metrics", response_model=None, dependencies=[Depends(metrics_reader)], responses=answers(None, errors=(401,))
)
async def prometheus(host: HostDep) -> Response:
    """Rendered on a worker thread: the live gauges take the model runners' locks."""
    return Response(await off_loop(host.metrics.render), media_type=host.metrics.content_type)
