"""OpenAI's wire format: completion replies (whole, or as server-sent events), the model
card, and the error body. Pure data: no HTTP framework, no server state."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from realm.engine.logprobs import TokenLogprobs
from realm.engine.model_store import StoredModel
from realm.errors import RealmError
from realm.sandbox.instance import GuestResult
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
    """OpenAI's response objects for one (chat) completion request of `n` choices: whole, or
    chunk by chunk. `token_bytes` (a token's bytes, control tokens' text included) is given
    when the request asked for log-probabilities; `tools` when the reply may be a tool call,
    whose streamed text is then held back until it is known not to be one."""

    def __init__(
        self,
        chat: bool,
        model: str,
        sha256: str,
        prompt_tokens: int,
        include_usage: bool,
        n: int = 1,
        token_bytes: Callable[[int], bytes] | None = None,
        tools: ToolMode | None = None,
    ) -> None:
        self.chat = chat
        self.tools = tools
        self._held = [""] * n  # each choice's streamed text held back while it may be a tool call
        self._held_logprobs: list[list[TokenLogprobs]] = [[] for _ in range(n)]
        self._calling = [tools is not None] * n  # until the text shows it is no call
        self.model = model
        self.fingerprint = "realm-" + sha256[:12]
        self.prompt_tokens = prompt_tokens
        self.include_usage = include_usage
        self.n = n
        self.token_bytes = token_bytes
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offsets = [0] * n  # completions' text_offset: characters of each choice's tokens so far

    def whole(self, results: Sequence[GuestResult]) -> dict[str, Any]:
        """The reply of a request that was not streamed: one choice per result, in order."""
        choices = []
        for index, r in enumerate(results):
            logprobs = self._logprobs(index, r.logprobs)
            calls = parse_reply(r.text) if self.tools is not None else None
            body: dict[str, Any]
            if calls is not None:
                body = {"message": {"role": "assistant", "content": None, "tool_calls": calls}}
            else:
                body = {"message": {"role": "assistant", "content": r.text}} if self.chat else {"text": r.text}
            finish = "tool_calls" if calls is not None else r.finish_reason
            choices.append({"index": index, **body, "finish_reason": finish, "logprobs": logprobs})
        obj = "chat.completion" if self.chat else "text_completion"
        completion = sum(len(r.tokens) for r in results)
        return {**self._head(obj), "choices": choices, "usage": self.usage(completion)}

    # ------------------------------------------------------------------------- streamed

    def opening(self) -> list[bytes]:
        """The events before any text: chat announces the assistant's role, for each choice."""
        if not self.chat:
            return []
        return [sse(self._chunk(i, {"role": "assistant", "content": ""}, None)) for i in range(self.n)]

    def text(self, index: int, text: str, logprobs: Sequence[TokenLogprobs] = ()) -> bytes:
        """The event of a piece of choice `index`'s text, with its tokens' log-probabilities
        (empty while the text may be a tool call)."""
        if self._calling[index]:
            self._held[index] += text
            self._held_logprobs[index] += logprobs
            held = self._held[index]
            if self.tools is None or self.tools.forced or held.startswith(MARKER[: len(held)]):
                return b""
            self._calling[index] = False  # plain text after all
            text, logprobs = held, self._held_logprobs[index]
            self._held[index], self._held_logprobs[index] = "", []
        return sse(self._chunk(index, {"content": text} if self.chat else text, None, self._logprobs(index, logprobs)))

    def finished(self, index: int, finish_reason: str) -> list[bytes]:
        """The events that end choice `index`: a tool call held back (its name, then its
        arguments) or the text held back, then the finish reason."""
        events = []
        held = self._held[index]
        calls = parse_reply(held) if self._calling[index] else None
        if calls is not None:
            for i, call in enumerate(calls):
                fn = call["function"]
                head = {
                    "index": i,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": ""},
                }
                arguments = {"index": i, "function": {"arguments": fn["arguments"]}}
                events += [sse(self._chunk(index, {"tool_calls": [head]}, None))]
                events += [sse(self._chunk(index, {"tool_calls": [arguments]}, None))]
            finish_reason = "tool_calls"
        elif held:
            delta = {"content": held} if self.chat else held
            events.append(sse(self._chunk(index, delta, None, self._logprobs(index, self._held_logprobs[index]))))
        return [*events, sse(self._chunk(index, {} if self.chat else "", finish_reason))]

    def closing(self, completion: int) -> list[bytes]:
        """The last events once every choice has finished: the usage if asked for, [DONE]."""
        events = []
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

    def _chunk(self, index: int, delta: Any, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        return {**self._head("text_completion"), "choices": [choice]}

    def _logprobs(self, index: int, tokens: Sequence[TokenLogprobs]) -> dict[str, Any] | None:
        """Chat's `{content: [{token, logprob, bytes, top_logprobs}]}`, or the completions'
        `{tokens, token_logprobs, top_logprobs, text_offset}`; None if not asked for."""
        raw = self.token_bytes
        if raw is None:
            return None
        if self.chat:
            content = [
                {**_entry(raw(t.token), t.logprob), "top_logprobs": [_entry(raw(a), lp) for a, lp in t.top]}
                for t in tokens
            ]
            return {"content": content, "refusal": None}
        texts = [_text(raw(t.token)) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_text(raw(a)): lp for a, lp in t.top} for t in tokens],
            "text_offset": offsets,
        }


def _text(raw: bytes) -> str:
    """A token's text (a piece of a UTF-8 character shows as U+FFFD; its bytes say what it is)."""
    return raw.decode("utf-8", "replace")


def _entry(raw: bytes, logprob: float) -> dict[str, Any]:
    return {"token": _text(raw), "logprob": logprob, "bytes": list(raw)}
