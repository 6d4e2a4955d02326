"""Constrained decoding: grammars, JSON schemas and regular expressions compiled by
llguidance into token masks over a model's vocabulary.

A *constraint* is a small JSON object (docs/ABI.md, "Constraints"): `{"type": "json_object"}`,
`{"type": "json_schema", "schema": {...}}`, `{"type": "regex", "pattern": "..."}`,
`{"type": "grammar", "gbnf": "..."}` (llama.cpp's GBNF, or Lark) or
`{"type": "lark", "lark": "..."}`. `GrammarCache.compile` turns one into a `Grammar`: the
state of one sequence under it, which gives the mask of the tokens allowed next (one bit
per token, 32 to a uint32 word, token i in word i // 32, bit i % 32), takes the tokens
chosen, says whether the text so far is complete, and gives the tokens the grammar forces.

Compiling is the expensive part (a JSON schema: about a millisecond to tens of them);
a compiled grammar is kept per tenant, bounded (`GrammarCache`), so a tenant that sends
the same schema again pays nothing and one that floods the host with unique schemas only
evicts its own. llguidance is called through its C API (llguidance_api.py), without the
GIL while it builds a vocabulary's view, compiles and computes a mask, so none of them
holds up the batch scheduler's thread, the event loop or other guests.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import llguidance as llg
import numpy as np
import torch

from realm.backends import native
from realm.engine.llguidance_api import Matcher, VocabularyView
from realm.errors import InvalidArgument
from realm.models.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_CONSTRAINT_BYTES = 64 * 1024
"""A constraint's JSON text at most (a schema, a grammar, a pattern): larger is refused."""
GRAMMARS_PER_TENANT = 32
"""Compiled grammars kept per tenant; the least recently used is dropped first."""
TENANTS_CACHED = 256
"""Tenants whose grammars are kept; the least recently active tenant's go first."""
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""JSON as Python's json.dumps writes it: one space after `,` and `:`, no other
whitespace, so a small model cannot wander off into an endless run of blanks."""

TYPES = ("json_object", "json_schema", "regex", "grammar", "lark")

_STRING_CHARACTER = r'[^"\\\x00-\x1F\x7F]'
SLICES = [
    r"[\x20\x0A\x0D\x09]+",
    *(f"{_STRING_CHARACTER}{{1,{n}}}" for n in (3, 6, 10, 15, 20, 30)),
    f"{_STRING_CHARACTER}+",
]
"""llguidance's "slices": sets of tokens (whitespace; pieces of a JSON string's text up to
3, 6, ... 30 characters; any piece) that a mask takes whole where the grammar's state
allows every token of one, instead of walking them in the vocabulary's trie. llguidance's
own list has the pieces of up to 10 and 30 characters only, so inside a string with a
`maxLength` and fewer than 30 characters left a mask walked every token longer than 10
(inside one with fewer than 10 left, most of the vocabulary). The masks are the same
(tests/test_grammar.py). Each slice holds tries of its tokens, so more cost memory: over
the schema suite's outputs on gemma3-270m (AMD EPYC, 2 cores), a step's mask took 0.24 ms
against 0.40 (docs/ABI.md), for 130 MiB against 70 for the vocabulary's llguidance form,
built once; every length from 1 to 10 and five more up to 30 took a little less again, for
247 MiB."""


def words(vocab_size: int) -> int:
    """uint32 words of a mask over `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def grammar_text(constraint: Mapping[str, Any]) -> str:
    """llguidance's grammar for a constraint; InvalidArgument for a malformed one (the
    grammar itself is checked when it compiles)."""
    if not isinstance(constraint, Mapping):
        raise InvalidArgument('a constraint must be a JSON object with a "type"')
    kind = constraint.get("type")
    size = len(json.dumps(constraint))
    if size > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"the constraint is {size} bytes; the most is {MAX_CONSTRAINT_BYTES}")
    try:
        if kind == "json_object":
            return str(llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS))
        if kind == "json_schema":
            schema = constraint.get("schema")
            if not isinstance(schema, (Mapping, bool)):
                raise InvalidArgument('a json_schema constraint needs "schema": a JSON Schema object')
            return str(llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS))
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(_string(constraint, "pattern"))
        if kind == "grammar":
            return llg.grammar_from("gbnf", _string(constraint, "gbnf"))
        if kind == "lark":
            return llg.LLMatcher.grammar_from_lark(_string(constraint, "lark"))
    except ValueError as e:
        raise InvalidArgument(f"invalid {kind} constraint: {e}") from None
    raise InvalidArgument(f"unknown constraint type {kind!r}; the types are {', '.join(TYPES)}")


def _string(constraint: Mapping[str, Any], key: str) -> str:
    value = constraint.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"a {constraint.get('type')} constraint needs {key!r}: a non-empty string")
    return value


def allowed_tokens(mask: np.ndarray, vocab_size: int) -> torch.Tensor:
    """A bitmask (words,) uint32 as the tokens it allows, (vocab_size,) bool."""
    return torch.from_numpy(np.unpackbits(mask.view(np.uint8), bitorder="little", count=vocab_size).view(bool))


def apply_mask(mask: np.ndarray, logits: np.ndarray) -> None:
    """Sets the logits (vocab,) float32 of the tokens a bitmask (words,) uint32 forbids to
    -inf, in place: in one pass of Realm's native library where it is loaded, else in NumPy.
    There a grammar mostly allows a few hundred tokens of a vocabulary: then the row is
    filled and the allowed logits put back (gemma3, 300 allowed of 262,144: 0.06 ms
    against 0.13 for np.copyto with `where`, which stays for masks that allow many)."""
    if native.mask_logits(logits, mask):
        return
    words = np.flatnonzero(mask)
    if words.size * 8 >= mask.size:
        np.copyto(logits, np.float32(-np.inf), where=~allowed_tokens(mask, logits.size).numpy())
        return
    bits = np.unpackbits(mask[words].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little").view(bool)
    ids = (words[:, None] * 32 + np.arange(32))[bits]
    ids = ids[ids < logits.size]
    kept = logits[ids]
    logits.fill(-np.inf)
    logits[ids] = kept


# ---------------------------------------------------------------------------- tokenizers


_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[int, VocabularyView]] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def vocabulary_bytes(tokenizer: Tokenizer, vocab_size: int) -> tuple[np.ndarray, bytes]:
    """Each row's token as llguidance reads it, as (lengths (vocab_size,) uint32, their
    bytes one after another): control tokens marked with a leading 0xFF (as its llama.cpp
    adapter does), the rows past the tokenizer's vocabulary empty. In NumPy: a loop over
    gemma3's tokens held the GIL in pieces for 0.12 s."""
    offsets, blob = tokenizer.pieces_table(special=True)
    n = min(tokenizer.vocab_size, vocab_size)
    control = np.flatnonzero(tokenizer.control_tokens()[:n])
    data = np.insert(np.frombuffer(blob, dtype=np.uint8)[: offsets[n]], offsets[control].astype(np.int64), 0xFF)
    lengths = np.zeros(vocab_size, dtype=np.uint32)
    lengths[:n] = np.diff(offsets[: n + 1])
    lengths[control] += 1
    return lengths, data.tobytes()


def lltokenizer(tokenizer: Tokenizer, vocab_size: int) -> VocabularyView:
    """llguidance's view of `tokenizer` with `vocab_size` rows of logits (padded with empty
    tokens that no grammar allows), its end tokens the model's end-of-generation set. Built
    once per tokenizer, on first use, without the GIL (gemma3, 262k tokens, 2 cores: 1.5 to
    2 s, 150 MiB)."""
    with _tokenizers_lock:
        built = _tokenizers.setdefault(tokenizer, {})
        if vocab_size not in built:
            ends = sorted(tokenizer.eot_ids) or ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
            lengths, data = vocabulary_bytes(tokenizer, vocab_size)
            built[vocab_size] = VocabularyView(lengths, data, ends, SLICES, tokenizer.encode)
        return built[vocab_size]


# ---------------------------------------------------------------------------- one sequence's state


ACCEPTING = 1
"""Grammar status: the text so far is complete (an end token is allowed now)."""
DONE = 2
"""Grammar status: nothing can follow but an end token."""


class Grammar:
    """One sequence's state under a compiled constraint. Not thread-safe: one guest uses it."""

    def __init__(self, matcher: Matcher, vocab_size: int, spare: list[Matcher] | None = None) -> None:
        self._matcher = matcher
        self._spare = spare
        self.vocab_size = vocab_size
        self.words = words(vocab_size)
        self._mask = np.zeros(self.words, dtype=np.uint32)
        self._mask_address = self._mask.ctypes.data

    def __del__(self) -> None:
        spare = getattr(self, "_spare", None)
        if spare is not None and len(spare) < SPARE_MATCHERS and self._matcher.reset():
            spare.append(self._matcher)

    def mask(self) -> np.ndarray:
        """The allowed next tokens as a bitmask, (words,) uint32 (a buffer reused by the next
        call). An end token is allowed exactly when the text so far is complete."""
        m = self._mask
        self._matcher.compute_mask_into(self._mask_address, m.nbytes)
        self._check()
        return m

    def apply(self, logits: np.ndarray) -> None:
        """Sets the logits (vocab,) float32 of the tokens not allowed next to -inf, in place."""
        apply_mask(self.mask(), logits)

    def allowed_among(self, tokens: np.ndarray, k: int) -> np.ndarray:
        """The first k of `tokens` the grammar allows next, in their order (fewer if fewer
        are): a microsecond a token, where the whole mask walks the vocabulary."""
        validate = self._matcher.validate_tokens
        allowed: list[int] = []
        for t in tokens.tolist():
            if validate((t,)):
                allowed.append(t)
                if len(allowed) == k:
                    break
        self._check()
        return np.array(allowed, dtype=np.int32)

    def consume(self, tokens: Sequence[int]) -> int:
        """Takes `tokens` in turn, all or none: the status (ACCEPTING | DONE bits) after
        them, or InvalidArgument, the state unchanged, if the grammar refuses one."""
        for t in tokens:
            if not 0 <= t < self.vocab_size:
                raise InvalidArgument(f"token id {t} is outside the vocabulary (size {self.vocab_size})")
        allowed = self._matcher.validate_tokens(tokens) if tokens else 0
        if allowed < len(tokens):
            self._check()
            raise InvalidArgument(f"the grammar does not allow token {tokens[allowed]} here")
        if tokens and not self._matcher.consume_tokens(tokens):
            self._check()
        return self.status()

    def status(self) -> int:
        m = self._matcher
        return (ACCEPTING if m.is_accepting() else 0) | (DONE if m.is_stopped() else 0)

    def forced(self) -> list[int]:
        """The tokens the grammar forces next (fast-forward), maybe none."""
        tokens = self._matcher.forced_tokens()
        self._check()
        return tokens or []

    def rollback(self, n: int) -> None:
        """Forgets the last `n` tokens taken."""
        if n < 0 or not self._matcher.rollback(n):
            raise InvalidArgument(f"cannot roll the grammar back by {n} tokens")
        self._check()

    def _check(self) -> None:
        error = self._matcher.error()
        if error is not None:
            raise InvalidArgument(f"the grammar failed: {error}")


# ---------------------------------------------------------------------------- compiling, cached


SPARE_MATCHERS = 8
"""Matchers of ended sequences kept per cached grammar, to start new sequences on."""


class _Compiled:
    """A compiled constraint in the cache: its template, and the matchers of sequences that
    ended, back at the start, to hand out again. A copy of the template starts with a cold
    lexer (llguidance's C API copies it whole, what its lexer has built included); a
    matcher used before has built what the grammar's common text needs (smollm2, the
    schema suite's outputs: 0.057 ms a step against 0.071)."""

    def __init__(self, template: Matcher) -> None:
        self.template = template
        self.spare: list[Matcher] = []

    def state(self, vocab_size: int) -> Grammar:
        try:
            matcher = self.spare.pop()
        except IndexError:
            matcher = self.template.copy()
        return Grammar(matcher, vocab_size, self.spare)


class GrammarCache:
    """Compiled constraints, per tenant, bounded: `GRAMMARS_PER_TENANT` each (least recently
    used dropped first) for the `TENANTS_CACHED` tenants most recently active. Thread-safe;
    compiling runs outside the lock (and without the GIL)."""

    def __init__(self, per_tenant: int = GRAMMARS_PER_TENANT, tenants: int = TENANTS_CACHED) -> None:
        self.per_tenant = per_tenant
        self.tenants = tenants
        self._cached: OrderedDict[str, OrderedDict[tuple[int, int, str], _Compiled]] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (cache misses), for tests and metrics

    def compile(self, tenant: str, tokenizer: Tokenizer, vocab_size: int, constraint: Mapping[str, Any]) -> Grammar:
        """A fresh state of `constraint` over the model's vocabulary; InvalidArgument names
        what is wrong with a constraint that does not compile."""
        text = grammar_text(constraint)
        key = (id(tokenizer), vocab_size, text)
        with self._lock:
            compiled = self._lookup(tenant, key)
            if compiled is not None:
                return compiled.state(vocab_size)
        compiled = _Compiled(_compile(text, lltokenizer(tokenizer, vocab_size)))
        with self._lock:
            self.compiles += 1
            self._store(tenant, key, compiled)
            return compiled.state(vocab_size)

    def size(self, tenant: str) -> int:
        with self._lock:
            return len(self._cached.get(tenant, ()))

    def _lookup(self, tenant: str, key: tuple[int, int, str]) -> _Compiled | None:
        entries = self._cached.get(tenant)
        if entries is None or key not in entries:
            return None
        self._cached.move_to_end(tenant)
        entries.move_to_end(key)
        return entries[key]

    def _store(self, tenant: str, key: tuple[int, int, str], compiled: _Compiled) -> None:
        entries = self._cached.setdefault(tenant, OrderedDict())
        self._cached.move_to_end(tenant)
        entries[key] = compiled
        while len(entries) > self.per_tenant:
            entries.popitem(last=False)
        while len(self._cached) > self.tenants:
            self._cached.popitem(last=False)


def compile_grammar(tokenizer: Tokenizer, vocab_size: int, constraint: Mapping[str, Any]) -> Grammar:
    """A fresh state of `constraint`, compiled now, uncached (the host's own generation)."""
    return Grammar(_compile(grammar_text(constraint), lltokenizer(tokenizer, vocab_size)), vocab_size)


LIMITS: dict[str, int | bool] = {
    "max_grammar_size": 100_000,
    "max_lexer_states": 50_000,
    "initial_lexer_fuel": 1_000_000,
    "verbose_errors": False,
}
"""llguidance's bounds on one grammar (symbols, lexer states: about 1-2 kB each, compile
work): a grammar past them is refused, never compiled at any cost."""


def _compile(text: str, view: VocabularyView) -> Matcher:
    matcher = Matcher.compile(view, text, LIMITS)
    error = matcher.error()
    if error is not None:
        raise InvalidArgument(f"the constraint does not compile: {error}")
    return matcher
