"""Chat templates: the Jinja2 `tokenizer.chat_template` of a GGUF, rendered as HF does.

The environment is jinja2's `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a no-op `{% generation %}` block, HF's
`tojson` filter (plain `json.dumps`, no HTML escaping) and the globals HF templates call:
`raise_exception(message)` and `strftime_now(format)`. Templates come from model files,
which anyone can write, so the sandbox is strict: touching an unsafe attribute (such as
`__class__`) fails at once instead of quietly rendering as an empty string.

Every failure, a syntax error, a `raise_exception` or any other error while rendering,
is an `InvalidArgument` whose message says what went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from realm.errors import InvalidArgument
from realm.models.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "chat_template_from_fields"]


class _TemplateRaised(TemplateError):
    """What `raise_exception` in a template raises."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, refusing unsafe attribute access outright."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is not allowed")


class _GenerationBlock(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (marks assistant text): rendered as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> _StrictSandbox:
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template.

    `render(messages)` gives the prompt text; special tokens in it (e.g. "<|im_start|>")
    are meant to be tokenized with `Tokenizer.encode(..., parse_special=True)`.
    """

    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise InvalidArgument("the chat template is empty")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except TemplateSyntaxError as exc:
            raise InvalidArgument(f"the chat template has a syntax error (line {exc.lineno}): {exc.message}") from exc
        except TemplateError as exc:
            raise InvalidArgument(f"the chat template does not compile: {exc}") from exc

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The prompt for `messages` ({role, content} each); `variables` go to the template too."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise InvalidArgument("messages must be a list of {role, content} objects")
        plain: list[dict[str, Any]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise InvalidArgument(f"message {i} is not an object with role and content")
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise InvalidArgument(f"message {i} has no role")
            if not isinstance(message.get("content", ""), (str, type(None))):
                raise InvalidArgument(f"message {i}: content must be a string")
            plain.append(dict(message))
        context = {
            **variables,
            "messages": plain,
            "add_generation_prompt": bool(add_generation_prompt),
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        try:
            return self._template.render(**context)
        except SecurityError as exc:
            raise InvalidArgument(f"the chat template was refused by the sandbox: {exc}") from exc
        except _TemplateRaised as exc:
            raise InvalidArgument(f"the chat template rejected the messages: {exc}") from exc
        except TemplateError as exc:
            raise InvalidArgument(f"the chat template failed: {exc}") from exc
        except RecursionError as exc:
            raise InvalidArgument("the chat template recursed too deeply") from exc
        except Exception as exc:  # a template can make Python raise nearly anything
            raise InvalidArgument(f"the chat template failed: {type(exc).__name__}: {exc}") from exc


def chat_template_from_fields(fields: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTemplate | None:
    """The model's default chat template (`tokenizer.chat_template`), or None when it has none.

    A template that does not compile raises `InvalidArgument` (see `ChatTemplate`).
    """
    source = fields.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source.strip():
        return None
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    return ChatTemplate(source, bos_token=bos, eos_token=eos)
