"""llguidance's C API, through ctypes: the same library its Python package ships (the
package's extension exports the C functions too), called so that the slow calls run
without the GIL.

The package's Python bindings hold the GIL while they build a vocabulary's view (the
token trie and the slices' tries, `LLTokenizer(...)`): 1.5 s for gemma3's 262k tokens,
in which every other thread of the server (the event loop, the scheduler, every guest)
stood still, at the first constrained request after a model loaded. Through the C API that
build, a grammar's compile and a mask run in llguidance's code alone (ctypes lets the GIL
go for a `CDLL` call); the short calls (taking a token, the forced tokens, a copy) keep it
(`PyDLL`), where giving it up and taking it back would cost more than the call.

The structures are llguidance.h's, for the version pyproject.toml pins; `_check_layout`
compares them with the library's own defaults when the library loads, and refuses a
library whose layout differs (InternalError) rather than pass it wrong fields.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import llguidance
import numpy as np

from realm.errors import InternalError

_size_t = ctypes.c_size_t
_u32_p = ctypes.POINTER(ctypes.c_uint32)

NO_TOKEN = 0xFFFF_FFFF
"""llguidance's INVALID_TOKEN: no end token."""
TOKENIZE = ctypes.CFUNCTYPE(_size_t, ctypes.c_void_p, ctypes.c_void_p, _size_t, _u32_p, _size_t)
"""LlgTokenizeFn: (user data, bytes, length, tokens out, room) -> the number of tokens."""


class _TokenizerInit(ctypes.Structure):
    """LlgTokenizerInitV2."""

    _fields_ = [
        ("struct_size", _size_t),
        ("vocab_size", ctypes.c_uint32),
        ("tok_eos", ctypes.c_uint32),
        ("token_lens", _u32_p),
        ("token_bytes", ctypes.c_void_p),
        ("tokenizer_json", ctypes.c_char_p),
        ("tokenize_assumes_string", ctypes.c_bool),
        ("tokenize_fn", TOKENIZE),
        ("use_approximate_greedy_tokenize_fn", ctypes.c_bool),
        ("tokenize_user_data", ctypes.c_void_p),
        ("slices", ctypes.POINTER(ctypes.c_char_p)),
        ("tok_eos_extra", _u32_p),
        ("tok_eos_extra_count", ctypes.c_uint32),
    ]


class _ParserLimits(ctypes.Structure):
    """LlgParserLimits."""

    _fields_ = [
        ("max_items_in_row", _size_t),
        ("initial_lexer_fuel", ctypes.c_uint64),
        ("step_lexer_fuel", ctypes.c_uint64),
        ("step_max_items", _size_t),
        ("max_lexer_states", _size_t),
        ("max_grammar_size", _size_t),
        ("precompute_large_lexemes", ctypes.c_bool),
        ("verbose_errors", ctypes.c_bool),
    ]


class _ConstraintInit(ctypes.Structure):
    """LlgConstraintInit."""

    _fields_ = [
        ("tokenizer", ctypes.c_void_p),
        ("log_buffer_level", ctypes.c_uint32),
        ("log_stderr_level", ctypes.c_uint32),
        ("ff_tokens_ok", ctypes.c_bool),
        ("backtrack_ok", ctypes.c_bool),
        ("limits", _ParserLimits),
    ]


_DEFAULT_LIMITS = {
    "max_items_in_row": 2000,
    "initial_lexer_fuel": 1_000_000,
    "step_lexer_fuel": 200_000,
    "step_max_items": 50_000,
    "max_lexer_states": 250_000,
    "max_grammar_size": 500_000,
    "precompute_large_lexemes": True,
    "verbose_errors": True,
}
"""llguidance.h's documented defaults, which `llg_constraint_init_set_defaults` must give."""


