"""The Realm guest ABI, version 1.1: every host function, from one table.

Each entry names an import of module `env`, the kinds of its parameters and its
implementation. The linkers for wasm32 guests (pointers and sizes are i32) and for wasm64
guests (memory64: pointers and sizes are i64) are both built from this table, and the
import check of a guest module reads it too. docs/ABI.md documents each function.

A host function is a thin adapter: it checks its arguments (every pointer and length
against the guest's current memory, every size against a cap), copies memory and calls
the engine. It never lets a Python exception reach Wasmtime: a `RealmError` becomes its
`abi_code`, anything else is logged and becomes InternalError's code. Every call is
bounded by itself (epoch deadlines do not interrupt host calls).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import struct
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from wasmtime import _ffi as wasmtime_ffi

from realm.backends.devices import BackendKind
from realm.engine.model_store import ARCHITECTURE_CODES, StoredModel
from realm.engine.session import PREFILL_CHUNK
from realm.errors import (
    Cancelled,
    InternalError,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    RealmError,
    Unsupported,
)
from realm.models import prompt as prompt_rule
from realm.models.quants import dequantize
from realm.sandbox import state as guest_state
from realm.sandbox.memory import MAX_TRANSFER, GuestMemory, caller_context
from realm.sandbox.state import GuestState

log = logging.getLogger("realm.guest")

ABI_MAJOR = 1
ABI_MINOR = 1
ABI_VERSION = (ABI_MAJOR << 16) | ABI_MINOR

TOKENIZE_ADD_BOS = 1
TOKENIZE_PARSE_SPECIAL = 2
FINISH_REASONS = {0: "stop", 1: "length"}
LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}

MAX_TEXT = 4 * 1024 * 1024  # bytes of text one tokenize / template / log call may pass
MAX_LOG = 4096  # bytes of one log message kept
MAX_EMIT = 1024 * 1024  # bytes of text one realm_emit may pass
MAX_NAME = 256  # bytes of a model or tensor name
MAX_MATMUL_MACS = 1 << 33  # m * k * n of one matmul (about 8.6e9 multiply-adds)
MODEL_INFO = struct.Struct("<II32sIIIIII")  # realm_model_info, 64 bytes
NO_ID = 0xFFFFFFFF
CANCEL_GRACE_S = 1.0  # guest time left to a guest told that its caller went away


@dataclass(frozen=True)
class HostFunction:
    name: str
    params: tuple[str, ...]  # "ptr" / "size" (i32 in wasm32, i64 in wasm64), "i32", "i64", "f32"
    impl: Callable[..., int]  # impl(state, caller, *args) -> int (>= 0 result, < 0 error code)


# ---------------------------------------------------------------------------- helpers


def _mem(st: GuestState, caller: Any) -> GuestMemory:
    if st.memory is None:
        raise InternalError("the guest's memory is not available")
    return GuestMemory(st.memory, caller)


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _write_sized(mem: GuestMemory, out: int, cap: int, data: bytes, what: str) -> int:
    """The size convention: always return the size; write only if it fits in cap."""
    if len(data) > MAX_TRANSFER:
        raise LimitExceeded(f"{what} of {len(data)} bytes exceeds the per-call limit of {MAX_TRANSFER} bytes")
    if len(data) <= cap:
        mem.write(out, data, what)
    return len(data)


def _positive(value: int, what: str, limit: int | None = None) -> int:
    if value < 0:
        raise InvalidArgument(f"{what} must be >= 0, got {value}")
    if limit is not None and value > limit:
        raise LimitExceeded(f"{what} of {value} exceeds the limit of {limit}")
    return value


def _check_cancel(st: GuestState) -> None:
    call = st.call
    if call is not None and call.cancel is not None and call.cancel.is_set():
        raise Cancelled("the caller went away: stop generating and return")


def _write_info(mem: GuestMemory, ptr: int, entry: StoredModel) -> None:
    model = entry.model
    cfg, tok = model.config, model.tokenizer
    packed = MODEL_INFO.pack(
        entry.id,
        ARCHITECTURE_CODES.get(cfg.architecture, 0),
        entry.digest,
        cfg.vocab_size,
        cfg.context_length,
        cfg.n_layers,
        cfg.dim,
        NO_ID if tok.bos_id is None else tok.bos_id,
        NO_ID if tok.eos_id is None else tok.eos_id,
    )
    mem.write(ptr, packed, "realm_model_info")


def _tokens(mem: GuestMemory, ptr: int, n: int, limit: int) -> list[int]:
    if n <= 0:
        raise InvalidArgument(f"a step needs at least one token, got n = {n}")
    if n > limit:
        raise LimitExceeded(f"{n} tokens in one call exceed the limit of {limit}")
    return mem.read_array(ptr, n, np.int32, "tokens").tolist()


def _name(mem: GuestMemory, ptr: int, length: int, what: str) -> str:
    if length > MAX_NAME:
        raise InvalidArgument(f"{what} of {length} bytes is longer than {MAX_NAME}")
    return _utf8(mem.read(ptr, length, what), what)


# ---------------------------------------------------------------------------- version, backend, log


def abi_version(st: GuestState, caller: Any) -> int:
    return ABI_VERSION


def get_backend_type(st: GuestState, caller: Any) -> int:
    return int(st.runtime.backends.active.kind)


def log_message(st: GuestState, caller: Any, level: int, ptr: int, length: int) -> int:
    mem = _mem(st, caller)
    mem.address(ptr, length, "log message")  # the whole message must be guest memory
    text = mem.read(ptr, min(length, MAX_LOG), "log message").decode("utf-8", "replace")
    if level == 3:
        st.last_error = text
    call = st.call
    if call is not None:
        call.logs += 1
        if call.logs > st.limits.max_log_messages:
            return 0  # quietly dropped: a chatty guest must not flood the host's log
    log.log(LOG_LEVELS.get(level, logging.INFO), "[%s/%s] %s", st.tenant, st.name, text)
    return 0


# ---------------------------------------------------------------------------- request and output


def request_read(st: GuestState, caller: Any, buf: int, cap: int) -> int:
    if st.call is None:
        raise InvalidArgument("there is no request outside of generate")
    return _write_sized(_mem(st, caller), buf, cap, st.call.payload, "request")


def emit(st: GuestState, caller: Any, token: int, ptr: int, length: int) -> int:
    call = st.call
    if call is None:
        raise InvalidArgument("realm_emit outside of generate")
    _check_cancel(st)
    if length > MAX_EMIT:
        raise LimitExceeded(f"one emit of {length} bytes exceeds the limit of {MAX_EMIT}")
    text = _mem(st, caller).read(ptr, length, "emitted text").decode("utf-8", "replace")
    if token >= 0:
        call.tokens.append(token)
    if text:
        call.text.append(text)
    if call.on_token is not None:
        call.on_token(token, text)
    return 0


def finish(st: GuestState, caller: Any, reason: int, prompt_tokens: int, completion_tokens: int) -> int:
    if st.call is None:
        raise InvalidArgument("realm_finish outside of generate")
    if reason not in FINISH_REASONS:
        raise InvalidArgument(f"unknown finish reason {reason} (0 stop, 1 length)")
    _positive(prompt_tokens, "prompt_tokens")
    _positive(completion_tokens, "completion_tokens")
    st.call.finish = (reason, prompt_tokens, completion_tokens)
    return 0


# ---------------------------------------------------------------------------- model identity


def store_model(st: GuestState, caller: Any, ptr: int, length: int, info: int) -> int:
    mem = _mem(st, caller)
    mem.address(info, MODEL_INFO.size, "realm_model_info")
    entry = st.runtime.models.store_bytes(mem.view(ptr, length, "GGUF bytes"), allowed=st.allowed)
    st.hold(entry)
    _write_info(mem, info, entry)
    return entry.id


def store_model_by_name(st: GuestState, caller: Any, ptr: int, length: int, info: int) -> int:
    mem = _mem(st, caller)
    mem.address(info, MODEL_INFO.size, "realm_model_info")
    entry = st.runtime.models.by_name(_name(mem, ptr, length, "model name"), allowed=st.allowed)
    st.hold(entry)
    _write_info(mem, info, entry)
    return entry.id


def validate_model_id(st: GuestState, caller: Any, model_id: int, sha_ptr: int) -> int:
    digest = _mem(st, caller).read(sha_ptr, 32, "sha256")
    st.model(model_id)  # held by this guest?
    st.runtime.models.validate(model_id, digest, allowed=st.allowed)
    return 0


def get_model_info(st: GuestState, caller: Any, model_id: int, out: int, cap: int) -> int:
    data = json.dumps(st.model(model_id).info(), sort_keys=True).encode()
    return _write_sized(_mem(st, caller), out, cap, data, "model info")


def release_model(st: GuestState, caller: Any, model_id: int) -> int:
    for handle, s in list(st.sessions.items()):
        if s.entry.id == model_id:
            del st.sessions[handle]
    st.release(model_id)
    return 0


# ---------------------------------------------------------------------------- tokenizer, template


def tokenize(st: GuestState, caller: Any, model_id: int, ptr: int, length: int, flags: int, out: int, cap: int) -> int:
    tok = st.model(model_id).model.tokenizer
    if flags & ~(TOKENIZE_ADD_BOS | TOKENIZE_PARSE_SPECIAL):
        raise InvalidArgument(f"unknown tokenize flags {flags:#x}")
    if length > MAX_TEXT:
        raise LimitExceeded(f"text of {length} bytes exceeds the tokenize limit of {MAX_TEXT}")
    mem = _mem(st, caller)
    raw = mem.read(ptr, length, "text")
    key = ("tokenize", model_id, flags, raw)
    cache = st.call.cache if st.call is not None else {}
    ids = cache.get("tokenize", (None, None))
    if ids[0] != key:
        text = _utf8(raw, "text")
        add_bos, special = bool(flags & TOKENIZE_ADD_BOS), bool(flags & TOKENIZE_PARSE_SPECIAL)
        ids = (key, prompt_rule.encode(tok, text, add_bos=add_bos, parse_special=special))
        cache["tokenize"] = ids
    tokens = ids[1]
    if len(tokens) <= cap:
        mem.write(out, np.asarray(tokens, dtype="<i4").tobytes(), "tokens")
    return len(tokens)


def token_bytes(st: GuestState, caller: Any, model_id: int, token: int, out: int, cap: int) -> int:
    data = st.model(model_id).model.tokenizer.token_bytes(token)
    return _write_sized(_mem(st, caller), out, cap, data, "token bytes")


TOKEN_END = 1  # a vocabulary flag: the token ends generation


def vocab(st: GuestState, caller: Any, model_id: int, out: int, cap: int) -> int:
    return _write_sized(_mem(st, caller), out, cap, _vocab_table(st.model(model_id).model.tokenizer), "the vocabulary")


_vocab_tables: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def _vocab_table(tok: Any) -> bytes:
    """u32 n, u32 offsets[n + 1], u8 flags[n], then every token's bytes (docs/ABI.md);
    built once per tokenizer."""
    table = _vocab_tables.get(tok)
    if table is None:
        pieces = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        offsets = np.zeros(len(pieces) + 1, dtype="<u4")
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        flags = np.zeros(len(pieces), dtype=np.uint8)
        flags[sorted(tok.eot_ids)] = TOKEN_END
        table = struct.pack("<I", len(pieces)) + offsets.tobytes() + flags.tobytes() + b"".join(pieces)
        _vocab_tables[tok] = table
    return table


def token_is_end(st: GuestState, caller: Any, model_id: int, token: int) -> int:
    tok = st.model(model_id).model.tokenizer
    if not 0 <= token < tok.vocab_size:
        raise InvalidArgument(f"token id {token} is outside the vocabulary (size {tok.vocab_size})")
    return 1 if token in tok.eot_ids else 0


def chat_template(st: GuestState, caller: Any, model_id: int, ptr: int, length: int, out: int, cap: int) -> int:
    model = st.model(model_id).model
    if model.chat_template is None:
        raise Unsupported(f"model {model.name} has no chat template: send a plain prompt")
    if length > MAX_TEXT:
        raise LimitExceeded(f"messages of {length} bytes exceed the limit of {MAX_TEXT}")
    mem = _mem(st, caller)
    raw = mem.read(ptr, length, "messages")
    key = ("template", model_id, raw)
    cache = st.call.cache if st.call is not None else {}
    hit = cache.get("template", (None, None))
    if hit[0] != key:
        try:
            messages = json.loads(_utf8(raw, "messages"))
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"messages are not valid JSON: {e}") from None
        hit = (key, model.chat_template.render(messages).encode("utf-8"))
        cache["template"] = hit
    return _write_sized(mem, out, cap, hit[1], "rendered prompt")


# ---------------------------------------------------------------------------- level 1: forward step


def session_open(st: GuestState, caller: Any, model_id: int, context_length: int) -> int:
    entry = st.model(model_id)
    _positive(context_length, "context_length")
    return st.open_session(entry, context_length).handle


def session_close(st: GuestState, caller: Any, handle: int) -> int:
    st.session(handle)
    del st.sessions[handle]
    return 0


def forward(st: GuestState, caller: Any, handle: int, tokens: int, n: int, logits: int, cap: int) -> int:
    s = st.session(handle)
    _check_cancel(st)
    if s.pending is not None:
        raise InvalidArgument("a per-layer step is in progress on this session (finish it with realm_logits)")
    vocab = s.session.vocab_size
    if cap < vocab:
        raise InvalidArgument(f"the logits buffer holds {cap} floats; the model has {vocab}")
    mem = _mem(st, caller)
    mem.address(logits, vocab * 4, "logits")
    ids = _tokens(mem, tokens, n, s.session.context_length)
    out = st.runtime.steps.step(s.session, ids, st.tenant)
    return mem.write_floats(logits, out, "logits")


# ---------------------------------------------------------------------------- level 2: per layer


def embed(st: GuestState, caller: Any, handle: int, tokens: int, n: int, x: int, cap: int) -> int:
    s = st.session(handle)
    _check_cancel(st)
    if s.pending is not None:
        raise InvalidArgument("a per-layer step is already in progress on this session")
    dim = s.entry.model.config.dim
    mem = _mem(st, caller)
    ids = _tokens(mem, tokens, n, PREFILL_CHUNK)
    if cap < n * dim:
        raise InvalidArgument(f"x holds {cap} floats; {n} tokens need {n * dim}")
    mem.address(x, n * dim * 4, "x")
    chunk = s.session.chunk(ids)
    hidden = s.entry.model.transformer.embed([chunk])
    s.pending = chunk
    return mem.write_floats(x, hidden, "x")


def _pending(s: Any, x_cap: int) -> tuple[Any, int]:
    chunk = s.pending
    if chunk is None:
        raise InvalidArgument("no per-layer step in progress: call realm_embed first")
    count = len(chunk.tokens) * s.entry.model.config.dim
    if x_cap < count:
        raise InvalidArgument(f"x holds {x_cap} floats; the step needs {count}")
    return chunk, count


def forward_layer(st: GuestState, caller: Any, handle: int, layer: int, x: int, cap: int) -> int:
    s = st.session(handle)
    _check_cancel(st)
    chunk, count = _pending(s, cap)
    transformer = s.entry.model.transformer
    if not 0 <= layer < transformer.config.n_layers:
        raise InvalidArgument(f"layer {layer} is outside 0..{transformer.config.n_layers - 1}")
    mem = _mem(st, caller)
    hidden = mem.read_floats(x, count, "x").view(len(chunk.tokens), -1).to(s.entry.model.backend.device)
    out = transformer.layer(layer, hidden, [chunk])
    return mem.write_floats(x, out, "x")


def logits_of(st: GuestState, caller: Any, handle: int, x: int, x_cap: int, logits: int, cap: int) -> int:
    s = st.session(handle)
    chunk, count = _pending(s, x_cap)
    vocab = s.session.vocab_size
    if cap < vocab:
        raise InvalidArgument(f"the logits buffer holds {cap} floats; the model has {vocab}")
    mem = _mem(st, caller)
    mem.address(logits, vocab * 4, "logits")
    hidden = mem.read_floats(x, count, "x").view(len(chunk.tokens), -1).to(s.entry.model.backend.device)
    s.entry.model.transformer.logits(hidden, [chunk])
    s.session.commit(chunk)
    s.pending = None
    return mem.write_floats(logits, chunk.logits[-1], "logits")


# ---------------------------------------------------------------------------- level 3: per operation


def _matmul(st: GuestState, caller: Any, kind: BackendKind, a: int, b: int, m: int, k: int, n: int, c: int) -> int:
    backend = st.runtime.backends.offered(kind)
    for v, what in ((m, "m"), (k, "k"), (n, "n")):
        if v <= 0:
            raise InvalidArgument(f"matmul dimension {what} must be > 0, got {v}")
    if m * k * n > MAX_MATMUL_MACS:
        raise LimitExceeded(f"a {m}x{k} @ {k}x{n} matmul exceeds the per-call limit of {MAX_MATMUL_MACS} multiply-adds")
    mem = _mem(st, caller)
    mem.address(c, m * n * 4, "c")
    av = mem.read_floats(a, m * k, "a").view(m, k)
    bv = mem.read_floats(b, k * n, "b").view(k, n)
    out = backend.matmul(av, bv)
    mem.write_floats(c, out, "c")
    return 0


def matmul_cpu(st: GuestState, caller: Any, a: int, b: int, m: int, k: int, n: int, c: int) -> int:
    return _matmul(st, caller, BackendKind.CPU, a, b, m, k, n, c)


def matmul_gpu(st: GuestState, caller: Any, a: int, b: int, m: int, k: int, n: int, c: int) -> int:
    return _matmul(st, caller, BackendKind.GPU, a, b, m, k, n, c)


def _host_weight(entry: StoredModel, name: str) -> tuple[Any, int, int]:
    """A weight the host holds, by GGUF tensor name: (Linear, first output row, end row).

    q/k/v and gate/up are packed fused on the host; their GGUF names give a slice of the
    fused product (the same numbers the forward pass computes). The fused weights are
    also reachable as blk.N.attn_qkv.weight and blk.N.ffn_gate_up.weight."""
    model = entry.model
    cfg, w = model.config, model.transformer.weights
    if name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in model.gguf.tensors):
        return w.output, 0, w.output.out_features
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        i = int(parts[1])
        if i < cfg.n_layers:
            layer = w.layers[i]
            n_q, n_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            table = {
                "attn_q": (layer.qkv, 0, n_q),
                "attn_k": (layer.qkv, n_q, n_q + n_kv),
                "attn_v": (layer.qkv, n_q + n_kv, n_q + 2 * n_kv),
                "attn_qkv": (layer.qkv, 0, n_q + 2 * n_kv),
                "attn_output": (layer.attn_out, 0, layer.attn_out.out_features),
                "ffn_gate": (layer.gate_up, 0, cfg.ffn_dim),
                "ffn_up": (layer.gate_up, cfg.ffn_dim, 2 * cfg.ffn_dim),
                "ffn_gate_up": (layer.gate_up, 0, 2 * cfg.ffn_dim),
                "ffn_down": (layer.down, 0, layer.down.out_features),
            }
            if parts[2] in table:
                return table[parts[2]]
    if name in model.gguf.tensors:
        raise Unsupported(f"tensor {name!r} is not a matrix the host multiplies with (read it with realm_tensor_read)")
    raise NotFound(f"model {model.name} has no tensor {name!r}")


def matmul_weight(
    st: GuestState, caller: Any, model_id: int, name_ptr: int, name_len: int, x: int, m: int, c: int, cap: int
) -> int:
    entry = st.model(model_id)
    mem = _mem(st, caller)
    linear, lo, hi = _host_weight(entry, _name(mem, name_ptr, name_len, "tensor name"))
    if m <= 0:
        raise InvalidArgument(f"m must be > 0, got {m}")
    d_in, d_out = linear.in_features, hi - lo
    if m * max(d_in, d_out) * 4 > MAX_TRANSFER:
        raise LimitExceeded(f"{m} rows exceed the per-call transfer limit of {MAX_TRANSFER} bytes")
    if cap < m * d_out:
        raise InvalidArgument(f"c holds {cap} floats; the product needs {m * d_out}")
    mem.address(c, m * d_out * 4, "c")
    xs = mem.read_floats(x, m * d_in, "x").view(m, d_in).to(entry.model.backend.device)
    with torch.inference_mode():
        out = linear(xs)
    if lo or hi != out.shape[1]:
        out = out[:, lo:hi]
    mem.write_floats(c, out, "c")
    return d_out


# ---------------------------------------------------------------------------- level 4: naive


def _tensor(st: GuestState, caller: Any, model_id: int, name_ptr: int, name_len: int) -> Any:
    entry = st.model(model_id)
    name = _name(_mem(st, caller), name_ptr, name_len, "tensor name")
    t = entry.model.gguf.tensors.get(name)
    if t is None:
        raise NotFound(f"model {entry.model.name} has no tensor {name!r}")
    return t


def tensor_shape(st: GuestState, caller: Any, model_id: int, name_ptr: int, name_len: int, dims: int) -> int:
    t = _tensor(st, caller, model_id, name_ptr, name_len)
    if len(t.shape) > 4:
        raise Unsupported(f"tensor {t.name} has {len(t.shape)} dimensions (at most 4 are described)")
    _mem(st, caller).write(dims, struct.pack(f"<{len(t.shape)}q", *t.shape), "dims")
    return len(t.shape)


def tensor_read(
    st: GuestState, caller: Any, model_id: int, name_ptr: int, name_len: int, offset: int, count: int, out: int
) -> int:
    t = _tensor(st, caller, model_id, name_ptr, name_len)
    total = math.prod(t.shape)
    if count < 0 or count * 4 > MAX_TRANSFER:
        raise InvalidArgument(f"count must be in 0..{MAX_TRANSFER // 4}, got {count}")
    if not 0 <= offset <= total:
        raise InvalidArgument(f"offset {offset} is outside tensor {t.name} of {total} elements")
    n = min(count, total - offset)
    mem = _mem(st, caller)
    mem.address(out, n * 4, "out")
    if n == 0:
        return 0
    cols = t.shape[-1]
    rows = total // cols
    r0, r1 = offset // cols, -(-(offset + n) // cols)
    raw = t.raw.reshape(rows, -1)[r0:r1]
    values = dequantize(np.ascontiguousarray(raw), t.qtype, (r1 - r0, cols)).reshape(-1)
    start = offset - r0 * cols
    return mem.write_floats(out, values[start : start + n], "out")


# ---------------------------------------------------------------------------- the table

TABLE: tuple[HostFunction, ...] = (
    HostFunction("realm_abi_version", (), abi_version),
    HostFunction("realm_get_backend_type", (), get_backend_type),
    HostFunction("realm_log", ("i32", "ptr", "size"), log_message),
    HostFunction("realm_request_read", ("ptr", "size"), request_read),
    HostFunction("realm_emit", ("i32", "ptr", "size"), emit),
    HostFunction("realm_finish", ("i32", "i32", "i32"), finish),
    HostFunction("realm_store_model", ("ptr", "size", "ptr"), store_model),
    HostFunction("realm_store_model_by_name", ("ptr", "size", "ptr"), store_model_by_name),
    HostFunction("realm_validate_model_id", ("i32", "ptr"), validate_model_id),
    HostFunction("realm_get_model_info", ("i32", "ptr", "size"), get_model_info),
    HostFunction("realm_release_model", ("i32",), release_model),
    HostFunction("realm_tokenize", ("i32", "ptr", "size", "i32", "ptr", "size"), tokenize),
    HostFunction("realm_token_bytes", ("i32", "i32", "ptr", "size"), token_bytes),
    HostFunction("realm_token_is_end", ("i32", "i32"), token_is_end),
    HostFunction("realm_vocab", ("i32", "ptr", "size"), vocab),
    HostFunction("realm_chat_template", ("i32", "ptr", "size", "ptr", "size"), chat_template),
    HostFunction("realm_session_open", ("i32", "i32"), session_open),
    HostFunction("realm_session_close", ("i32",), session_close),
    HostFunction("realm_forward", ("i32", "ptr", "i32", "ptr", "size"), forward),
    HostFunction("realm_embed", ("i32", "ptr", "i32", "ptr", "size"), embed),
    HostFunction("realm_forward_layer", ("i32", "i32", "ptr", "size"), forward_layer),
    HostFunction("realm_logits", ("i32", "ptr", "size", "ptr", "size"), logits_of),
    HostFunction("realm_matmul_cpu", ("ptr", "ptr", "i32", "i32", "i32", "ptr"), matmul_cpu),
    HostFunction("realm_matmul_gpu", ("ptr", "ptr", "i32", "i32", "i32", "ptr"), matmul_gpu),
    HostFunction("realm_matmul_weight", ("i32", "ptr", "size", "ptr", "i32", "ptr", "size"), matmul_weight),
    HostFunction("realm_tensor_shape", ("i32", "ptr", "size", "ptr"), tensor_shape),
    HostFunction("realm_tensor_read", ("i32", "ptr", "size", "i64", "i32", "ptr"), tensor_read),
)

BY_NAME = {f.name: f for f in TABLE}


def wasm_types(fn: HostFunction, memory64: bool) -> tuple[list[str], list[str]]:
    """The import's parameter and result types as Wasm type names ("i32", "i64", "f32")."""
    width = "i64" if memory64 else "i32"
    return [width if k in ("ptr", "size") else k for k in fn.params], ["i32"]


