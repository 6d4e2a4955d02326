"""Host functions for programmable decoding: the host's grammar engine (compile a constraint,
the mask of its current state, take tokens, the tokens it forces, roll back) and per-step
control of a session (a grammar, a mask or a logit bias applied to its next logits; backing
up). docs/ABI.md, "Programmable decoding", is the contract.

What a guest steers crosses once per step as data in its memory: a bitmask (one bit per
token) or a short list of biases, never a host call per token. The host applies it to the
session's own row of logits when the batched step hands them back, on the guest's thread,
so one tenant's constraint never slows another's row. The step itself only learns which
tokens the mask allows, to compute exactly the best of them (a screened output projection
is otherwise exact only at the row's own favourites).
"""

from __future__ import annotations

import json

import numpy as np

from realm.engine.grammar import MAX_CONSTRAINT_BYTES, apply_mask, lltokenizer, words
from realm.errors import InvalidArgument
from realm.sandbox.host_args import guest_memory, non_negative, utf8
from realm.sandbox.memory import MAX_TRANSFER
from realm.sandbox.state import GuestState, HostSession
from realm.sandbox.wasmtime_bridge import StoreContext

MAX_CONSUME = 4096
"""Tokens one realm_grammar_consume may take."""

# ---------------------------------------------------------------------------- the grammar engine


def grammar_compile(st: GuestState, caller: StoreContext, model_id: int, ptr: int, length: int) -> int:
    model = st.model(model_id).model
    if length > MAX_CONSTRAINT_BYTES:
        raise InvalidArgument(f"the constraint is {length} bytes; the most is {MAX_CONSTRAINT_BYTES}")
    text = utf8(guest_memory(st, caller).read(ptr, length, "constraint"), "the constraint")
    try:
        constraint = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InvalidArgument(f"the constraint is not valid JSON: {e}") from None
    # llguidance's view of the model's vocabulary is built once for every tenant (1.5 s on
    # gemma3): host work, not charged to the guest that happens to ask first
    st.cpu.waiting(lambda: lltokenizer(model.tokenizer, model.config.vocab_size))
    grammar = st.host.grammars.compile(st.tenant, model.tokenizer, model.config.vocab_size, constraint)
    return st.add_grammar(grammar)


def grammar_free(st: GuestState, caller: StoreContext, handle: int) -> int:
    g = st.grammar(handle)
    del st.grammars[handle]
    for s in st.sessions.values():
        if s.grammar is g:
            s.grammar = None
    return 0


def grammar_mask(st: GuestState, caller: StoreContext, handle: int, out: int, cap: int) -> int:
    g = st.grammar(handle)
    if cap >= g.words:
        guest_memory(st, caller).write(out, g.mask().tobytes(), "mask")
    return g.words


def grammar_consume(st: GuestState, caller: StoreContext, handle: int, ptr: int, n: int) -> int:
    g = st.grammar(handle)
    if not 0 <= n <= MAX_CONSUME:
        raise InvalidArgument(f"n must be in 0..{MAX_CONSUME}, got {n}")
    ids = guest_memory(st, caller).read_array(ptr, n, np.int32, "tokens").tolist() if n else []
    return g.consume(ids)


def grammar_forced(st: GuestState, caller: StoreContext, handle: int, out: int, cap: int) -> int:
    forced = st.grammar(handle).forced()
    if len(forced) <= cap:
        guest_memory(st, caller).write(out, np.asarray(forced, dtype="<i4").tobytes(), "tokens")
    return len(forced)


def grammar_rollback(st: GuestState, caller: StoreContext, handle: int, n: int) -> int:
    st.grammar(handle).rollback(non_negative(n, "n"))
    return 0


# ---------------------------------------------------------------------------- per-step control of a session


def session_set_grammar(st: GuestState, caller: StoreContext, handle: int, grammar: int) -> int:
    s = st.session(handle)
    g = st.grammar(grammar) if grammar else None
    if g is not None and g.vocab_size != s.session.vocab_size:
        raise InvalidArgument(
            f"grammar {grammar} is over {g.vocab_size} tokens; the session's model has {s.session.vocab_size}"
        )
    s.grammar = g
    return 0


def session_set_mask(st: GuestState, caller: StoreContext, handle: int, ptr: int, n_words: int) -> int:
    s = st.session(handle)
    need = words(s.session.vocab_size)
    if n_words == 0:
        s.mask = None
        return 0
    if n_words != need:
        raise InvalidArgument(f"the mask has {n_words} words; the model's {s.session.vocab_size} tokens need {need}")
    s.mask = guest_memory(st, caller).read_array(ptr, n_words, np.uint32, "mask").copy()
    return 0


def session_set_bias(st: GuestState, caller: StoreContext, handle: int, ids: int, biases: int, n: int) -> int:
    s = st.session(handle)
    vocab = s.session.vocab_size
    if n == 0:
        s.bias = None
        return 0
    if not 0 < n <= vocab or n * 8 > MAX_TRANSFER:
        raise InvalidArgument(f"n must be in 0..{vocab}, got {n}")
    mem = guest_memory(st, caller)
    tokens = mem.read_array(ids, n, np.int32, "tokens").astype(np.int64)
    values = mem.read_array(biases, n, np.float32, "biases").copy()
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise InvalidArgument(f"a token id is outside the vocabulary (size {vocab})")
    if np.isnan(values).any() or (values == np.inf).any():
        raise InvalidArgument("a bias is NaN or +inf (-inf bans a token)")
    s.bias = (tokens, values)
    return 0


def session_backup(st: GuestState, caller: StoreContext, handle: int, n: int) -> int:
    s = st.session(handle)
    held = len(s.session.tokens)
    if s.layer_step is not None:
        raise InvalidArgument("a per-layer step is in progress on this session (finish it with realm_logits)")
    if not 0 <= n <= held:
        raise InvalidArgument(f"cannot back up {n} tokens: the session holds {held}")
    s.session.rewind(held - n)
    return held - n


def step_mask(s: HostSession) -> np.ndarray | None:
    """What this session's next step allows, as a bitmask (words,) uint32: its one-step
    mask, its grammar's and its bias's bans (-inf) together; None if nothing is forbidden.
    Taken before the step, which then computes exactly the best tokens the mask leaves
    (Session.chunk); `steer` applies it to the logits the step hands back."""
    parts = []
    if s.mask is not None:
        parts.append(s.mask)
    if s.grammar is not None:
        parts.append(s.grammar.mask())  # its reused buffer: only read below, into a copy
    if s.bias is not None and np.isneginf(s.bias[1]).any():
        banned = s.bias[0][np.isneginf(s.bias[1])]
        ban = np.full(words(s.session.vocab_size), 0xFFFFFFFF, np.uint32)
        np.bitwise_and.at(ban, banned >> 5, ~(np.uint32(1) << (banned & 31).astype(np.uint32)))
        parts.append(ban)
    if not parts:
        return None
    mask = parts[0].copy()
    for part in parts[1:]:
        mask &= part
    return mask


def steer(s: HostSession, logits: np.ndarray, mask: np.ndarray | None) -> None:
    """What the guest set for this session's step, applied to its row of logits (vocab,)
    float32 in place: `step_mask`'s mask (-inf for every token it forbids), then the bias.
    The one-step mask and the bias are then cleared."""
    if mask is not None:
        apply_mask(mask, logits)
    if s.bias is not None:
        tokens, values = s.bias
        np.add.at(logits, tokens, values)
    s.mask = s.bias = None
