"""Special tokens cut out of the text before tokenization: llama.cpp's `tokenizer_st_partition`.

User-defined tokens are always cut out; control tokens only when the caller parses
special tokens. The longest token is cut first (ties by lower id; llama.cpp's sort is
unstable there), and a token marked lstrip / rstrip takes the C whitespace on that side.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from realm.models.vocabulary import ATTR_HIDDEN, ATTR_LSTRIP, ATTR_RSTRIP

_C_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp strips around lstrip/rstrip tokens


class SpecialSplitter:
    """Splits text into plain fragments (str) and special token ids (int)."""

    def __init__(self, specials: dict[int, str], attrs: Sequence[int]) -> None:
        """`specials`: the text of every special token (ATTR_SPECIAL), by id."""
        self._texts = specials
        self._attrs = attrs
        ranked = sorted(specials, key=lambda i: (-len(specials[i].encode("utf-8")), i))
        self._rank = {tid: r for r, tid in enumerate(ranked)}
        self._matcher = _SpecialMatcher(specials)

    def split(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` with the special tokens in it replaced by their ids, longest first."""
        found = self._matcher.find(text)
        if not parse_special:
            found = {tid for tid in found if not self._attrs[tid] & ATTR_HIDDEN}
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
    """Finds which of a set of special tokens occur in a text.

    One dict holds every token text and every proper prefix of one, each with the id of the
    token it is (-1: none) and whether a longer token begins with it; a walk from a start
    ends at the first slice that no token begins with. (A trie of dicts did the same in ten
    times the memory: gemma3 has 6,414 special tokens, 75k characters.)"""

    def __init__(self, texts: dict[int, str]) -> None:
        steps: dict[str, tuple[int, bool]] = {}
        for text in texts.values():
            for k in range(1, len(text)):
                steps[text[:k]] = (steps.get(text[:k], (-1, True))[0], True)
        for tid, text in texts.items():
            steps[text] = (tid, steps.get(text, (-1, False))[1])
        self._steps = steps
        firsts = sorted({text[0] for text in texts.values()})
        self._starts = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if firsts else None

    def find(self, text: str) -> set[int]:
        if self._starts is None:
            return set()
        found: set[int] = set()
        steps = self._steps
        n = len(text)
        for m in self._starts.finditer(text):
            j = m.start()
            for k in range(j + 1, n + 1):
                step = steps.get(text[j:k])
                if step is None:
                    break
                tid, longer = step
                if tid >= 0:
                    found.add(tid)
                if not longer:
                    break
        return found
