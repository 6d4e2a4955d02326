"""Special tokens cut out of the text before tokenization: llama.cpp's `tokenizer_st_partition`.

User-defined tokens are always cut out; control tokens only when the caller parses
special tokens. The longest token is cut first (ties by lower id; llama.cpp's sort is
unstable there), and a token marked lstrip / rstrip takes the C whitespace on that side.
"""

from __future__ import annotations

import re
from typing import Any

from realm.models.vocabulary import ATTR_HIDDEN, ATTR_LSTRIP, ATTR_RSTRIP, ATTR_SPECIAL

_C_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp strips around lstrip/rstrip tokens


class SpecialSplitter:
    """Splits text into plain fragments (str) and special token ids (int)."""

    def __init__(self, texts: list[str], attrs: list[int]) -> None:
        self._texts = texts
        self._attrs = attrs
        specials = [i for i, a in enumerate(attrs) if a & ATTR_SPECIAL]
        specials.sort(key=lambda i: (-len(texts[i].encode("utf-8")), i))
        self._rank = {tid: r for r, tid in enumerate(specials)}
        self._all = _SpecialMatcher(texts, specials)
        self._user_defined = _SpecialMatcher(texts, [i for i in specials if not attrs[i] & ATTR_HIDDEN])

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` with the special tokens in it replaced by their ids, longest first."""
        found = (self._all if parse_special else self._user_defined).find(text)
        if not found:
            return [text]
        fragments: list[str | int] = [text]
        for tid in sorted(found, key=self._rank.__getitem__):
            fragments = self._cut(fragments, tid)
        return fragments

    def _cut(self, fragments: list[str | int], tid: int) -> list[str | int]:
        """Every occurrence of token `tid` in the text fragments replaced by the id."""
        s = self._texts[tid]
        attr = self._attrs[tid]
        lstrip, rstrip = attr & ATTR_LSTRIP, attr & ATTR_RSTRIP
        out: list[str | int] = []
        for f in fragments:
            if not isinstance(f, str) or s not in f:
                out.append(f)
                continue
            parts = f.split(s)
            last = len(parts) - 1
            for k, p in enumerate(parts):
                if k:
                    out.append(tid)
                    if rstrip:
                        p = p.lstrip(_C_SPACE)
                if lstrip and k < last:
                    p = p.rstrip(_C_SPACE)
                if p:
                    out.append(p)
        return out


class _SpecialMatcher:
    """Finds which of a set of special tokens occur in a text (a character trie)."""

    _END = ""  # the key under which a trie node holds the id of the token ending there

    def __init__(self, texts: list[str], ids: list[int]) -> None:
        root: dict[str, Any] = {}
        for tid in ids:
            node = root
            for c in texts[tid]:
                node = node.setdefault(c, {})
            node[self._END] = tid
        self._root = root
        firsts = "".join(sorted(root))
        self._starts = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if root else None

    def find(self, text: str) -> set[int]:
        if self._starts is None:
            return set()
        found: set[int] = set()
        root, end = self._root, self._END
        n = len(text)
        for m in self._starts.finditer(text):
            node = root
            j = m.start()
            while j < n:
                child = node.get(text[j])
                if child is None:
                    break
                node = child
                j += 1
                tid = node.get(end)
                if tid is not None:
                    found.add(tid)
        return found
