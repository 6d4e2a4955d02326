"""The models one host serves, loaded at startup or on their first request, and unloaded
past the host's budget (`max_loaded_models`, `max_loaded_mb`) or by the operator (/admin).

Every served model has a slot from the start: its name, where its weights are and the
SHA-256 of its content (the catalogue's, or the file's, hashed once at startup), so a
tenant's permissions and a request naming a model by hash need no loaded model. A model
loads on the thread of the request that first needs it (that client waits; /health stays
200); loads are one at a time. Room for a new model is made by unloading the least
recently used idle model; a model with a request running (`hold` ... `release`) is never
unloaded, and if every loaded model is busy the load is refused with 503.

The maps readers iterate (`loaded`, `loaded_at`) are replaced whole on
every change, never mutated, so the event loop may iterate them while a loader thread
swaps them.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from realm.engine.grammar import lltokenizer
from realm.engine.model_store import ModelStore, StoredModel
from realm.engine.scheduler import BatchScheduler
from realm.engine.step_router import SchedulerRouter
from realm.errors import ServiceUnavailable, UnknownModel
from realm.files import sha256_file
from realm.models import catalogue
from realm.server.metrics import Metrics
from realm.server.settings import ServerSettings

log = logging.getLogger("realm.server")

SHA256_MODEL = re.compile(r"sha256:([0-9a-f]{64})", re.IGNORECASE)
"""A request's `model` that names a served model by the SHA-256 of its content."""


@dataclass(frozen=True)
class Slot:
    """A served model whether or not it is loaded: its name, its file (None: a catalogue
    model not yet fetched) and its content's SHA-256."""

    name: str
    where: str  # what catalogue.locate takes: a catalogue name or a path
    sha256: str


@dataclass(frozen=True)
class SlotState:
    """One served model as /admin lists it."""

    name: str
    sha256: str
    loaded: bool
    bytes_held: int
    busy: int  # requests running on it now
    idle_s: float | None  # since its last request ended (None: not loaded)


