"""The host runtime for guests: one Wasmtime engine for the process, the ABI linkers, the
compiled-module cache, and what a guest reaches through host functions.

* One `wasmtime.Engine` per process, with memory64 on (wasm64 guests load) and epoch
  interruption on; a daemon thread advances the epoch every `TICK_S` (Python signal
  handlers do not run while wasm runs, so no timer signal could stop a guest). Every
  `CHECK_TICKS` a running guest reaches its epoch deadline, whose callback checks the
  guest's limits and stops it or lets it go on. (Lowering a deadline from a host call would
  not do: compiled code caches the deadline until it is reached.)
* Two linkers built from the one ABI table (realm/sandbox/abi.py): pointers and sizes are
  i32 for wasm32 guests and i64 for wasm64 guests. No WASI: a guest imports `env.realm_*`
  and nothing else.
* Compiled modules are cached on disk as ``$REALM_HOME/modules/<sha256>-wasmtime<version>.cwasm``
  (the directory must be writable by the host's user only: a .cwasm is native code).
* `Runtime` bundles the model store, the backends and the step runner a guest's host
  calls use, and makes guest instances (realm/sandbox/instance.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wasmtime
from wasmtime import _ffi as wasmtime_ffi

from realm.backends.devices import BackendRegistry
from realm.engine.model_store import Allowed, ModelStore
from realm.engine.steps import DirectStepRunner, StepRunner
from realm.errors import GuestFault, InvalidArgument
from realm.files import atomic_write
from realm.models.catalogue import realm_home
from realm.sandbox import abi
from realm.sandbox import state as guest_state

if TYPE_CHECKING:
    from realm.sandbox.instance import GuestInstance

log = logging.getLogger("realm.sandbox")

TICK_S = 0.01
"""How often the epoch advances: the granularity of a guest's time limit."""

MAX_MODULE_BYTES = 64 * 1024 * 1024
"""The largest guest module accepted."""


@dataclass(frozen=True)
class Limits:
    """What one guest instance may use."""

    memory_bytes: int = 256 << 20  # linear memory cap (memory.grow beyond it returns -1)
    guest_seconds: float = 30.0  # time running WebAssembly per request (host calls not counted)
    wall_seconds: float = 600.0  # a whole request, host calls included
    max_sessions: int = 8  # sessions open at once
    max_log_messages: int = 1000  # realm_log calls kept per request

    def __post_init__(self) -> None:
        if self.memory_bytes < 65536:
            raise InvalidArgument("a guest's memory cap must be at least one 64 KiB page")
        if self.guest_seconds <= 0 or self.wall_seconds <= 0:
            raise InvalidArgument("a guest's time limits must be > 0")


# ---------------------------------------------------------------------------- the engine

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


CHECK_TICKS = 5
"""A running guest's limits are checked every this many ticks (the epoch deadline callback):
every 50 ms of WebAssembly, the granularity of its time limits."""

_keep: list[Any] = []  # ctypes callbacks Wasmtime holds pointers to: they must never be freed

_DeadlineCallback = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.POINTER(wasmtime_ffi.wasmtime_context_t),
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(wasmtime_ffi.wasmtime_update_deadline_kind_t),
)
_Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@_DeadlineCallback
def _on_deadline(context: Any, data: Any, delta: Any, kind: Any) -> int:
    """Every CHECK_TICKS while a guest runs WebAssembly: stop it (an error) if it broke a
    limit, else let it run on. Python signal handlers never run while wasm runs; this does."""
    try:
        st = guest_state.current()
        reason = st.over_limit() if st is not None else None
        if reason is not None:
            st.fault = reason
            st.stopping = True
            message = f"guest {st.name} {reason}".encode()
            return ctypes.cast(wasmtime_ffi.wasmtime_error_new(message), ctypes.c_void_p).value or 0
    except BaseException:  # pragma: no cover - never let anything escape into Wasmtime
        log.exception("the epoch deadline callback failed")
    delta[0] = CHECK_TICKS
    kind[0] = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE
    return 0


