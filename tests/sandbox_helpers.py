"""Shared set-up for the sandbox tests: a real runtime (real Wasmtime, real models) whose
model store serves the session's already-loaded models, and the host-direct reference."""

from __future__ import annotations

from pathlib import Path

from realm.backends.devices import BackendRegistry
from realm.engine.model_store import ModelStore
from realm.engine.sampling import SamplingParams
from realm.sandbox.request import build_request
from realm.sandbox.runtime import Limits, ModuleCache, Runtime

GUESTS = Path(__file__).resolve().parent / "guests"
NAMES = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def make_runtime(models: dict[str, tuple[Path, object]], home: Path, limits: Limits | None = None) -> Runtime:
    """A runtime whose store holds `models` ({name: (path, loaded Model)}) under their names."""
    by_path = {Path(path): model for path, model in models.values()}
    registry = BackendRegistry("cpu")

    def loader(path, backend, name=None, sha256=None, keep_packed=True):
        return by_path[Path(path)]

    store = ModelStore(registry.active, home=home, loader=loader)
    for name, (path, model) in models.items():
        store.store_path(path, name=name, sha256=model.sha256)
    return Runtime(store, registry, limits=limits, modules=ModuleCache(home / "modules"))


def greedy_request(runtime: Runtime, name: str, prompt: str | None = None, max_tokens: int = 16, **kw) -> dict:
    entry = runtime.models.by_name(name)
    runtime.models.release(entry.id)  # only looked up: the store's own reference stays
    params = kw.pop("params", SamplingParams.greedy())
    return build_request(entry, prompt=prompt, max_tokens=max_tokens, params=params, **kw)


def host_direct(model, prompt: str, max_tokens: int = 16, chat: bool = False, stop=()):
    """The host's own greedy generation (what `realm run --no-sandbox` runs)."""
    g = model.generate(prompt, max_tokens, SamplingParams.greedy(), list(stop), chat=chat)
    pieces = list(g)
    return g, pieces
