"""The one module that touches wasmtime-py's internals (`wasmtime._ffi`, `Store._context`,
`Memory._memory`, `WasmtimeError._from_ptr`).

Realm needs three things wasmtime-py's public API does not give at the speed or with the
control a multi-tenant host needs:

* host functions through Wasmtime's raw ("unchecked") interface: the arguments arrive as
  raw values, with no conversion object per argument, and a host function can stop its
  guest with a trap;
* an epoch-deadline callback, so a running guest's limits are checked while it runs
  WebAssembly (Python signal handlers never run then);
* a linear memory's address and size read while holding the GIL (ctypes gives the GIL up
  around every foreign call; with many guest threads, getting it back costs far more than
  the call).

Internals change between releases, so the tested release range is pinned here (and in
pyproject.toml): importing this module with another wasmtime-py fails with a clear error.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime

SUPPORTED_MAJOR = range(50, 51)
"""wasmtime-py major versions whose internals this module was written and tested against."""

VERSION = importlib.metadata.version("wasmtime")
_major = VERSION.split(".", 1)[0]
if not (_major.isdigit() and int(_major) in SUPPORTED_MAJOR):
    raise ImportError(
        f"Realm needs wasmtime-py >={SUPPORTED_MAJOR.start},<{SUPPORTED_MAJOR.stop} (it uses its internals in "
        f"realm/sandbox/wasmtime_bridge.py); version {VERSION} is installed: "
        f"pip install 'wasmtime>={SUPPORTED_MAJOR.start},<{SUPPORTED_MAJOR.stop}'"
    )

from wasmtime import _ffi as ffi  # noqa: E402 - only once the version is known to fit

log = logging.getLogger("realm.sandbox")

_keep: list[Any] = []  # ctypes callbacks Wasmtime holds pointers to: they must never be freed


def _holding_gil(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """Wasmtime's C function `name`, called without giving up the GIL."""
    function = getattr(ctypes.PyDLL(ffi.dll._name), name)
    function.restype, function.argtypes = restype, argtypes
    return function


_Context = ctypes.POINTER(ffi.wasmtime_context_t)
_memory_data = _holding_gil("wasmtime_memory_data", ctypes.c_void_p, [_Context, ctypes.POINTER(ffi.wasmtime_memory_t)])
_memory_data_size = _holding_gil(
    "wasmtime_memory_data_size", ctypes.c_size_t, [_Context, ctypes.POINTER(ffi.wasmtime_memory_t)]
)
_caller_context = _holding_gil("wasmtime_caller_context", _Context, [ctypes.POINTER(ffi.wasmtime_caller_t)])


class CallerContext:
    """The store context of a host call in progress: valid only until that call returns."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: Any) -> None:
        self.ptr = ptr


StoreContext = wasmtime.Store | CallerContext
"""Where a guest's memory is reached: its store, or the context of a host call in progress."""


def memory_span(memory: wasmtime.Memory, store: StoreContext) -> tuple[int, int]:
    """The host address and size in bytes of `memory` now (it moves when it grows)."""
    context = store.ptr if isinstance(store, CallerContext) else store._context()
    handle = ctypes.byref(memory._memory)
    size = int(_memory_data_size(context, handle))
    return ((_memory_data(context, handle) or 0) if size else 0), size


# ---------------------------------------------------------------------------- host functions


@dataclass(frozen=True)
class StopGuest:
    """What a host function returns to stop its guest at once (a trap with this message)."""

    message: str


HostImpl = Callable[[CallerContext, list[Any]], int | StopGuest]
"""impl(context, raw arguments) -> the i32 result, or StopGuest."""


def define_host_function(
    linker: wasmtime.Linker,
    module: str,
    name: str,
    params: Sequence[str],
    impl: HostImpl,
    failure_result: int,
) -> None:
    """Define `module.name` in `linker` as a raw host function with parameters `params`
    ("i32", "i64", "f32") and one i32 result. `impl` must not raise; if it does anyway, the
    failure is logged and the guest gets `failure_result`."""
    ty = wasmtime.FuncType([_valtype(p) for p in params], [wasmtime.ValType.i32()])
    fields = tuple(params)

    def callback(env: Any, caller: Any, vals: Any, n_vals: int) -> int:
        try:
            result = impl(CallerContext(_caller_context(caller)), [getattr(vals[i], f) for i, f in enumerate(fields)])
            if isinstance(result, StopGuest):
                message = result.message.encode()
                return ctypes.cast(ffi.wasmtime_trap_new(message, len(message)), ctypes.c_void_p).value or 0
            vals[0].i32 = result
            return 0
        except BaseException:  # pragma: no cover - impl catches everything; this is the last line
            log.exception("host function %s: unexpected failure in its adapter", name)
            try:
                vals[0].i32 = failure_result
            except Exception:
                pass
            return 0

    raw = ffi.wasmtime_func_unchecked_callback_t(callback)
    _keep.append(raw)
    module_b, name_b = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(), module_b, len(module_b), name_b, len(name_b), ty.ptr(), raw, None, _no_finalizer
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


def _valtype(name: str) -> wasmtime.ValType:
    return {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64, "f32": wasmtime.ValType.f32}[name]()


# ---------------------------------------------------------------------------- epoch deadlines

DeadlineCheck = Callable[[], str | int]
"""check() -> why the guest running on this thread must stop (an error message), or in how
many epochs to check again."""

_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t, _Context, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint8)
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_deadline_callbacks: dict[tuple[DeadlineCheck, int], Any] = {}
_UPDATE_DEADLINE_CONTINUE = 0


@_Finalizer
def _no_finalizer(data: Any) -> None:
    return None


def on_epoch_deadline(store: wasmtime.Store, check: DeadlineCheck, first_ticks: int) -> None:
    """After `first_ticks` epochs while `store`'s guest runs WebAssembly, call `check()`: a
    message stops the guest with that error, a number of epochs lets it run on until the
    next call."""
    key = (check, first_ticks)
    callback = _deadline_callbacks.get(key)
    if callback is None:

        def on_deadline(context: Any, data: Any, delta: Any, kind: Any) -> int:
            ticks = first_ticks
            try:
                outcome = check()
                if isinstance(outcome, str):
                    return ctypes.cast(ffi.wasmtime_error_new(outcome.encode()), ctypes.c_void_p).value or 0
                ticks = outcome
            except BaseException:  # pragma: no cover - never let anything escape into Wasmtime
                log.exception("the epoch deadline callback failed")
            delta[0] = ticks
            kind[0] = _UPDATE_DEADLINE_CONTINUE
            return 0

        callback = _deadline_callbacks.setdefault(key, _DeadlineCallback(on_deadline))
    ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, _no_finalizer)
    store.set_epoch_deadline(first_ticks)