@_Finalizer
def _no_finalizer(data: Any) -> None:
    return None


def watch(store: wasmtime.Store) -> None:
    """Make the store's guest stoppable: the deadline callback runs every CHECK_TICKS."""
    wasmtime_ffi.wasmtime_store_epoch_deadline_callback(store.ptr(), _on_deadline, None, _no_finalizer)
    store.set_epoch_deadline(CHECK_TICKS)


def linker(memory64: bool) -> wasmtime.Linker:
    """The ABI linker for wasm32 (memory64=False) or wasm64 guests, built once per process.
    Host functions use Wasmtime's raw ("unchecked") interface: the arguments arrive as raw
    values, with no conversion objects per argument."""
    eng = engine()
    with _lock:
        if memory64 not in _linkers:
            link = wasmtime.Linker(eng)
            for fn in abi.TABLE:
                params, results = abi.wasm_types(fn, memory64)
                ty = wasmtime.FuncType([_valtype(p) for p in params], [_valtype(r) for r in results])
                callback = wasmtime_ffi.wasmtime_func_unchecked_callback_t(abi.raw_adapter(fn, memory64))
                _keep.append(callback)
                module, name = b"env", fn.name.encode()
                error = wasmtime_ffi.wasmtime_linker_define_func_unchecked(
                    link.ptr(), module, len(module), name, len(name), ty.ptr(), callback, None, _no_finalizer
                )
                if error:
                    raise wasmtime.WasmtimeError._from_ptr(error)
            _linkers[memory64] = link
        return _linkers[memory64]


def _valtype(name: str) -> wasmtime.ValType:
    return {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64, "f32": wasmtime.ValType.f32}[name]()


def wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


# ---------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class GuestModule:
    """A compiled guest module whose imports and exports passed the ABI check."""

    name: str
    sha256: str
    module: wasmtime.Module
    memory64: bool
    imports: tuple[str, ...]
    min_memory_bytes: int = 0  # the linear memory it starts with


