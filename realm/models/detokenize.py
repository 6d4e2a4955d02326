"""Tokens back to text as llama.cpp writes it: `token_to_piece` per token and `clean_spaces`.

Control tokens render as their text, or as nothing when special tokens are skipped;
SentencePiece `▁` becomes a space and `<0xNN>` that byte; GPT-2 byte-level text is mapped
back to bytes. Some BPE pre-tokenizers then remove the space before punctuation and
contractions (`clean_spaces`).
"""

from __future__ import annotations

import re

from realm.models.byte_level import byte_decode
from realm.models.encoders import SPM_SPACE
from realm.models.vocabulary import ATTR_BYTE, ATTR_HIDDEN, ATTR_NORMAL, ATTR_SPECIAL, Vocabulary

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_pieces(vocab: Vocabulary) -> tuple[list[bytes], list[bytes]]:
    """llama.cpp's token_to_piece for every token: (with special=True, with special=False)."""
    texts, attrs = vocab.texts, vocab.attrs
    spm = vocab.kind == "spm"
    raw, normal = _encoded(texts, spm)
    rendered: list[bytes] = []
    add = rendered.append
    for i, a in enumerate(attrs):
        if a & ATTR_SPECIAL:
            add(raw[i])
        elif a & ATTR_NORMAL:
            add(normal[i] if spm else byte_decode(texts[i]))
        elif a & ATTR_BYTE:  # <0xNN>
            m = _HEX_BYTE.fullmatch(texts[i])
            add(bytes([int(m.group(1), 16)]) if m else b"")
        else:  # unused / undefined tokens are suppressed like control tokens
            add(b"")
    plain = list(rendered)
    for i, a in enumerate(attrs):
        if a & ATTR_HIDDEN:
            plain[i] = b""
    return rendered, plain


def _encoded(texts: list[str], spm: bool) -> tuple[list[bytes], list[bytes]]:
    """Every text as UTF-8, as is and (SentencePiece only, else empty) with `▁` as a space.

    One encode of all the texts joined by NUL and split again (where no token holds a
    NUL) rather than one call per token: this runs on every load, for up to 262144 tokens."""
    joined = "\0".join(texts)
    if joined.count("\0") == len(texts) - 1:
        raw = joined.encode("utf-8", "surrogatepass").split(b"\0")
        normal = joined.replace(SPM_SPACE, " ").encode("utf-8", "surrogatepass").split(b"\0") if spm else []
    else:
        raw = [t.encode("utf-8", "surrogatepass") for t in texts]
        normal = [t.replace(SPM_SPACE, " ").encode("utf-8", "surrogatepass") for t in texts] if spm else []
    return raw, normal


def clean_spaces(text: str) -> str:
    """llama.cpp's three `clean_spaces` passes (llama_vocab::impl::detokenize), character
    for character."""
    if len(text) < 2 or (" " not in text):
        return text
    # pass 1: " ?" " !" " ." " ," lose the space
    out = [text[0]]
    for i in range(1, len(text)):
        x = text[i]
        if text[i - 1] == " " and x in "?!.,":
            out.pop()
        out.append(x)
    # pass 2: " ' " -> "'"
    t = out
    out = [t[0]]
    i = 1
    n = len(t)
    while i < n:
        x = t[i]
        if x == "'" and i + 1 < n and t[i - 1] == " " and t[i + 1] == " ":
            out.pop()
            i += 1
            t[i] = "\0"  # the next space is dropped (and no longer reads as a space)
        out.append(x)
        i += 1
    # pass 3: " 's" " 'm" " 're" " 've" lose the space
    t = out
    out = [t[0]]
    n = len(t)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == " " and x == "'" and i + 1 < n:
            x1 = t[i + 1]
            if x1 in "sm":
                out.pop()
            elif x1 not in "td" and i + 2 < n:
                x2 = t[i + 2]
                if (x1 == "r" and x2 == "e") or (x1 == "v" and x2 == "e"):
                    out.pop()
        out.append(x)
    return "".join(out)


def inert(c: str) -> bool:
    """A character that no clean_spaces rule can remove or depend on across it."""
    return c != " " and c != "'"
