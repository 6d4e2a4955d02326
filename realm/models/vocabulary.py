"""A GGUF vocabulary: the `tokenizer.ggml.*` fields read and checked, token by token.

Every other part of the tokenizer starts from this: the token texts by id, the ids by
text, each token's attributes (llama.cpp's `llama_token_attr`, first set from the GGUF
token types; `special_tokens.py` adjusts them) and the SentencePiece scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from realm.errors import ModelFormatError

# --- token types (GGUF) and attributes (llama.cpp's llama_token_attr) -------------------

_TYPE_UNDEFINED, _TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL = 0, 1, 2, 3
_TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 4, 5, 6

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

ATTR_SPECIAL = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
"""Tokens cut out of the text before tokenization (see special_split.py)."""
ATTR_HIDDEN = ATTR_CONTROL | ATTR_UNKNOWN
"""Tokens shown only when special tokens are asked for."""

_TYPE_TO_ATTR = {
    _TYPE_UNDEFINED: ATTR_UNDEFINED,
    _TYPE_NORMAL: ATTR_NORMAL,
    _TYPE_UNKNOWN: ATTR_UNKNOWN,
    _TYPE_CONTROL: ATTR_CONTROL,
    _TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    _TYPE_UNUSED: ATTR_UNUSED,
    _TYPE_BYTE: ATTR_BYTE,
}

_KINDS = {"llama": "spm", "gpt2": "bpe"}  # tokenizer.ggml.model -> llama.cpp's vocabulary kind


# --- field access -------------------------------------------------------------------------


def field(fields: Mapping[str, Any], key: str) -> Any:
    """The value of `tokenizer.ggml.<key>`, None when absent."""
    return fields.get(f"tokenizer.ggml.{key}")


def list_field(fields: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> list | None:
    """An array field whose items are all of `kind` (bool never counts as a number)."""
    value = field(fields, key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be an array, got {type(value).__name__}")
    for item_type in set(map(type, value)):  # one check per distinct type: 262144 items are many
        if not issubclass(item_type, kind) or issubclass(item_type, bool):
            raise ModelFormatError(f"tokenizer.ggml.{key} holds a {item_type.__name__}, which does not belong there")
    return list(value)


def id_field(fields: Mapping[str, Any], key: str) -> int | None:
    """An integer field (a token id), None when absent."""
    value = field(fields, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be an integer, got {value!r}")
    return value


def bool_field(fields: Mapping[str, Any], key: str) -> bool | None:
    """A boolean field (integers read as booleans, as llama.cpp does), None when absent."""
    value = field(fields, key)
    if value is None:
        return None
    if not isinstance(value, (bool, int)):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be a boolean, got {value!r}")
    return bool(value)


def string_field(fields: Mapping[str, Any], key: str) -> str:
    """A string field, "" when absent."""
    value = field(fields, key) or ""
    if not isinstance(value, str):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be a string, got {value!r}")
    return value


# --- the vocabulary ---------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """The tokens of a GGUF vocabulary, by id."""

    kind: str  # "spm" (tokenizer.ggml.model "llama") or "bpe" ("gpt2")
    texts: list[str]  # by id; an empty text is renamed "[EMPTY_<id>]", as llama.cpp does
    ids: dict[str, int]  # text -> id
    attrs: list[int]  # ATTR_* bits by id
    scores: list[float] | None  # SentencePiece scores by id (None when the file has none)

    @property
    def size(self) -> int:
        return len(self.texts)


def read_vocabulary(fields: Mapping[str, Any]) -> Vocabulary:
    """The vocabulary in GGUF metadata; every defect is a ModelFormatError."""
    kind = _kind(fields)
    tokens = list_field(fields, "tokens", str)
    if not tokens:
        raise ModelFormatError("tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    scores = list_field(fields, "scores", (int, float))
    if scores is not None and len(scores) < n:
        raise ModelFormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    types = list_field(fields, "token_type", int)
    if types is not None and len(types) < n:
        raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    texts = tokens
    if "" in texts:  # llama.cpp renames empty tokens
        texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if types is None:
        attrs = [ATTR_NORMAL] * n
    else:
        attrs = [_TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in types[:n]]
    return Vocabulary(kind=kind, texts=texts, ids=_ids_by_text(texts), attrs=attrs, scores=scores)


def _kind(fields: Mapping[str, Any]) -> str:
    model = field(fields, "model")
    if not isinstance(model, str) or not model:
        raise ModelFormatError("the model has no tokenizer (tokenizer.ggml.model is missing)")
    kind = _KINDS.get(model)
    if kind is None:
        raise ModelFormatError(
            f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
            "Realm supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)"
        )
    return kind


def _ids_by_text(texts: list[str]) -> dict[str, int]:
    ids = dict(zip(texts, range(len(texts)), strict=True))
    if len(ids) != len(texts):
        seen: dict[str, int] = {}
        for i, t in enumerate(texts):
            if t in seen:
                raise ModelFormatError(f"duplicate token in vocabulary: {t!r} has ids {seen[t]} and {i}")
            seen[t] = i
    return ids