class ModelSlots:
    def __init__(
        self, settings: ServerSettings, metrics: Metrics, router: SchedulerRouter, *, progress: bool = False
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.router = router
        self.progress = progress
        self.slots: dict[str, Slot] = {}
        self.loaded: dict[str, StoredModel] = {}  # replaced whole on change
        self.loaded_at: dict[str, int] = {}  # unix time; replaced whole on change
        self.on_load: list[Callable[[str, StoredModel], None]] = []
        self.store: ModelStore | None = None
        self._schedulers: dict[str, BatchScheduler] = {}
        self._busy: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()  # the maps above
        self._loading = threading.Lock()  # one load at a time: room is made for one model at a time

    def describe(self) -> None:
        """Name, file and hash of every served model (hashing a local file once; a catalogue
        model's hash is the catalogue's, so nothing is fetched here)."""
        s = self.settings
        for m in s.model_entries():
            if m.path is not None:
                path = s.resolve_path(m.path)
                if not path.is_file():
                    raise UnknownModel(f"model {m.name}: no such file {path}")
                self.slots[m.name] = Slot(m.name, str(path), sha256_file(path))
            elif m.name in catalogue.CATALOGUE:
                self.slots[m.name] = Slot(m.name, m.name, catalogue.CATALOGUE[m.name].sha256.lower())
            else:
                catalogue.resolve(m.name, progress=False)  # raises UnknownModel, naming the catalogue

    def names_for(self, name: str) -> list[str]:
        """The served names `name` stands for: itself if served, else every served model
        whose content is `sha256:<hex>` (none: an empty list)."""
        if name in self.slots:
            return [name]
        pinned = SHA256_MODEL.fullmatch(name)
        sha = pinned.group(1).lower() if pinned else None
        return [n for n, slot in self.slots.items() if slot.sha256 == sha]

    # ------------------------------------------------------------------------- loading

    def get(self, name: str) -> StoredModel:
        """Served model `name`, loaded now if it is not (this thread waits for it)."""
        entry = self.loaded.get(name)
        if entry is not None:
            return entry
        if name not in self.slots:
            raise UnknownModel(f"the model {name!r} does not exist on this server")
        return self.load(name)

    def load(self, name: str) -> StoredModel:
        """Load served model `name` (a no-op if it is loaded), unloading idle ones to make room."""
        slot = self.slots.get(name)
        if slot is None:
            raise UnknownModel(f"the model {name!r} does not exist on this server")
        with self._loading:
            entry = self.loaded.get(name)
            if entry is not None:
                return entry
            return self._load(slot)

    def _load(self, slot: Slot) -> StoredModel:
        if self.store is None:
            raise ServiceUnavailable("the server is not ready")
        started = time.perf_counter()
        source = catalogue.locate(slot.where, name=slot.name, progress=self.progress)
        self._make_room(slot.name, source.path.stat().st_size)
        entry = self.store.store_source(catalogue.ModelSource(source.path, slot.name, slot.sha256))
        try:
            s = self.settings
            if s.grammars_at_load:
                lltokenizer(entry.model.tokenizer, entry.model.config.vocab_size)
            scheduler = BatchScheduler(
                entry.model.transformer,
                s.max_batch_tokens,
                self.metrics.observer(slot.name),
                gather_s=s.batch_wait_ms / 1000,
            )
        except BaseException:
            self.store.release(entry.id)
            raise
        self.router.add(scheduler)
        self.metrics.serve(slot.name, scheduler, entry.model.kv_pool)
        with self._lock:
            self._schedulers[slot.name] = scheduler
            self._last_used[slot.name] = time.monotonic()
            self.loaded_at = {**self.loaded_at, slot.name: int(time.time())}
            self.loaded = {**self.loaded, slot.name: entry}
        for notify in self.on_load:
            notify(slot.name, entry)
        _settle_heap()
        log.info(
            "model %s loaded in %.1f s (sha256 %s, %s)",
            slot.name,
            time.perf_counter() - started,
            entry.sha256[:16],
            entry.model.backend.name,
        )
        return entry

    def _make_room(self, name: str, size: int) -> None:
        """Unload least recently used idle models until one of `size` bytes fits the budget."""
        cap, mb = self.settings.max_loaded_models, self.settings.max_loaded_mb
        budget = None if mb is None else mb << 20
        if budget is not None and size > budget:
            raise ServiceUnavailable(
                f"model {name} ({size >> 20} MiB) is larger than this server's max_loaded_mb ({mb} MiB)"
            )
        while True:
            with self._lock:
                held = sum(e.bytes_held for e in self.loaded.values())
                over = (cap is not None and len(self.loaded) >= cap) or (budget is not None and held + size > budget)
                if not over:
                    return
                idle = [n for n in self.loaded if not self._busy.get(n)]
                if not idle:
                    raise ServiceUnavailable(
                        f"model {name} must wait: every loaded model is running requests "
                        f"({', '.join(self.loaded)}) and there is no room for another; retry shortly"
                    )
                victim = min(idle, key=lambda n: self._last_used.get(n, 0.0))
                detached = self._detach(victim)
            self._free(victim, *detached)
            log.info("model %s unloaded to make room for %s", victim, name)

    # ------------------------------------------------------------------------- unloading

    def unload(self, name: str) -> None:
        """Unload served model `name` now: 503 if requests are running on it."""
        if name not in self.slots:
            raise UnknownModel(f"the model {name!r} does not exist on this server")
        with self._loading:
            with self._lock:
                if name not in self.loaded:
                    return
                if self._busy.get(name):
                    raise ServiceUnavailable(
                        f"model {name} is running {self._busy[name]} requests; unload it when they are done"
                    )
                detached = self._detach(name)
            self._free(name, *detached)
            _settle_heap()
        log.info("model %s unloaded", name)

    def _detach(self, name: str) -> tuple[StoredModel, BatchScheduler]:
        """Take `name` out of the maps (call with the lock held): no new request finds it."""
        entry = self.loaded[name]
        self.loaded = {n: e for n, e in self.loaded.items() if n != name}
        self.loaded_at = {n: t for n, t in self.loaded_at.items() if n != name}
        self._last_used.pop(name, None)
        return entry, self._schedulers.pop(name)

    def _free(self, name: str, entry: StoredModel, scheduler: BatchScheduler) -> None:
        self.router.remove(scheduler)
        scheduler.close()
        self.metrics.unserve(name)
        if self.store is not None:
            self.store.release(entry.id)

    # ------------------------------------------------------------------------- requests

    def hold(self, name: str, entry: StoredModel) -> None:
        """A request starts on `entry` (served as `name`): it stays loaded until `release`.
        ServiceUnavailable (retry) if it was unloaded since the request found it."""
        with self._lock:
            if self.loaded.get(name) is not entry:
                raise ServiceUnavailable(f"model {name} was unloaded while this request was prepared; retry")
            self._busy[name] = self._busy.get(name, 0) + 1

    def release(self, name: str) -> None:
        with self._lock:
            self._busy[name] -= 1
            self._last_used[name] = time.monotonic()

    def states(self) -> list[SlotState]:
        now = time.monotonic()
        with self._lock:
            out = []
            for name, slot in self.slots.items():
                entry = self.loaded.get(name)
                used = self._last_used.get(name)
                out.append(
                    SlotState(
                        name,
                        slot.sha256,
                        entry is not None,
                        entry.bytes_held if entry is not None else 0,
                        self._busy.get(name, 0),
                        None if entry is None or used is None else now - used,
                    )
                )
            return out


def _settle_heap() -> None:
    """Collect the cyclic garbage now and freeze what is left out of later collections. A
    loaded model leaves ~220k long-lived Python objects (gemma3), and a full collection
    over them held the GIL 110-123 ms, stalling every guest and the event loop; frozen,
    0 ms. Run after a model is loaded or unloaded (thawed first, so that a freed model's
    cycles are collected too; the models a load unloads to make room are collected by the
    load's own call): ~0.1 s of a load that takes seconds.
    Ray Serve freezes its replicas' start-up objects the same way."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def unloaded_card(name: str, sha256: str) -> dict[str, Any]:
    """/v1/models' card of a served model that is not loaded now (it loads on first use)."""
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "realm",
        "sha256": sha256,
        "info": {"loaded": False},
    }