def invoke(fn: HostFunction, st: GuestState, store: Any, args: list[int]) -> int:
    """One host call for the guest `st`: pointers and sizes made unsigned, the wall clock
    checked, the implementation run, every exception turned into an error code. Time spent
    here does not count as the guest's WebAssembly time."""
    entered = time.perf_counter()
    st.guest_seconds += entered - st.resumed_at
    st.host_calls += 1
    try:
        if entered > st.wall_deadline:
            if st.cancelled_at is not None:
                st.fault = f"did not stop within {CANCEL_GRACE_S:g} s of being told that its caller went away"
            else:
                st.fault = f"ran past its wall-clock limit of {st.limits.wall_seconds:g} s"
            raise LimitExceeded(f"the guest {st.fault}")
        for i, kind in enumerate(fn.params):
            if kind == "ptr" or kind == "size":
                args[i] &= st.mask
        return int(fn.impl(st, store, *args))
    except RealmError as e:
        st.last_error = f"{fn.name}: {e}"
        if isinstance(e, Cancelled) and st.cancelled_at is None:  # one more second, then it is stopped
            st.cancelled_at = entered
            st.wall_deadline = min(st.wall_deadline, entered + CANCEL_GRACE_S)
            st.guest_seconds = max(st.guest_seconds, st.limits.guest_seconds - CANCEL_GRACE_S)
        log.debug("[%s/%s] %s -> %s: %s", st.tenant, st.name, fn.name, type(e).__name__, e)
        return e.abi_code
    except Exception as e:  # a fault in Realm itself: the guest gets a code, we get the log
        log.exception("[%s/%s] host function %s failed", st.tenant, st.name, fn.name)
        st.last_error = f"{fn.name}: internal error ({type(e).__name__})"
        return InternalError.abi_code
    finally:
        st.resumed_at = time.perf_counter()


