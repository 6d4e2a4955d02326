"""The host runtime for guests: what a guest reaches through host functions (the model
store, the backends and the step runner), the guest modules it has loaded, and the guest
instances it makes.

The parts live beside it: the Wasmtime engine and linkers (wasm_engine.py), module
compiling, checking and caching (guest_module.py), one instance per tenant (instance.py),
the host functions (abi.py), the limits (limits.py) and each tenant's CPU share
(cpu_share.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import wasmtime

from realm.backends.devices import BackendRegistry
from realm.engine.grammar import GrammarCache
from realm.engine.model_store import Allowed, ModelStore
from realm.engine.steps import DirectStepRunner, StepRunner
from realm.errors import GuestFault
from realm.sandbox.cpu_share import CpuBudget
from realm.sandbox.guest_module import GuestModule, ModuleCache
from realm.sandbox.instance import GuestInstance
from realm.sandbox.limits import Limits
from realm.sandbox.state import HostServices
from realm.sandbox.wasm_engine import engine, first_line

__all__ = ["GuestModule", "Limits", "ModuleCache", "Runtime"]


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
        self._cpu_budgets: dict[str, CpuBudget] = {}  # per tenant, shared by its instances
        self.grammars = GrammarCache()  # compiled constraints, per tenant, shared by its instances
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
                raise GuestFault(f"guest {path.name} is not valid WAT: {first_line(e)}") from None
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
        """A fresh instance of `module` in its own store, for one tenant; the tenant's
        instances share one CPU budget (realm/sandbox/cpu_share.py)."""
        services = HostServices(self.models, self.backends, self.steps, self.grammars)
        cpu = self._cpu_budgets.setdefault(tenant, CpuBudget())
        return GuestInstance(services, module, tenant, allowed=allowed, limits=limits or self.limits, cpu=cpu)
