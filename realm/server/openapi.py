"""What /openapi.json says of each endpoint: its request body and every answer it gives.

The routes parse their bodies themselves (for the one error format, the 415 and the
nesting limit), so FastAPI cannot see them: each route declares its body with
`request_body` and its answers with `answers`, and `document` adds the request models to
the schema's components. A client generator or a fuzzer (benchmarks/api_fuzz.py) then
works from the schema alone.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from realm.server.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, TokenizeRequest

REQUESTS: tuple[type[BaseModel], ...] = (
    ChatRequest,
    CompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
    EmbeddingRequest,
)
_REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {message, type, param, code}}`."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Reply(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = Field(description="{tokens, token_logprobs, top_logprobs, text_offset}")


class Completion(_Reply):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # None when the reply is tool calls
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = Field(description="{content: [{token, logprob, bytes, top_logprobs}]}")


class ChatCompletion(_Reply):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    sha256: str
    info: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Tokens(BaseModel):
    model: str
    tokens: list[int]


class Text(BaseModel):
    model: str
    content: str


class Health(BaseModel):
    status: str
    models: list[str]
    tenants: int
    decode_steps: dict[str, str]


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra`: its required JSON body is `model`."""
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_ERRORS = {
    400: "malformed JSON or fields, a prompt longer than the context, an unsupported option",
    401: "no API key, or an unknown one",
    403: "the tenant may not use that model",
    404: "no such model",
    413: "the body is over the server's limit",
    415: "the body is not sent as application/json",
    429: "over the tenant's concurrency or token limit (Retry-After says when to retry)",
    500: "a fault of the server",
    502: "the tenant's guest failed",
    503: "the server is still loading",
}


def answers(
    ok: type[BaseModel] | None, *, errors: tuple[int, ...] = tuple(_ERRORS), stream: bool = False
) -> dict[int | str, dict[str, Any]]:
    """A route's `responses`: 200 with `ok` (or Prometheus text if None; server-sent events
    too with `stream`), and each of `errors` with the error body."""
    content: dict[str, Any] = {}
    if ok is None:
        content["text/plain"] = {"schema": {"type": "string"}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "`data: <chunk>` events"}}
    out: dict[int | str, dict[str, Any]] = {200: {"description": "success", "content": content}}
    if ok is not None:
        out[200]["model"] = ok
    for status in errors:
        out[status] = {"model": ErrorBody, "description": _ERRORS[status]}
    return out


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI schema, with the request models in its components (made once)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUESTS:
            model_schema = model.model_json_schema(ref_template=_REF)
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
