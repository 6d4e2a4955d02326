"""Host functions for models: identity (store, validate, info, release), the tokenizer, the
vocabulary table and the chat template (docs/ABI.md, "Model identity" and "Tokenizer and
chat template")."""

from __future__ import annotations

import json
import struct
import weakref
from typing import Any

import numpy as np

from realm.engine.model_store import ARCHITECTURE_CODES, StoredModel
from realm.errors import InvalidArgument, LimitExceeded, Unsupported
from realm.models import prompt as prompt_rule
from realm.models.tokenizer import Tokenizer
from realm.sandbox.host_args import guest_memory, name, utf8, write_sized
from realm.sandbox.memory import GuestMemory
from realm.sandbox.state import GuestState
from realm.sandbox.wasmtime_bridge import StoreContext

TOKENIZE_ADD_BOS = 1
TOKENIZE_PARSE_SPECIAL = 2
TOKEN_END = 1  # a vocabulary flag: the token ends generation
MAX_TEXT = 4 * 1024 * 1024  # bytes of text one tokenize / template call may pass
MODEL_INFO = struct.Struct("<II32sIIIIII")  # realm_model_info, 64 bytes
NO_ID = 0xFFFFFFFF

# ---------------------------------------------------------------------------- model identity


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


def store_model(st: GuestState, caller: StoreContext, ptr: int, length: int, info: int) -> int:
    mem = guest_memory(st, caller)
    mem.address(info, MODEL_INFO.size, "realm_model_info")
    entry = st.host.models.store_bytes(mem.view(ptr, length, "GGUF bytes"), allowed=st.allowed)
    st.hold(entry)
    _write_info(mem, info, entry)
    return entry.id


def store_model_by_name(st: GuestState, caller: StoreContext, ptr: int, length: int, info: int) -> int:
    mem = guest_memory(st, caller)
    mem.address(info, MODEL_INFO.size, "realm_model_info")
    entry = st.host.models.by_name(name(mem, ptr, length, "model name"), allowed=st.allowed)
    st.hold(entry)
    _write_info(mem, info, entry)
    return entry.id


def validate_model_id(st: GuestState, caller: StoreContext, model_id: int, sha_ptr: int) -> int:
    digest = guest_memory(st, caller).read(sha_ptr, 32, "sha256")
    st.model(model_id)  # held by this guest?
    st.host.models.validate(model_id, digest, allowed=st.allowed)
    return 0


def get_model_info(st: GuestState, caller: StoreContext, model_id: int, out: int, cap: int) -> int:
    data = json.dumps(st.model(model_id).info(), sort_keys=True).encode()
    return write_sized(guest_memory(st, caller), out, cap, data, "model info")


def release_model(st: GuestState, caller: StoreContext, model_id: int) -> int:
    for handle, s in list(st.sessions.items()):
        if s.entry.id == model_id:
            del st.sessions[handle]
    st.release(model_id)
    return 0


# ---------------------------------------------------------------------------- tokenizer, template


def _cached(st: GuestState, kind: str, key: tuple[Any, ...]) -> tuple[dict[str, Any], Any]:
    """The request's cache and its last `kind` result if it was for `key` (else None): the
    default guest asks its size, then its content, with the same arguments."""
    cache = st.call.cache if st.call is not None else {}
    hit = cache.get(kind)
    return cache, (hit[1] if hit is not None and hit[0] == key else None)


def tokenize(
    st: GuestState, caller: StoreContext, model_id: int, ptr: int, length: int, flags: int, out: int, cap: int
) -> int:
    tok = st.model(model_id).model.tokenizer
    if flags & ~(TOKENIZE_ADD_BOS | TOKENIZE_PARSE_SPECIAL):
        raise InvalidArgument(f"unknown tokenize flags {flags:#x}")
    if length > MAX_TEXT:
        raise LimitExceeded(f"text of {length} bytes exceeds the tokenize limit of {MAX_TEXT}")
    mem = guest_memory(st, caller)
    raw = mem.read(ptr, length, "text")
    key = (model_id, flags, raw)
    cache, tokens = _cached(st, "tokenize", key)
    if tokens is None:
        add_bos, special = bool(flags & TOKENIZE_ADD_BOS), bool(flags & TOKENIZE_PARSE_SPECIAL)
        tokens = prompt_rule.encode(tok, utf8(raw, "text"), add_bos=add_bos, parse_special=special)
        cache["tokenize"] = (key, tokens)
    if len(tokens) <= cap:
        mem.write(out, np.asarray(tokens, dtype="<i4").tobytes(), "tokens")
    return len(tokens)


def token_bytes(st: GuestState, caller: StoreContext, model_id: int, token: int, out: int, cap: int) -> int:
    data = st.model(model_id).model.tokenizer.token_bytes(token)
    return write_sized(guest_memory(st, caller), out, cap, data, "token bytes")


def vocab(st: GuestState, caller: StoreContext, model_id: int, out: int, cap: int) -> int:
    table = _vocab_table(st.model(model_id).model.tokenizer)
    return write_sized(guest_memory(st, caller), out, cap, table, "the vocabulary")


_vocab_tables: weakref.WeakKeyDictionary[Tokenizer, bytes] = weakref.WeakKeyDictionary()


def _vocab_table(tok: Tokenizer) -> bytes:
    """u32 n, u32 offsets[n + 1], u8 flags[n], then every token's bytes (docs/ABI.md);
    built once per tokenizer."""
    table = _vocab_tables.get(tok)
    if table is None:
        offsets, pieces = tok.pieces_table()
        flags = np.zeros(tok.vocab_size, dtype=np.uint8)
        flags[sorted(tok.eot_ids)] = TOKEN_END
        table = struct.pack("<I", tok.vocab_size) + offsets.astype("<u4").tobytes() + flags.tobytes() + pieces
        _vocab_tables[tok] = table
    return table


def token_is_end(st: GuestState, caller: StoreContext, model_id: int, token: int) -> int:
    tok = st.model(model_id).model.tokenizer
    if not 0 <= token < tok.vocab_size:
        raise InvalidArgument(f"token id {token} is outside the vocabulary (size {tok.vocab_size})")
    return 1 if token in tok.eot_ids else 0


def chat_template(
    st: GuestState, caller: StoreContext, model_id: int, ptr: int, length: int, out: int, cap: int
) -> int:
    model = st.model(model_id).model
    if model.chat_template is None:
        raise Unsupported(f"model {model.name} has no chat template: send a plain prompt")
    if length > MAX_TEXT:
        raise LimitExceeded(f"messages of {length} bytes exceed the limit of {MAX_TEXT}")
    mem = guest_memory(st, caller)
    raw = mem.read(ptr, length, "messages")
    key = (model_id, raw)
    cache, rendered = _cached(st, "template", key)
    if rendered is None:
        try:
            messages = json.loads(utf8(raw, "messages"))
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"messages are not valid JSON: {e}") from None
        rendered = model.chat_template.render(messages).encode("utf-8")
        cache["template"] = (key, rendered)
    return write_sized(mem, out, cap, rendered, "rendered prompt")
