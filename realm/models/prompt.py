"""The prompt rule, in one place: messages rendered with the model's chat template, then
tokenized with BOS by the model's rule (`tokenizer.ggml.add_bos_token`) unless the text
already starts with it, special tokens parsed. This is what llama.cpp's `llama-server`
does with a chat request; the CLI, the server and the guest ABI all call it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from realm.errors import InvalidArgument, Unsupported
from realm.models.chat_template import ChatTemplate
from realm.models.tokenizer import Tokenizer


def encode(tokenizer: Tokenizer, text: str, *, add_bos: bool = True, parse_special: bool = True) -> list[int]:
    """`text` -> tokens. `add_bos` asks for BOS where the model wants one; a text that
    carries its own BOS (a rendered chat template) gets no second one when special
    tokens are parsed."""
    bos = tokenizer.bos_id
    add = add_bos and tokenizer.add_bos
    if add and parse_special and bos is not None and text.startswith(tokenizer.token_text(bos)):
        add = False
    return tokenizer.encode(text, add_bos=add, parse_special=parse_special)


def render(template: ChatTemplate | None, messages: Sequence[Mapping[str, Any]], *, cannot_chat: str) -> str:
    """The chat template's text for `messages`; `cannot_chat` says why when there is no template."""
    if template is None:
        raise Unsupported(cannot_chat)
    return template.render(messages)


def prompt_tokens(
    tokenizer: Tokenizer,
    template: ChatTemplate | None,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    cannot_chat: str = "the model has no chat template: send a plain prompt",
) -> list[int]:
    """The tokens of a request: exactly one of a plain `prompt` and chat `messages`."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("a request has either a prompt or messages (one of them)")
    text = prompt if messages is None else render(template, messages, cannot_chat=cannot_chat)
    return encode(tokenizer, text or "")
