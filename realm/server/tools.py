"""Tool calls (OpenAI's `tools` and `tool_choice`) on top of constrained decoding.

The tools are described to the model in a system message (the chat templates of the
served models render none themselves), with the one form a call takes:
`<tool_call>{"name": ..., "arguments": {...}}`. The output is constrained
(engine/grammar.py) so that a call's arguments follow the function's JSON schema:
`required` or a named function: the output is one call; `auto`: a call, or text that does
not start with `<`; `none`: the tools are not described and nothing is constrained. The
reply's text is then read back into `tool_calls`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from realm.errors import InvalidArgument

MARKER = "<tool_call>"
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""engine/grammar.py's JSON style, for the schema embedded in a Lark grammar."""


@dataclass(frozen=True)
class ToolMode:
    """What a request's tools ask of its output."""

    functions: dict[str, dict[str, Any]]  # name -> JSON schema of its arguments
    descriptions: dict[str, str]
    choice: str  # "auto", "required", or the one function's name

    @property
    def forced(self) -> bool:
        """The output must be a call (no text)."""
        return self.choice != "auto"

    def constraint(self) -> dict[str, Any]:
        names = list(self.functions) if self.choice in ("auto", "required") else [self.choice]
        call = {"anyOf": [_call_schema(n, self.functions[n]) for n in names], "x-guidance": JSON_STYLE}
        if self.forced:
            return {"type": "lark", "lark": f'start: "{MARKER}" call\ncall: %json {json.dumps(call)}'}
        return {
            "type": "lark",
            "lark": f'start: TEXT | "{MARKER}" call\nTEXT: /[^<][\\s\\S]*/\ncall: %json {json.dumps(call)}',
        }

    def system_prompt(self) -> str:
        lines = [
            "You can call these functions. To call one, reply with only "
            f'{MARKER}{{"name": <function name>, "arguments": <its arguments as a JSON object>}}.'
        ]
        for name, schema in self.functions.items():
            described = f": {self.descriptions[name]}" if self.descriptions.get(name) else ""
            lines.append(f"- {name}{described} Arguments: {json.dumps(schema)}")
        return "\n".join(lines)


def tool_mode(tools: Sequence[Mapping[str, Any]] | None, choice: Any) -> ToolMode | None:
    """The request's tool mode; None when it has no tools or `tool_choice` is "none".
    InvalidArgument for a choice that names no tool or a tool without a name."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidArgument("tool_choice asks for a tool call, but the request has no tools")
        return None
    functions, descriptions = {}, {}
    for tool in tools:
        fn = tool["function"]
        functions[fn["name"]] = fn.get("parameters") or {"type": "object", "properties": {}}
        descriptions[fn["name"]] = fn.get("description") or ""
    if choice in (None, "auto"):
        return ToolMode(functions, descriptions, "auto")
    if choice == "none":
        return None
    if choice == "required":
        return ToolMode(functions, descriptions, "required")
    name = choice["function"]["name"]
    if name not in functions:
        raise InvalidArgument(f"tool_choice names {name!r}, which is not among the tools")
    return ToolMode(functions, descriptions, name)


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def with_tools(messages: list[dict[str, Any]], mode: ToolMode) -> list[dict[str, Any]]:
    """The messages with the tools described in the system message (prepended to the
    first one if there is one)."""
    prompt = mode.system_prompt()
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def call_text(tool_calls: Sequence[Mapping[str, Any]]) -> str:
    """An assistant message's earlier calls as the text the model wrote for them."""
    out = []
    for call in tool_calls:
        fn = call.get("function") or {}
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            raise InvalidArgument("an assistant message's tool call has arguments that are not JSON") from None
        out.append(MARKER + json.dumps({"name": fn.get("name"), "arguments": arguments}))
    return "".join(out)


def parse_reply(text: str) -> list[dict[str, Any]] | None:
    """The tool calls of a reply's text, or None if it is plain text."""
    if not text.startswith(MARKER):
        return None
    try:
        call = json.loads(text[len(MARKER) :])
    except json.JSONDecodeError:
        return None  # cut short by max_tokens: the text is given as it is
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
    ]
