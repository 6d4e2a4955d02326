"""The Realm guest ABI, version 1.2: every host function, from one table.

Each entry names an import of module `env`, the kinds of its parameters and its
implementation (host_io.py, host_models.py, host_compute.py, host_grammar.py). The linkers for wasm32 guests
(pointers and sizes are i32) and for wasm64 guests (memory64: pointers and sizes are i64)
are both built from this table, and the import check of a guest module reads it too.
docs/ABI.md documents each function.

A host function is a thin adapter: it checks its arguments (every pointer and length
against the guest's current memory, every size against a cap), copies memory and calls
the engine. It never lets a Python exception reach Wasmtime: `invoke` turns a `RealmError`
into its `abi_code` and anything else, logged, into InternalError's code. Every call is
bounded by itself (epoch deadlines do not interrupt host calls).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from realm.errors import Cancelled, InternalError, LimitExceeded, RealmError
from realm.sandbox import host_compute as compute
from realm.sandbox import host_grammar as grammar
from realm.sandbox import host_io as io
from realm.sandbox import host_models as models
from realm.sandbox import state as guest_state
from realm.sandbox.state import CANCEL_GRACE_S, GuestState
from realm.sandbox.wasmtime_bridge import HostImpl, StopGuest, StoreContext

log = logging.getLogger("realm.guest")

ABI_MAJOR = 1
ABI_MINOR = 3
ABI_VERSION = (ABI_MAJOR << 16) | ABI_MINOR


class Cost(enum.Enum):
    """What a host call spends, which decides how the guest's CPU share takes it (cpu_share.py)."""

    CALL = enum.auto()
    """A little host code: charged to the guest's share, and paced (a flood takes the GIL)."""
    ARITHMETIC = enum.auto()
    """The guest's own arithmetic on the host's kernels: charged; paced only once the guest is
    demoted (a per-operation guest makes hundreds a token: paced, it made 5 tokens/s, not 20)."""
    MODEL = enum.auto()
    """Runs the model for the guest: neither (its cost is the model's, scheduled with every tenant's)."""


@dataclass(frozen=True)
class HostFunction:
    name: str
    params: tuple[str, ...]  # "ptr" / "size" (i32 in wasm32, i64 in wasm64), "i32", "i64", "f32"
    impl: Callable[..., int]  # impl(state, caller, *args) -> int (>= 0 result, < 0 error code)
    cost: Cost = Cost.CALL


def abi_version(st: GuestState, caller: StoreContext) -> int:
    return ABI_VERSION


