"""Host functions for compute, at every ABI level (docs/ABI.md): sessions and whole forward
steps (level 1), per-layer steps (level 2), matrix products (level 3) and reading decoded
tensors (level 4). Each checks sizes against the guest's buffers and the per-call caps,
copies memory and calls the engine; the engine's work runs where the model's steps run
(`StepRunner.call`: the model's runner thread in a server)."""

from __future__ import annotations

import struct

import numpy as np

from realm.backends.devices import BackendKind
from realm.backends.screened import CANDIDATES
from realm.engine import layer_step
from realm.engine.best_tokens import LAZY_MOST, best_allowed, best_tokens, exact_logits
from realm.engine.grammar import allowed_tokens
from realm.engine.layer_step import LayerStep
from realm.engine.logprobs import token_logprobs
from realm.engine.named_weights import tensor_by_name, tensor_values, weight_by_name
from realm.errors import InvalidArgument, LimitExceeded, Unsupported
from realm.sandbox.host_args import check_cancel, guest_memory, name, non_negative, tokens
from realm.sandbox.host_grammar import steer, step_mask
from realm.sandbox.memory import MAX_TRANSFER, GuestMemory
from realm.sandbox.state import GuestState, HostSession
from realm.sandbox.wasmtime_bridge import StoreContext

MAX_MATMUL_MACS = 1 << 33  # m * k * n of one matmul (about 8.6e9 multiply-adds)

# ---------------------------------------------------------------------------- level 1: forward step


def session_open(st: GuestState, caller: StoreContext, model_id: int, context_length: int) -> int:
    entry = st.model(model_id)
    non_negative(context_length, "context_length")
    return st.open_session(entry, context_length).handle


def session_close(st: GuestState, caller: StoreContext, handle: int) -> int:
    st.session(handle)
    del st.sessions[handle]
    return 0


def _logits_buffer(mem: GuestMemory, s: HostSession, ptr: int, cap: int) -> None:
    vocab = s.session.vocab_size
    if cap < vocab:
        raise InvalidArgument(f"the logits buffer holds {cap} floats; the model has {vocab}")
    mem.address(ptr, vocab * 4, "logits")


def forward(st: GuestState, caller: StoreContext, handle: int, ids: int, n: int, logits: int, cap: int) -> int:
    s = _stepping(st, handle)
    mem = guest_memory(st, caller)
    _logits_buffer(mem, s, logits, cap)
    run = tokens(mem, ids, n, s.session.context_length)
    mask = step_mask(s)
    out = _step(st, s, run, mask)
    steer(s, out, mask)
    return mem.write_floats(logits, out, "logits")


TOP_MAX = CANDIDATES
"""The most tokens one realm_forward_top hands back (the logits the screen computes exactly)."""


def forward_top(
    st: GuestState, caller: StoreContext, handle: int, ids: int, n: int, k: int, top_ids: int, top_logits: int
) -> int:
    """realm_forward, handing back only the k best tokens of the step (engine/best_tokens.py);
    a grammar bound alone is checked lazily for a greedy step."""
    s = _stepping(st, handle)
    if not 1 <= k <= TOP_MAX:
        raise InvalidArgument(f"k must be in 1..{TOP_MAX}, got {k}")
    mem = guest_memory(st, caller)
    mem.address(top_ids, 4 * k, "token ids")
    mem.address(top_logits, 4 * k, "logits")
    run = tokens(mem, ids, n, s.session.context_length)
    lazy = s.grammar if s.mask is None and s.bias is None and k <= LAZY_MOST else None
    mask = None if lazy is not None else step_mask(s)
    out = _step(st, s, run, mask)
    if lazy is not None:
        best, values = best_allowed(out, k, lazy, exact_logits(s.session, out))
    else:
        steer(s, out, mask)
        best, values = best_tokens(out, k)
    mem.write(top_ids, best.tobytes(), "token ids")
    mem.write_floats(top_logits, values, "logits")
    return len(best)


def _stepping(st: GuestState, handle: int) -> HostSession:
    """The session a whole step is asked of, if it may take one now."""
    s = st.session(handle)
    check_cancel(st)
    if s.layer_step is not None:
        raise InvalidArgument("a per-layer step is in progress on this session (finish it with realm_logits)")
    return s


def _step(st: GuestState, s: HostSession, run: list[int], mask: np.ndarray | None) -> np.ndarray:
    """The step of `run` on the session, told what `mask` allows; its row of logits, unmasked."""
    allowed = None if mask is None else allowed_tokens(mask, s.session.vocab_size)
    # the last step's row is a view of its round's logits: let the round's buffer go before
    # the next round makes another (gemma3 at 8 sequences: 8 MiB each)
    s.last_logits = None
    out = st.host.steps.step(s.session, run, st.tenant, allowed)
    # realm_logprobs reports the model's own distribution, not what the guest's steering made of it
    s.last_logits = out.copy() if mask is not None or s.bias is not None else out
    return out


def logprobs(st: GuestState, caller: StoreContext, handle: int, token: int, n_top: int) -> int:
    """The log-probability of `token` (and the n_top most likely tokens) at the session's
    last step, kept for the next realm_emit, which must emit that token."""
    s = st.session(handle)
    call = st.call
    if call is None:
        raise InvalidArgument("realm_logprobs outside of generate")
    if s.last_logits is None:
        raise InvalidArgument(f"session {handle} has no step yet (realm_forward or realm_logits)")
    call.pending_logprobs = token_logprobs(s.last_logits, token, n_top)
    return 0


# ---------------------------------------------------------------------------- level 2: per layer


