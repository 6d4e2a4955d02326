"""The process's Wasmtime engine, its epoch ticker, and the two ABI linkers.

* One `wasmtime.Engine` per process, with memory64 on (wasm64 guests load) and epoch
  interruption on; a daemon thread advances the epoch every `TICK_S` (Python signal
  handlers do not run while wasm runs, so no timer signal could stop a guest). Every
  `CHECK_TICKS` (every tick once it is demoted) a running guest reaches its epoch deadline,
  whose callback checks the guest's CPU share and limits and demotes it, holds it, stops it
  or lets it go on. (Lowering a deadline from a host call would
  not do: compiled code caches the deadline until it is reached.)
* Two linkers built from the one ABI table (realm/sandbox/abi.py): pointers and sizes are
  i32 for wasm32 guests and i64 for wasm64 guests. No WASI: a guest imports `env.realm_*`
  and nothing else.
"""

from __future__ import annotations

import threading
import time

import wasmtime

from realm.errors import InternalError
from realm.sandbox import abi
from realm.sandbox import state as guest_state
from realm.sandbox import wasmtime_bridge as bridge

TICK_S = 0.01
"""How often the epoch advances: the granularity of a guest's time limit."""

CHECK_TICKS = 5
"""A running guest's limits are checked every this many ticks (the epoch deadline callback):
every 50 ms of WebAssembly, the granularity of its time limits."""

_lock = threading.Lock()
_engine: wasmtime.Engine | None = None
_linkers: dict[bool, wasmtime.Linker] = {}


def engine() -> wasmtime.Engine:
    """The process's Wasmtime engine (memory64 and epoch interruption on); starts the ticker."""
    global _engine
    with _lock:
        if _engine is None:
            config = wasmtime.Config()
            config.wasm_memory64 = True
            config.epoch_interruption = True
            config.cranelift_opt_level = "speed"
            _engine = wasmtime.Engine(config)
            threading.Thread(target=_tick, args=(_engine,), name="realm-epoch", daemon=True).start()
        return _engine


def _tick(eng: wasmtime.Engine) -> None:
    while True:
        time.sleep(TICK_S)
        eng.increment_epoch()


def _check() -> str | int:
    """At each epoch deadline while a guest runs WebAssembly: demote it if it is over its CPU
    share, hold it while it may not run on (realm/sandbox/cpu_share.py); why it must stop (it
    broke a limit), or in how many ticks to check again (every tick once it is demoted, so
    that it yields to compute within one)."""
    st = guest_state.current()
    if st is None:
        return CHECK_TICKS
    st.cpu.check()
    reason = st.cpu.hold(st.over_limit)
    if reason is None:
        return 1 if st.cpu.demoted else CHECK_TICKS
    st.fault = reason
    st.stopping = True
    return f"guest {st.name} {reason}"


def watch(store: wasmtime.Store) -> None:
    """Make the store's guest stoppable: its limits are checked every CHECK_TICKS."""
    bridge.on_epoch_deadline(store, _check, CHECK_TICKS)


def linker(memory64: bool) -> wasmtime.Linker:
    """The ABI linker for wasm32 (memory64=False) or wasm64 guests, built once per process."""
    eng = engine()
    with _lock:
        if memory64 not in _linkers:
            link = wasmtime.Linker(eng)
            for fn in abi.TABLE:
                params, _ = abi.wasm_types(fn, memory64)
                bridge.define_host_function(link, "env", fn.name, params, abi.host_call(fn), InternalError.abi_code)
            _linkers[memory64] = link
        return _linkers[memory64]


def first_line(e: BaseException) -> str:
    """The first line of a Wasmtime error's message (the rest is a backtrace)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