TABLE: tuple[HostFunction, ...] = (
    HostFunction("realm_abi_version", (), abi_version),
    HostFunction("realm_get_backend_type", (), io.get_backend_type),
    HostFunction("realm_log", ("i32", "ptr", "size"), io.log_message),
    HostFunction("realm_request_read", ("ptr", "size"), io.request_read),
    HostFunction("realm_emit", ("i32", "ptr", "size"), io.emit),
    HostFunction("realm_finish", ("i32", "i32", "i32"), io.finish),
    HostFunction("realm_store_model", ("ptr", "size", "ptr"), models.store_model),
    HostFunction("realm_store_model_by_name", ("ptr", "size", "ptr"), models.store_model_by_name),
    HostFunction("realm_validate_model_id", ("i32", "ptr"), models.validate_model_id),
    HostFunction("realm_get_model_info", ("i32", "ptr", "size"), models.get_model_info),
    HostFunction("realm_release_model", ("i32",), models.release_model),
    HostFunction("realm_tokenize", ("i32", "ptr", "size", "i32", "ptr", "size"), models.tokenize),
    HostFunction("realm_token_bytes", ("i32", "i32", "ptr", "size"), models.token_bytes),
    HostFunction("realm_token_is_end", ("i32", "i32"), models.token_is_end),
    HostFunction("realm_vocab", ("i32", "ptr", "size"), models.vocab),
    HostFunction("realm_chat_template", ("i32", "ptr", "size", "ptr", "size"), models.chat_template),
    HostFunction("realm_session_open", ("i32", "i32"), compute.session_open),
    HostFunction("realm_session_close", ("i32",), compute.session_close),
    HostFunction("realm_forward", ("i32", "ptr", "i32", "ptr", "size"), compute.forward, cost=Cost.MODEL),
    HostFunction("realm_forward_top", ("i32", "ptr", "i32", "i32", "ptr", "ptr"), compute.forward_top, cost=Cost.MODEL),
    HostFunction("realm_logprobs", ("i32", "i32", "i32"), compute.logprobs, cost=Cost.MODEL),
    HostFunction("realm_embed", ("i32", "ptr", "i32", "ptr", "size"), compute.embed, cost=Cost.MODEL),
    HostFunction("realm_forward_layer", ("i32", "i32", "ptr", "size"), compute.forward_layer, cost=Cost.MODEL),
    HostFunction("realm_logits", ("i32", "ptr", "size", "ptr", "size"), compute.logits_of, cost=Cost.MODEL),
    HostFunction(
        "realm_matmul_cpu", ("ptr", "ptr", "i32", "i32", "i32", "ptr"), compute.matmul_cpu, cost=Cost.ARITHMETIC
    ),
    HostFunction(
        "realm_matmul_gpu", ("ptr", "ptr", "i32", "i32", "i32", "ptr"), compute.matmul_gpu, cost=Cost.ARITHMETIC
    ),
    HostFunction(
        "realm_matmul_weight",
        ("i32", "ptr", "size", "ptr", "i32", "ptr", "size"),
        compute.matmul_weight,
        cost=Cost.MODEL,
    ),
    HostFunction("realm_tensor_shape", ("i32", "ptr", "size", "ptr"), compute.tensor_shape),
    HostFunction("realm_tensor_read", ("i32", "ptr", "size", "i64", "i32", "ptr"), compute.tensor_read),
    # programmable decoding (1.2)
    HostFunction("realm_grammar_compile", ("i32", "ptr", "size"), grammar.grammar_compile),
    HostFunction("realm_grammar_free", ("i32",), grammar.grammar_free),
    HostFunction("realm_grammar_mask", ("i32", "ptr", "size"), grammar.grammar_mask),
    HostFunction("realm_grammar_consume", ("i32", "ptr", "i32"), grammar.grammar_consume),
    HostFunction("realm_grammar_forced", ("i32", "ptr", "size"), grammar.grammar_forced),
    HostFunction("realm_grammar_rollback", ("i32", "i32"), grammar.grammar_rollback),
    HostFunction("realm_session_set_grammar", ("i32", "i32"), grammar.session_set_grammar),
    HostFunction("realm_session_set_mask", ("i32", "ptr", "size"), grammar.session_set_mask),
    HostFunction("realm_session_set_bias", ("i32", "ptr", "ptr", "i32"), grammar.session_set_bias),
    HostFunction("realm_session_backup", ("i32", "i32"), grammar.session_backup),
)

BY_NAME = {f.name: f for f in TABLE}


def wasm_types(fn: HostFunction, memory64: bool) -> tuple[list[str], list[str]]:
    """The import's parameter and result types as Wasm type names ("i32", "i64", "f32")."""
    width = "i64" if memory64 else "i32"
    return [width if k in ("ptr", "size") else k for k in fn.params], ["i32"]


def invoke(fn: HostFunction, st: GuestState, store: StoreContext, args: list[Any]) -> int:
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
        if fn.cost is Cost.MODEL:
            return int(st.cpu.waiting(lambda: fn.impl(st, store, *args)))
        return int(fn.impl(st, store, *args))
    except RealmError as e:
        st.last_error = f"{fn.name}: {e}"
        if isinstance(e, Cancelled):
            st.told_to_stop(entered)
        log.debug("[%s/%s] %s -> %s: %s", st.tenant, st.name, fn.name, type(e).__name__, e)
        return e.abi_code
    except Exception as e:  # a fault in Realm itself: the guest gets a code, we get the log
        log.exception("[%s/%s] host function %s failed", st.tenant, st.name, fn.name)
        st.last_error = f"{fn.name}: internal error ({type(e).__name__})"
        return InternalError.abi_code
    finally:
        st.resumed_at = time.perf_counter()


def host_call(fn: HostFunction) -> HostImpl:
    """What the linker calls for `fn`: `invoke` for the guest running on this thread; once the
    host has decided to stop that guest (a limit), a trap that stops it at once."""

    def call(context: StoreContext, args: list[Any]) -> int | StopGuest:
        st = guest_state.current()
        if st is None:
            log.error("host function %s called with no guest running on this thread", fn.name)
            return InternalError.abi_code
        if fn.cost is Cost.CALL or (fn.cost is Cost.ARITHMETIC and st.cpu.demoted):
            st.fault = st.cpu.pause(st.over_limit)
        result = invoke(fn, st, context, args) if st.fault is None else InternalError.abi_code
        if st.fault is not None and not st.stopping:
            st.stopping = True
            return StopGuest(f"guest {st.name} {st.fault}")
        return result

    call.__name__ = fn.name
    return call
