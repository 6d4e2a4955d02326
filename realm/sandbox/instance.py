"""One guest instance: a module instantiated in its own Wasmtime store, for one tenant.

The store has a memory cap and a time limit (an epoch deadline on time spent running
WebAssembly; host calls do not count, and a wall-clock limit covers the whole request).
A guest that traps, runs out of time or breaks the ABI fails its own request with a
`GuestFault` naming the guest and the limit; the instance starts afresh on its next
request and nothing else is touched.

A store must never be used from two threads at once: an instance runs one request at a
time (a second concurrent `generate` is refused) and should stay on one worker thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import wasmtime

from realm.engine.logprobs import TokenLogprobs
from realm.engine.model_store import Allowed
from realm.errors import (
    ABI_CODES,
    AbiVersionMismatch,
    Cancelled,
    GuestFault,
    LimitExceeded,
)
from realm.sandbox import abi
from realm.sandbox import state as guest_state
from realm.sandbox.cpu_share import CpuBudget
from realm.sandbox.guest_module import GuestModule
from realm.sandbox.host_io import FINISH_REASONS
from realm.sandbox.limits import Limits
from realm.sandbox.state import Call, GuestState, HostServices
from realm.sandbox.wasm_engine import engine, first_line, linker, watch

log = logging.getLogger("realm.sandbox")


@dataclass
class GuestResult:
    """What one request produced, as the guest reported it."""

    text: str
    tokens: list[int]  # the tokens the guest emitted (>= 0), in order
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # the whole request
    guest_seconds: float  # of which running WebAssembly
    host_calls: int
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of the tokens, if the request asked


class GuestInstance:
    def __init__(
        self,
        host: HostServices,
        module: GuestModule,
        tenant: str,
        *,
        allowed: Allowed | None,
        limits: Limits,
        cpu: CpuBudget | None = None,
    ) -> None:
        """`cpu`: the tenant's CPU budget, shared by all its instances (realm/sandbox/cpu_share.py);
        None gives this instance one of its own."""
        self.module = module
        self.tenant = tenant
        self.limits = limits
        self.state = GuestState(module.name, tenant, host, limits, allowed, module.memory64, cpu or CpuBudget())
        self.abi_version = 0
        self._busy = threading.Lock()
        self._store: wasmtime.Store | None = None
        self._generate: Any = None
        self._closed = False
        self._instantiate()

    # ------------------------------------------------------------------------- lifecycle

    def _instantiate(self) -> None:
        """A fresh store and instance; checks the guest's ABI version."""
        st = self.state
        if self.module.min_memory_bytes > self.limits.memory_bytes:
            raise GuestFault(
                f"guest {self.module.name} (tenant {self.tenant}) starts with "
                f"{self.module.min_memory_bytes / 2**20:g} MiB of memory; "
                f"its cap is {self.limits.memory_bytes / 2**20:g} MiB"
            )
        store = wasmtime.Store(engine())
        store.set_limits(
            memory_size=self.limits.memory_bytes, table_elements=1 << 20, instances=1, tables=4, memories=1
        )
        watch(store)
        self._store = store
        self._generate = None
        st.memory = None
        try:
            instance = self._run(lambda: linker(self.module.memory64).instantiate(store, self.module.module))
        except GuestFault:
            self._store = None
            raise
        exports = instance.exports(store)
        st.memory = exports["memory"]
        version = self._run(lambda: exports["realm_guest_abi"](store))
        if not isinstance(version, int) or (version >> 16) != abi.ABI_MAJOR:
            self._store = None
            major, minor = (version >> 16) & 0xFFFF, version & 0xFFFF
            raise AbiVersionMismatch(
                f"guest {self.module.name} was built for Realm ABI {major}.{minor}; this host implements "
                f"ABI {abi.ABI_MAJOR}.{abi.ABI_MINOR} (rebuild the guest against guest/include/realm.h)"
            )
        self.abi_version = version
        self._generate = exports["generate"]

    def close(self) -> None:
        """Drop the store, close sessions and give back the models this guest holds."""
        if self._closed:
            return
        self._closed = True
        self.state.close_sessions()
        self.state.release_models()
        self.state.memory = None
        self._store = None
        self._generate = None

    def __enter__(self) -> GuestInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- requests

    def generate(
        self,
        request: Mapping[str, Any] | bytes,
        on_token: Callable[[int, str], None] | None = None,
        cancel: threading.Event | None = None,
        on_logprobs: Callable[[TokenLogprobs], None] | None = None,
    ) -> GuestResult:
        """Run one request through the guest's `generate`.

        `request` is the request object (docs/ABI.md, "The request") or its JSON bytes;
        `on_token(token, text)` is called for every realm_emit (token -1: text only);
        `on_logprobs` with a token's log-probabilities (realm_logprobs) just before the
        on_token call of that token; setting `cancel` makes realm_emit and the forward functions return
        REALM_E_CANCELLED. Raises Cancelled, GuestFault, or the error class of the code the
        guest returned (e.g. ContextOverflow), with the host's last error message.
        """
        if self._closed:
            raise GuestFault(f"guest {self.module.name} of tenant {self.tenant} is closed")
        if not self._busy.acquire(blocking=False):
            raise LimitExceeded(f"guest {self.module.name} of tenant {self.tenant} is already running a request")
        try:
            if self._store is None or self._generate is None:
                self._instantiate()
            payload = request if isinstance(request, bytes) else json.dumps(request).encode("utf-8")
            st = self.state
            call = Call(payload=payload, cancel=cancel, on_logprobs=on_logprobs)
            failure: list[BaseException] = []

            def deliver(token: int, text: str) -> None:
                if on_token is None:
                    return
                try:
                    on_token(token, text)
                except Exception as e:  # the consumer broke (e.g. a closed pipe): stop the guest
                    failure.append(e)
                    raise Cancelled(f"the output consumer failed: {type(e).__name__}: {e}") from None

            call.on_token = deliver
            st.call = call
            st.last_error = None
            st.host_calls = 0
            started = time.perf_counter()
            try:
                code = self._run(lambda: self._generate(self._store))
            finally:
                st.call = None
                st.close_sessions()
            if failure:
                raise failure[0]
            return self._result(code, call, time.perf_counter() - started)
        finally:
            self._busy.release()

    def _result(self, code: Any, call: Call, seconds: float) -> GuestResult:
        st = self.state
        if not isinstance(code, int):
            raise GuestFault(f"guest {self.module.name}: generate returned {code!r}, not an int32")
        if code < 0:
            if code == Cancelled.abi_code or (call.cancel is not None and call.cancel.is_set()):
                raise Cancelled(f"the request to guest {self.module.name} was cancelled")
            cls = ABI_CODES.get(code, GuestFault)
            detail = st.last_error or "the guest gave no detail (realm_log at level ERROR explains a failure)"
            raise cls(f"guest {self.module.name} failed with {cls.__name__} ({code}): {detail}")
        reason, prompt, completion = call.finish or (0, 0, len(call.tokens))
        return GuestResult(
            text="".join(call.text),
            tokens=list(call.tokens),
            finish_reason=FINISH_REASONS[reason],
            prompt_tokens=prompt,
            completion_tokens=completion,
            seconds=seconds,
            guest_seconds=st.guest_seconds,
            host_calls=st.host_calls,
            logprobs=list(call.logprobs),
        )

    # ------------------------------------------------------------------------- running wasm

    def _run(self, fn: Callable[[], Any]) -> Any:
        """Run guest code on this thread with this guest's state, limits and fault handling."""
        st = self.state
        previous = guest_state.install(st)
        st.start_clock()
        try:
            return fn()
        except wasmtime.Trap as trap:
            self._fault()
            fault = GuestFault(self._describe(trap))
        except wasmtime.WasmtimeError as e:  # the deadline callback stopped it, or instantiation failed
            self._fault()
            what = st.fault or f"failed: {first_line(e)}"
            fault = GuestFault(
                f"guest {self.module.name} (tenant {self.tenant}) {what}{self._memory_note()}; the request failed"
            )
        finally:
            st.guest_seconds += time.perf_counter() - st.resumed_at
            st.cpu.end()
            guest_state.install(previous)
        # Raised here, outside the except clause, so it carries no context: wasmtime's error
        # and its traceback hold the store, and with it the guest's memory, for as long as
        # this error lives (a server keeps it until the response is sent, or a cycle is collected).
        raise fault

    def _fault(self) -> None:
        """After a trap the guest's memory may be inconsistent: the next request starts afresh."""
        self.state.close_sessions()
        self._generate = None

    def _describe(self, trap: wasmtime.Trap) -> str:
        st = self.state
        code = trap.trap_code
        if st.fault is not None:  # the host stopped it
            what = st.fault
        elif code == wasmtime.TrapCode.INTERRUPT:
            what = f"ran past its time limit of {self.limits.guest_seconds:g} s running WebAssembly"
        elif code == wasmtime.TrapCode.UNREACHABLE:
            what = "trapped: it executed an `unreachable` instruction (abort)"
        elif code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS:
            what = "trapped: out-of-bounds memory access"
        elif code == wasmtime.TrapCode.STACK_OVERFLOW:
            what = "trapped: stack overflow"
        else:
            what = f"trapped: {first_line(trap)}"
        return f"guest {self.module.name} (tenant {self.tenant}) {what}{self._memory_note()}; the request failed"

    def _memory_note(self) -> str:
        used = self._memory_bytes()
        return f"; memory {used / 2**20:.1f} MiB of its {self.limits.memory_bytes / 2**20:g} MiB cap" if used else ""

    def _memory_bytes(self) -> int:
        memory, store = self.state.memory, self._store
        if memory is None or store is None:
            return 0
        try:
            return memory.data_len(store)
        except Exception:  # the store is gone or unusable: only the message loses a detail
            return 0
