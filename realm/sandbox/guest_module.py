"""Guest modules: compiled once, checked against the ABI, cached by content hash.

Compiled modules are cached on disk as ``$REALM_HOME/modules/<sha256>-wasmtime<version>.cwasm``
(the directory must be writable by the host's user only: a .cwasm is native code).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from realm.errors import GuestFault
from realm.files import atomic_write
from realm.models.catalogue import realm_home
from realm.sandbox import abi
from realm.sandbox.wasm_engine import engine, first_line
from realm.sandbox.wasmtime_bridge import VERSION as WASMTIME_VERSION

log = logging.getLogger("realm.sandbox")

MAX_MODULE_BYTES = 64 * 1024 * 1024
"""The largest guest module accepted."""


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
        return base / f"{sha}-wasmtime{WASMTIME_VERSION}.cwasm"

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
                log.info("recompiling %s: cached %s is not usable (%s)", name, path.name, first_line(e))
        try:
            module = wasmtime.Module(eng, wasm)
        except wasmtime.WasmtimeError as e:
            raise GuestFault(f"guest {name} is not a valid WebAssembly module: {first_line(e)}") from None
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