class _Context:
    """A host call's store context, usable wherever wasmtime-py wants a store."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr

    def _context(self) -> Any:
        return self.ptr


def raw_adapter(fn: HostFunction, memory64: bool) -> Callable[[Any, Any, Any, int], int]:
    """The callback Wasmtime calls (its "unchecked" host-function interface: raw values,
    no per-argument conversion objects). Reads the arguments, runs `invoke`, writes the
    i32 result; when the host has decided to stop the guest (a limit), returns a trap so the
    guest stops at once. Nothing can escape it."""
    fields = tuple(
        "i64" if (k in ("ptr", "size") and memory64) or k == "i64" else ("f32" if k == "f32" else "i32")
        for k in fn.params
    )
    internal = InternalError.abi_code

    def callback(env: Any, caller: Any, vals: Any, n_vals: int) -> int:
        try:
            st = guest_state.current()
            if st is None:
                log.error("host function %s called with no guest running on this thread", fn.name)
                vals[0].i32 = internal
                return 0
            args = [getattr(vals[i], f) for i, f in enumerate(fields)]
            vals[0].i32 = invoke(fn, st, _Context(caller_context(caller)), args)
            if st.fault is not None and not st.stopping:
                st.stopping = True
                message = f"guest {st.name} {st.fault}".encode()
                return ctypes.cast(wasmtime_ffi.wasmtime_trap_new(message, len(message)), ctypes.c_void_p).value or 0
            return 0
        except BaseException:  # pragma: no cover - invoke catches everything; this is the last line
            log.exception("host function %s: unexpected failure in its adapter", fn.name)
            try:
                vals[0].i32 = internal
            except Exception:
                pass
            return 0

    callback.__name__ = fn.name
    return callback
