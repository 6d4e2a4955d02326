"""OpenAI's wire format: completion replies (whole, or as server-sent events), the model
card, and the error body. Pure data: no HTTP framework, no server state."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from realm.engine.model_store import StoredModel
from realm.errors import RealmError
from realm.server.tools import MARKER, ToolMode, parse_reply

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def error_body(error: RealmError) -> dict[str, Any]:
    """The one error format, `{"error": {message, type, param, code}}`: the type is the
    error class's OpenAI type, the code its name in snake case."""
    return {
        "error": {
            "message": str(error),
            "type": error.openai_type,
            "param": error.param,
            "code": re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower(),
        }
    }


def model_card(name: str, entry: StoredModel, created: int) -> dict[str, Any]:
    """A served model as /v1/models lists it, with its SHA-256 and what it is."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "realm",
        "sha256": entry.sha256,
        "info": entry.info(),
    }


class Reply:
    """OpenAI's response objects for one (chat) completion request: whole, or chunk by chunk."""

    def __init__(
        self,
        chat: bool,
        model: str,
        sha256: str,
        prompt_tokens: int,
        include_usage: bool,
        tools: ToolMode | None = None,
    ) -> None:
        self.chat = chat
        self.tools = tools
        self.held = ""  # streamed text held back while it may be a tool call
        self.calling = tools is not None  # until the text shows it is no call
        self.model = model
        self.fingerprint = "realm-" + sha256[:12]
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def whole(self, text: str, finish_reason: str, completion: int) -> dict[str, Any]:
        """The reply of a request that was not streamed."""
        calls = parse_reply(text) if self.tools is not None else None
        if calls is not None:
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls", "logprobs": None}
        elif self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": self.usage(completion)}

    # ------------------------------------------------------------------------- streamed

    def opening(self) -> list[bytes]:
        """The events before any text: chat announces the assistant's role."""
        return [sse(self._chunk({"role": "assistant", "content": ""}, None))] if self.chat else []

    def text(self, text: str) -> bytes:
        """The event of a piece of generated text (empty while it may be a tool call)."""
        if self.calling:
            self.held += text
            if self.tools is not None and not self.tools.forced and not self.held.startswith(MARKER[: len(self.held)]):
                self.calling, text, self.held = False, self.held, ""  # plain text after all
            else:
                return b""
        return sse(self._chunk({"content": text} if self.chat else text, None))

    def closing(self, finish_reason: str, completion: int) -> list[bytes]:
        """The last events of a finished generation: a tool call held back (its name, then its
        arguments), the finish reason, the usage if asked for, [DONE]."""
        events = []
        calls = parse_reply(self.held) if self.calling else None
        if calls is not None:
            for i, call in enumerate(calls):
                fn = call["function"]
                head = {
                    "index": i,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": ""},
                }
                events.append(sse(self._chunk({"tool_calls": [head]}, None)))
                events.append(
                    sse(self._chunk({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]}, None))
                )
            finish_reason = "tool_calls"
        elif self.held:
            events.append(sse(self._chunk({"content": self.held}, None)))
        events.append(sse(self._chunk({} if self.chat else "", finish_reason)))
        if self.include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            events.append(sse({**self._head(obj), "choices": [], "usage": self.usage(completion)}))
        return [*events, DONE]

    @staticmethod
    def failure(error: RealmError) -> list[bytes]:
        """The last events of a generation that failed after its response had started."""
        return [sse(error_body(error)), DONE]

    # ------------------------------------------------------------------------- parts

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

    def _chunk(self, delta: Any, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}