def embed(st: GuestState, caller: StoreContext, handle: int, ids: int, n: int, x: int, cap: int) -> int:
    s = st.session(handle)
    check_cancel(st)
    if s.layer_step is not None:
        raise InvalidArgument("a per-layer step is already in progress on this session")
    dim = s.entry.model.config.dim
    mem = guest_memory(st, caller)
    chunk = tokens(mem, ids, n, layer_step.MAX_TOKENS)
    if cap < n * dim:
        raise InvalidArgument(f"x holds {cap} floats; {n} tokens need {n * dim}")
    mem.address(x, n * dim * 4, "x")
    step = LayerStep(s.session, chunk, s.entry.model.backend.device)
    hidden = st.host.steps.call(s.session.transformer, step.embed)
    s.layer_step = step
    return mem.write_floats(x, hidden, "x")


def _layer_step(s: HostSession, x_cap: int) -> LayerStep:
    step = s.layer_step
    if step is None:
        raise InvalidArgument("no per-layer step in progress: call realm_embed first")
    if x_cap < step.hidden_size:
        raise InvalidArgument(f"x holds {x_cap} floats; the step needs {step.hidden_size}")
    return step


def forward_layer(st: GuestState, caller: StoreContext, handle: int, layer: int, x: int, cap: int) -> int:
    s = st.session(handle)
    check_cancel(st)
    step = _layer_step(s, cap)
    mem = guest_memory(st, caller)
    xs = mem.read_floats(x, step.hidden_size, "x")
    hidden = st.host.steps.call(s.session.transformer, lambda: step.layer(layer, xs))
    return mem.write_floats(x, hidden, "x")


def logits_of(st: GuestState, caller: StoreContext, handle: int, x: int, x_cap: int, logits: int, cap: int) -> int:
    s = st.session(handle)
    step = _layer_step(s, x_cap)
    mem = guest_memory(st, caller)
    _logits_buffer(mem, s, logits, cap)
    xs = mem.read_floats(x, step.hidden_size, "x")
    out = st.host.steps.call(s.session.transformer, lambda: step.logits(xs))
    s.layer_step = None
    s.last_logits = out.float().cpu().numpy()
    return mem.write_floats(logits, out, "logits")


# ---------------------------------------------------------------------------- level 3: per operation


def _matmul(
    st: GuestState, caller: StoreContext, kind: BackendKind, a: int, b: int, m: int, k: int, n: int, c: int
) -> int:
    backend = st.host.backends.offered(kind)
    for v, what in ((m, "m"), (k, "k"), (n, "n")):
        if v <= 0:
            raise InvalidArgument(f"matmul dimension {what} must be > 0, got {v}")
    if m * k * n > MAX_MATMUL_MACS:
        raise LimitExceeded(f"a {m}x{k} @ {k}x{n} matmul exceeds the per-call limit of {MAX_MATMUL_MACS} multiply-adds")
    mem = guest_memory(st, caller)
    mem.address(c, m * n * 4, "c")
    av = mem.read_floats(a, m * k, "a").view(m, k)
    bv = mem.read_floats(b, k * n, "b").view(k, n)
    mem.write_floats(c, backend.matmul(av, bv), "c")
    return 0


def matmul_cpu(st: GuestState, caller: StoreContext, a: int, b: int, m: int, k: int, n: int, c: int) -> int:
    return _matmul(st, caller, BackendKind.CPU, a, b, m, k, n, c)


def matmul_gpu(st: GuestState, caller: StoreContext, a: int, b: int, m: int, k: int, n: int, c: int) -> int:
    return _matmul(st, caller, BackendKind.GPU, a, b, m, k, n, c)


def matmul_weight(
    st: GuestState, caller: StoreContext, model_id: int, name_ptr: int, name_len: int, x: int, m: int, c: int, cap: int
) -> int:
    entry = st.model(model_id)
    mem = guest_memory(st, caller)
    weight = weight_by_name(entry.model, name(mem, name_ptr, name_len, "tensor name"))
    if m <= 0:
        raise InvalidArgument(f"m must be > 0, got {m}")
    d_in, d_out = weight.in_features, weight.out_features
    if m * max(d_in, d_out) * 4 > MAX_TRANSFER:
        raise LimitExceeded(f"{m} rows exceed the per-call transfer limit of {MAX_TRANSFER} bytes")
    if cap < m * d_out:
        raise InvalidArgument(f"c holds {cap} floats; the product needs {m * d_out}")
    mem.address(c, m * d_out * 4, "c")
    xs = mem.read_floats(x, m * d_in, "x").view(m, d_in).to(entry.model.backend.device)
    mem.write_floats(c, st.host.steps.call(entry.model.transformer, lambda: weight(xs)), "c")
    return d_out


# ---------------------------------------------------------------------------- level 4: naive


def tensor_shape(st: GuestState, caller: StoreContext, model_id: int, name_ptr: int, name_len: int, dims: int) -> int:
    mem = guest_memory(st, caller)
    t = tensor_by_name(st.model(model_id).model, name(mem, name_ptr, name_len, "tensor name"))
    if len(t.shape) > 4:
        raise Unsupported(f"tensor {t.name} has {len(t.shape)} dimensions (at most 4 are described)")
    mem.write(dims, struct.pack(f"<{len(t.shape)}q", *t.shape), "dims")
    return len(t.shape)


def tensor_read(
    st: GuestState,
    caller: StoreContext,
    model_id: int,
    name_ptr: int,
    name_len: int,
    offset: int,
    count: int,
    out: int,
) -> int:
    mem = guest_memory(st, caller)
    t = tensor_by_name(st.model(model_id).model, name(mem, name_ptr, name_len, "tensor name"))
    if count < 0 or count * 4 > MAX_TRANSFER:
        raise InvalidArgument(f"count must be in 0..{MAX_TRANSFER // 4}, got {count}")
    return mem.write_floats(out, tensor_values(t, offset, count), "out")
