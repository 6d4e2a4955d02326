"""The request bodies of the OpenAI-compatible endpoints (and llama.cpp's tokenize pair).

Sampling fields the caller leaves out get the host's defaults (llama.cpp's); every field
the caller gives reaches the guest unchanged. Fields of OpenAI's API that Realm does not
implement are refused (400) when they ask for something, ignored when they are inert.

Every model is strict (`true` is not 1, `"0.5"` is not 0.5) and refuses NaN and infinities
(JSON's `1e999` parses as infinity): what passes here is what the guest gets. Integers
that reach a guest are bounded to what its fields hold.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from realm.engine.logprobs import MAX_TOP_LOGPROBS
from realm.engine.sampling import SamplingParams
from realm.errors import InvalidArgument, Unsupported
from realm.server.tools import ToolMode, call_text, tool_mode

MAX_STOPS = 16
MAX_LOGIT_BIAS = 1024  # entries of one logit_bias (the default guest's limit too)
MAX_N = 128  # choices one request may ask for; a tenant's own limit (max_n) is usually lower
INT32_MAX = 2**31 - 1
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(**STRICT, extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=0, le=INT32_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="taken modulo 2^64")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate (at most the tenant's max_n)")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="token id (a decimal string) -> bias in [-100, 100]"
    )

    @model_validator(mode="after")
    def _supported(self) -> Any:
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdecimal()) or len(key) > 10:
                raise invalid(f"logit_bias: {key!r} is not a token id", "logit_bias")
            if not -100 <= bias <= 100:
                raise invalid(f"logit_bias: the bias of token {key} is {bias}, outside [-100, 100]", "logit_bias")
        extra = self.model_extra or {}
        for name, inert in _UNSUPPORTED.items():
            if name in extra and extra[name] not in inert:
                raise Unsupported(f"{name} is not supported by this server")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOPS:
            raise Unsupported(f"at most {MAX_STOPS} stop strings")
        self.constraint()  # a malformed response_format / grammar / json_schema / regex is refused here
        return self

    def constraint_field(self) -> str | None:
        """The request field that asks for a constraint, if one does."""
        extra = self.model_extra or {}
        asked = [k for k in CONSTRAINT_FIELDS if extra.get(k) is not None and extra.get(k) != {"type": "text"}]
        if len(asked) > 1:
            raise invalid(f"give at most one of {', '.join(asked)}", asked[1])
        return asked[0] if asked else None

    def constraint(self) -> dict[str, Any] | None:
        """What the output must match (engine/grammar.py's constraint), from OpenAI's
        `response_format` or llama.cpp's `json_schema` / `grammar` or a `regex`; None if the
        request asks for none. At most one of them; InvalidArgument naming the field at fault."""
        name = self.constraint_field()
        if name is None:
            return None
        value = (self.model_extra or {})[name]
        if name == "json_schema":
            if not isinstance(value, dict):
                raise invalid("json_schema must be a JSON Schema object", name)
            return {"type": "json_schema", "schema": value}
        if name in ("grammar", "regex"):
            if not isinstance(value, str) or not value:
                raise invalid(f"{name} must be a non-empty string", name)
            return {"type": "grammar", "gbnf": value} if name == "grammar" else {"type": "regex", "pattern": value}
        return _response_format(value)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> SamplingParams:
        """The sampling parameters: the caller's, the host's defaults for the rest."""
        given = {
            k: getattr(self, k)
            for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                      "presence_penalty", "frequency_penalty", "seed")
            if getattr(self, k) is not None
        }  # fmt: skip
        bias = tuple((int(k), v) for k, v in (self.logit_bias or {}).items())
        return SamplingParams(**given, logit_bias=bias)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


CONSTRAINT_FIELDS = ("response_format", "json_schema", "grammar", "regex")


def invalid(message: str, param: str | None) -> InvalidArgument:
    """InvalidArgument naming the request field at fault (the error body's `param`)."""
    error = InvalidArgument(message)
    error.param = param
    return error


def _response_format(value: Any) -> dict[str, Any] | None:
    """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"}; llama.cpp's
    `{"type": "json_object", "schema": {...}}` too) as a constraint."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        schema = value.get("schema")
        if schema is None:
            return {"type": "json_object"}
        if not isinstance(schema, dict):
            raise invalid("response_format.schema must be a JSON Schema object", "response_format.schema")
        return {"type": "json_schema", "schema": schema}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid(
                "response_format.json_schema.schema must be a JSON Schema object", "response_format.json_schema.schema"
            )
        return {"type": "json_schema", "schema": schema}
    raise invalid(
        f"response_format.type must be text, json_object or json_schema, not {kind!r}", "response_format.type"
    )


_UNSUPPORTED: dict[str, tuple] = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
}


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)  # OpenAI's default for completions
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="each token's log-probability and this many alternatives"
    )

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per token to report, None: no log-probabilities."""
        return self.logprobs

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise Unsupported("one prompt per request (a list of one string at most)")
        return self.prompt[0]


class ContentPart(BaseModel):
    model_config = ConfigDict(**STRICT, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(**STRICT, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise Unsupported(f"message content of type {part.type!r} is not supported (text only)")
            parts.append(part.text)
        return "".join(parts)


class ToolFunction(BaseModel):
    model_config = ConfigDict(**STRICT, extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: ToolFunction


class FunctionName(BaseModel):
    model_config = STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionName


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _logprobs(self) -> Any:
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        return self

    def top_logprobs_asked(self) -> int | None:
        """Alternatives per token to report, None: no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them; an assistant's earlier tool calls
        become the text the model wrote for them."""
        out = []
        for m in self.messages:
            text = m.text()
            calls = (m.model_extra or {}).get("tool_calls")
            if m.role == "assistant" and calls:
                if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                    raise invalid("tool_calls must be a list of objects", "messages.tool_calls")
                text += call_text(calls)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out

    def tool_mode(self) -> ToolMode | None:
        """What the tools ask of the output (server/tools.py); None without tools."""
        choice = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice
        try:
            mode = tool_mode([t.model_dump() for t in self.tools or ()], choice)
        except InvalidArgument as e:
            e.param = "tool_choice"
            raise
        if mode is not None and self.constraint_field() is not None:
            raise invalid(f"tools and {self.constraint_field()} cannot be used together", "tools")
        return mode

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    model: str | None = None
    content: str
    add_special: bool = Field(True, description="BOS by the model's rule")
    parse_special: bool = Field(True, description="control tokens written in the text become their ids")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(**STRICT, extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


MAX_EMBEDDING_INPUTS = 64


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request: texts or token arrays, one vector each."""

    model_config = ConfigDict(**STRICT, extra="forbid")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="the model's embedding length, or left out")
    user: str | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Any:
        if not self.input:
            raise invalid("input is empty", "input")
        if len(self.items()) > MAX_EMBEDDING_INPUTS:
            raise invalid(f"input has {len(self.items())} items; at most {MAX_EMBEDDING_INPUTS} per request", "input")
        return self

    def items(self) -> list[str | list[int]]:
        """The inputs, one vector each: a text, or a token array used as given."""
        if isinstance(self.input, str):
            return [self.input]
        items: list[Any] = list(self.input)
        return [items] if all(isinstance(t, int) for t in items) else items