class _Library:
    """The library's functions: `free` ones without the GIL, `held` ones with it."""

    def __init__(self, path: str) -> None:
        free, held = ctypes.CDLL(path), ctypes.PyDLL(path)
        vp, cp = ctypes.c_void_p, ctypes.c_char_p

        def bind(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> Callable:
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, list(argtypes)
            return function

        i32 = ctypes.c_int32
        self.new_tokenizer = bind(free, "llg_new_tokenizer_v2", vp, ctypes.POINTER(_TokenizerInit), cp, _size_t)
        self.free_tokenizer = bind(held, "llg_free_tokenizer", None, vp)
        self.set_defaults = bind(held, "llg_constraint_init_set_defaults", None, vp, vp)
        self.new_matcher = bind(free, "llg_new_matcher", vp, ctypes.POINTER(_ConstraintInit), cp, cp)
        self.compute_mask_into = bind(free, "llg_matcher_compute_mask_into", i32, vp, vp, _size_t)
        self.validate_tokens = bind(held, "llg_matcher_validate_tokens", i32, vp, vp, _size_t)
        self.consume_tokens = bind(held, "llg_matcher_consume_tokens", i32, vp, vp, _size_t)
        self.rollback = bind(held, "llg_matcher_rollback", i32, vp, _size_t)
        self.reset = bind(held, "llg_matcher_reset", i32, vp)
        self.compute_ff_tokens = bind(held, "llg_matcher_compute_ff_tokens", i32, vp, vp, _size_t)
        self.is_accepting = bind(held, "llg_matcher_is_accepting", ctypes.c_bool, vp)
        self.is_stopped = bind(held, "llg_matcher_is_stopped", ctypes.c_bool, vp)
        self.is_error = bind(held, "llg_matcher_is_error", ctypes.c_bool, vp)
        self.get_error = bind(held, "llg_matcher_get_error", cp, vp)
        self.clone_matcher = bind(held, "llg_clone_matcher", vp, vp)
        self.free_matcher = bind(held, "llg_free_matcher", None, vp)
        self.version = bind(held, "llg_get_version", cp)()


@functools.cache
def library() -> _Library:
    """llguidance's extension, as a C library (loaded once, its layout checked)."""
    paths = sorted(Path(llguidance.__file__).parent.glob("_lib*.so"))
    if not paths:
        raise InternalError(f"llguidance's library is not in {Path(llguidance.__file__).parent}")
    lib = _Library(str(paths[0]))
    _check_layout(lib)
    return lib


def _check_layout(lib: _Library) -> None:
    """The library's LlgConstraintInit defaults, written into a larger buffer: a field
    moved or added shows as a wrong default or a byte written past our structure."""
    room = ctypes.sizeof(_ConstraintInit)
    buffer = (ctypes.c_ubyte * (room + 64))(*([0xA5] * (room + 64)))
    lib.set_defaults(ctypes.addressof(buffer), None)
    init = _ConstraintInit.from_buffer(buffer)
    got = {name: getattr(init.limits, name) for name in _DEFAULT_LIMITS}
    if got != _DEFAULT_LIMITS or any(b != 0xA5 for b in bytes(buffer)[room:]):
        raise InternalError(f"llguidance's C structures are not the ones Realm was written for ({lib.version!r})")


# ---------------------------------------------------------------------------- tokenize callback


TOKENIZED_KEPT = 4096
"""Texts whose tokens a view remembers: llguidance tokenizes a grammar's forced text at
every step (often the same few: `": "`, `", "`), and gemma3's tokenizer takes ~25 us."""


class _Tokenizer:
    """A view's tokenize function, held weakly, with the texts it last tokenized."""

    def __init__(self, encode: Callable[[str], list[int]]) -> None:
        self.encode = weakref.WeakMethod(encode)
        self.known: dict[str, list[int]] = {}

    def tokens(self, text: str) -> list[int] | None:
        tokens = self.known.get(text)
        if tokens is None:
            encode = self.encode()
            if encode is None:
                return None
            if len(self.known) >= TOKENIZED_KEPT:
                self.known.clear()
            tokens = self.known[text] = encode(text)
        return tokens


_tokenizers: dict[int, _Tokenizer] = {}
_tokenizers_lock = threading.Lock()
_keys = itertools.count(1)  # never reused: a grammar outliving its view finds no tokenizer


@TOKENIZE
def _tokenize(key: int | None, data: int | None, length: int, out: ctypes._Pointer, room: int) -> int:
    """llguidance asks for the tokens of a piece of text (valid UTF-8: the view is built with
    tokenize_assumes_string). An exception cannot cross into Rust: it is no tokens (then
    llguidance tokenizes greedily), never a crash."""
    try:
        tokenizer = _tokenizers.get(key or 0)
        text = ctypes.string_at(data or 0, length).decode("utf-8", errors="replace")
        tokens = tokenizer.tokens(text) if tokenizer is not None else None
        if tokens is None:
            return 0
        for i, t in enumerate(tokens[:room]):
            out[i] = t
        return len(tokens)
    except Exception:
        return 0


# ---------------------------------------------------------------------------- objects


class VocabularyView:
    """llguidance's view of a vocabulary (its token trie and the slices'): what every
    grammar over it compiles against. Built without the GIL."""

    def __init__(
        self,
        lengths: np.ndarray,
        data: bytes,
        end_tokens: Sequence[int],
        slices: Sequence[str],
        tokenize: Callable[[str], list[int]],
    ) -> None:
        """Token i is `lengths[i]` (uint32) bytes of `data`, after those before it.
        `tokenize` (a bound method, held weakly: the view does not keep its tokenizer
        alive) is what llguidance asks for the canonical tokens of a text."""
        lib = library()
        lens = np.ascontiguousarray(lengths, dtype=np.uint32)
        if int(lens.sum()) != len(data):
            raise InternalError(f"the token lengths add up to {int(lens.sum())} bytes, not {len(data)}")
        ends = np.array(end_tokens[1:], dtype=np.uint32)
        slice_texts = [s.encode() for s in slices]
        slice_ptrs = (ctypes.c_char_p * (len(slice_texts) + 1))(*slice_texts, None)
        with _tokenizers_lock:
            self._key = next(_keys)
            _tokenizers[self._key] = _Tokenizer(tokenize)
        init = _TokenizerInit(
            struct_size=ctypes.sizeof(_TokenizerInit),
            vocab_size=lens.size,
            tok_eos=end_tokens[0] if end_tokens else NO_TOKEN,
            token_lens=lens.ctypes.data_as(_u32_p),
            token_bytes=ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p),
            tokenize_assumes_string=True,
            tokenize_fn=_tokenize,
            tokenize_user_data=self._key,
            slices=slice_ptrs,
            tok_eos_extra=ends.ctypes.data_as(_u32_p) if ends.size else None,
            tok_eos_extra_count=ends.size,
        )
        error = ctypes.create_string_buffer(1024)
        pointer = lib.new_tokenizer(ctypes.byref(init), error, len(error))
        if not pointer:
            _forget_tokenizer(self._key)
            raise InternalError(f"llguidance refused the vocabulary: {error.value.decode(errors='replace')}")
        self.pointer: int = pointer
        self.vocab_size = lens.size
        # a grammar compiled over this view asks for tokens as long as it lives (forced
        # tokens), and keeps the view; once the tokenizer itself is gone, it tokenizes greedily
        self._finalizer = weakref.finalize(self, _free_view, lib, pointer, self._key)