class ModuleCache:
    """Compiled modules by content hash: in this process, and as .cwasm files on disk."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._loaded: dict[str, GuestModule] = {}
        self._lock = threading.Lock()

    def path_for(self, sha: str) -> Path:
        base = self.directory or realm_home() / "modules"
        return base / f"{sha}-wasmtime{wasmtime_version()}.cwasm"

    def load(self, wasm: bytes, name: str) -> GuestModule:
        """Compile (or find compiled) and check a guest module; GuestFault if it is not one."""
        if len(wasm) > MAX_MODULE_BYTES:
            raise GuestFault(f"guest {name} is {len(wasm)} bytes; the limit is {MAX_MODULE_BYTES}")
        sha = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            hit = self._loaded.get(sha)
        if hit is not None:
            return hit
        module = self._compiled(wasm, sha, name)
        checked = check_module(module, name, sha)
        with self._lock:
            self._loaded.setdefault(sha, checked)
        return checked

    def _compiled(self, wasm: bytes, sha: str, name: str) -> wasmtime.Module:
        eng = engine()
        path = self.path_for(sha)
        if path.is_file():
            try:
                return wasmtime.Module.deserialize_file(eng, str(path))
            except wasmtime.WasmtimeError as e:  # another engine configuration: compile again
                log.info("recompiling %s: cached %s is not usable (%s)", name, path.name, _first_line(e))
        try:
            module = wasmtime.Module(eng, wasm)
        except wasmtime.WasmtimeError as e:
            raise GuestFault(f"guest {name} is not a valid WebAssembly module: {_first_line(e)}") from None
        with contextlib.suppress(OSError):  # no cache is slower, not wrong
            atomic_write(path, module.serialize())
        return module


def check_module(module: wasmtime.Module, name: str, sha: str) -> GuestModule:
    """The ABI's rules for a module: imports only documented `env` functions with their
    exact types; exports `memory`, `generate` and `realm_guest_abi`."""
    exports = {e.name: e.type for e in module.exports}
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.MemoryType):
        raise GuestFault(f"guest {name} does not export its linear memory as 'memory'")
    memory64 = bool(memory.is_64)
    for export in ("generate", "realm_guest_abi"):
        ty = exports.get(export)
        if not isinstance(ty, wasmtime.FuncType) or ty.params or [str(r) for r in ty.results] != ["i32"]:
            raise GuestFault(f"guest {name} must export a function `int32_t {export}(void)`")
    names = []
    for imp in module.imports:
        what = f"{imp.module}.{imp.name}"
        fn = abi.BY_NAME.get(imp.name or "") if imp.module == "env" else None
        if fn is None:
            raise GuestFault(
                f"guest {name} imports {what}, which the Realm ABI {abi.ABI_MAJOR}.{abi.ABI_MINOR} does not "
                "offer (a guest imports only the env.realm_* functions of docs/ABI.md; no WASI)"
            )
        ty = imp.type
        params, results = abi.wasm_types(fn, memory64)
        if (
            not isinstance(ty, wasmtime.FuncType)
            or [str(p) for p in ty.params] != params
            or [str(r) for r in ty.results] != results
        ):
            got = (
                f"({', '.join(str(p) for p in ty.params)}) -> ({', '.join(str(r) for r in ty.results)})"
                if isinstance(ty, wasmtime.FuncType)
                else type(ty).__name__
            )
            raise GuestFault(
                f"guest {name} imports {what} as {got}; the ABI's {'wasm64' if memory64 else 'wasm32'} "
                f"signature is ({', '.join(params)}) -> (i32)"
            )
        names.append(fn.name)
    start = memory.limits.min * memory.page_size
    return GuestModule(
        name=name, sha256=sha, module=module, memory64=memory64, imports=tuple(names), min_memory_bytes=start
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- the runtime


class Runtime:
    """What guests reach: the model store, the backends and the step runner; makes instances."""

    def __init__(
        self,
        models: ModelStore,
        backends: BackendRegistry,
        *,
        steps: StepRunner | None = None,
        limits: Limits | None = None,
        modules: ModuleCache | None = None,
    ) -> None:
        self.models = models
        self.backends = backends
        self.steps: StepRunner = steps or DirectStepRunner()
        self.limits = limits or Limits()
        self.modules = modules or ModuleCache()
        engine()

    @classmethod
    def on_host(
        cls,
        backend: str | None = None,
        *,
        steps: StepRunner | None = None,
        limits: Limits | None = None,
        modules: ModuleCache | None = None,
    ) -> Runtime:
        """The one wiring of a host: the backends this machine has (`backend` picks one,
        else the fallback chain), one model store on the active backend, and the runtime."""
        registry = BackendRegistry(backend)
        return cls(ModelStore(registry.active), registry, steps=steps, limits=limits, modules=modules)

    def load_module(self, source: str | os.PathLike[str] | bytes, name: str | None = None) -> GuestModule:
        """A guest module from a .wasm/.wat path or from bytes."""
        if isinstance(source, (bytes, bytearray)):
            return self.modules.load(bytes(source), name or "guest")
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise GuestFault(f"cannot read guest module {path}: {e.strerror or e}") from None
        if path.suffix == ".wat":
            try:
                data = wasmtime.wat2wasm(data.decode("utf-8"))
            except (wasmtime.WasmtimeError, UnicodeDecodeError) as e:
                raise GuestFault(f"guest {path.name} is not valid WAT: {_first_line(e)}") from None
        return self.modules.load(bytes(data), name or path.stem)

    def default_module(self) -> GuestModule:
        """The default guest (guest/default.c), built first if its .wasm is missing or stale."""
        from realm.sandbox.toolchain import default_guest

        return self.load_module(default_guest(), name="default")

    def instance(
        self,
        module: GuestModule,
        tenant: str = "default",
        *,
        allowed: Allowed | None = None,
        limits: Limits | None = None,
    ) -> GuestInstance:
        """A fresh instance of `module` in its own store, for one tenant."""
        from realm.sandbox.instance import GuestInstance

        return GuestInstance(self, module, tenant, allowed=allowed, limits=limits or self.limits)
