"""Tokens back to text as llama.cpp writes it: `token_to_piece` per token and `clean_spaces`.

Control tokens render as their text, or as nothing when special tokens are skipped;
SentencePiece `▁` becomes a space and `<0xNN>` that byte; GPT-2 byte-level text is mapped
back to bytes. Some BPE pre-tokenizers then remove the space before punctuation and
contractions (`clean_spaces`).
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

import numpy as np

from realm.models.byte_level import byte_decode
from realm.models.spm import SPM_SPACE
from realm.models.vocabulary import ATTR_BYTE, ATTR_HIDDEN, ATTR_NORMAL, ATTR_SPECIAL, Vocabulary

_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenPieces:
    """llama.cpp's token_to_piece for every token, in one buffer: a list of 262,144 bytes
    objects took ~17 MB more than the bytes themselves (gemma3)."""

    def __init__(self, vocab: Vocabulary) -> None:
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
        self._blob = b"".join(rendered)
        self._offsets = array("Q", accumulate(map(len, rendered), initial=0))
        self._hidden = bytes(bool(a & ATTR_HIDDEN) for a in attrs)

    def piece(self, token_id: int, special: bool) -> bytes:
        """The token's bytes; a control token's are empty unless `special` (an id in range)."""
        if not special and self._hidden[token_id]:
            return b""
        return self._blob[self._offsets[token_id] : self._offsets[token_id + 1]]

    def pieces(self, ids: list[int], special: bool) -> list[bytes]:
        """`piece` of each of `ids` (ids in range)."""
        blob, offsets = self._blob, self._offsets
        if special:
            return [blob[offsets[i] : offsets[i + 1]] for i in ids]
        hidden = self._hidden
        return [b"" if hidden[i] else blob[offsets[i] : offsets[i + 1]] for i in ids]

    def table(self, special: bool) -> tuple[np.ndarray, bytes]:
        """Every token's bytes at once: their offsets (n + 1, uint64) into one buffer."""
        offsets = np.frombuffer(self._offsets, dtype=np.uint64)
        if special:
            return offsets.copy(), self._blob
        shown = ~np.frombuffer(self._hidden, dtype=np.bool_)
        lengths = np.where(shown, np.diff(offsets), 0)
        kept = np.repeat(shown, np.diff(offsets).astype(np.int64))
        out = np.zeros(len(offsets), dtype=np.uint64)
        np.cumsum(lengths, out=out[1:])
        return out, np.frombuffer(self._blob, dtype=np.uint8)[kept].tobytes()


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