def _free_view(lib: _Library, pointer: int, key: int) -> None:
    lib.free_tokenizer(pointer)
    _forget_tokenizer(key)


def _forget_tokenizer(key: int) -> None:
    with _tokenizers_lock:
        _tokenizers.pop(key, None)


FORCED_ROOM = 256
"""Forced tokens read at a time: a longer forced run is read on at the next step."""


class Matcher:
    """One grammar's state over a view: llguidance's LlgMatcher. Not thread-safe.

    A step calls several of these (take a token, its forced run, the status): each passes
    plain addresses of buffers the matcher keeps, as a few microseconds a call add up."""

    def __init__(self, pointer: int, view: VocabularyView) -> None:
        if not pointer:
            raise InternalError("llguidance made no matcher")
        self._lib = library()
        self._pointer = pointer
        self.view = view  # the grammar's tokenizer callback lives with the view
        self._buffer: np.ndarray | None = None  # tokens in and out, made on first use
        self._buffer_address = 0

    def __del__(self) -> None:
        pointer, self._pointer = getattr(self, "_pointer", 0), 0
        if pointer:
            self._lib.free_matcher(pointer)

    @classmethod
    def compile(cls, view: VocabularyView, grammar: str, limits: dict[str, int | bool]) -> Matcher:
        """`grammar` (llguidance's grammar text) compiled over `view`, without the GIL; a
        grammar that does not compile is a matcher in error (see `error`)."""
        lib = library()
        init = _ConstraintInit()
        lib.set_defaults(ctypes.addressof(init), view.pointer)
        init.log_buffer_level = init.log_stderr_level = 0
        for name, value in limits.items():
            setattr(init.limits, name, value)
        return cls(lib.new_matcher(ctypes.byref(init), b"llguidance", grammar.encode()), view)

    def copy(self) -> Matcher:
        return Matcher(self._lib.clone_matcher(self._pointer), self.view)

    def compute_mask_into(self, address: int, nbytes: int) -> bool:
        """The mask into `nbytes` at `address` (exactly the vocabulary's words), without the GIL."""
        return self._lib.compute_mask_into(self._pointer, address, nbytes) == 0

    def validate_tokens(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, from the first, the grammar allows in turn."""
        held, address = self._staged(tokens)  # held: alive through the call
        return self._lib.validate_tokens(self._pointer, address, len(tokens))

    def consume_tokens(self, tokens: Sequence[int]) -> bool:
        held, address = self._staged(tokens)  # held: alive through the call
        return self._lib.consume_tokens(self._pointer, address, len(tokens)) == 0

    def rollback(self, n: int) -> bool:
        return self._lib.rollback(self._pointer, n) == 0

    def reset(self) -> bool:
        """Back to the grammar's start, keeping what the lexer has learned; False if that
        fails (the matcher in error) or the matcher is already freed (its owner's __del__
        may run after its own, in a cycle the garbage collector frees)."""
        return bool(self._pointer) and self._lib.reset(self._pointer) == 0

    def forced_tokens(self) -> list[int] | None:
        """The tokens the grammar forces next, the first FORCED_ROOM of them; None when
        the matcher fails."""
        out = self._tokens()
        n = self._lib.compute_ff_tokens(self._pointer, self._buffer_address, FORCED_ROOM)
        return None if n < 0 else out[:n].tolist()

    def is_accepting(self) -> bool:
        return self._lib.is_accepting(self._pointer)

    def is_stopped(self) -> bool:
        return self._lib.is_stopped(self._pointer)

    def error(self) -> str | None:
        """What failed, once the matcher is in error; None while it is not."""
        if not self._lib.is_error(self._pointer):
            return None
        message = self._lib.get_error(self._pointer)
        return message.decode(errors="replace") if message else "unknown error"

    def _tokens(self) -> np.ndarray:
        if self._buffer is None:
            self._buffer = np.empty(FORCED_ROOM, dtype=np.uint32)
            self._buffer_address = self._buffer.ctypes.data
        return self._buffer

    def _staged(self, tokens: Sequence[int]) -> tuple[np.ndarray, int]:
        """`tokens` as uint32 and their address: in the matcher's buffer (FORCED_ROOM at
        most), else in an array of their own, which the caller holds through its call."""
        if len(tokens) > FORCED_ROOM:
            many = np.array(tokens, dtype=np.uint32)
            return many, many.ctypes.data
        buffer = self._tokens()
        buffer[: len(tokens)] = tokens
        return buffer, self._buffer_address
