"""What the server runs on: the served models (one copy each, in one model store), one
batch scheduler per model shared by every tenant, the sandbox runtime, and the tenants.

A request runs in a fresh instance of its tenant's guest (its own Wasmtime store: nothing
of one request, let alone one tenant, is visible to another) on a thread of its own; the
guest's `realm_forward` steps go through `SchedulerRouter` to the scheduler of the model
the session belongs to, which batches them with every other waiting step. Output comes
back to the event loop through an asyncio queue, one event per `realm_emit`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from realm.engine.model_store import StoredModel
from realm.engine.scheduler import BatchScheduler
from realm.engine.session import Session
from realm.engine.steps import DirectStepRunner
from realm.errors import (
    AbiVersionMismatch,
    ContextOverflow,
    GuestFault,
    InternalError,
    InvalidArgument,
    RealmError,
    ServiceUnavailable,
    UnknownModel,
)
from realm.models import catalogue
from realm.sandbox.instance import GuestResult
from realm.sandbox.runtime import ModuleCache, Runtime
from realm.server.keys import KeyRing
from realm.server.metrics import Metrics
from realm.server.settings import ServerSettings
from realm.server.tenants import Admission, Tenant

log = logging.getLogger("realm.server")


class SchedulerRouter:
    """The sandbox's step runner: each step goes to the scheduler of its session's model."""

    def __init__(self) -> None:
        self._by_transformer: dict[int, BatchScheduler] = {}
        self._direct = DirectStepRunner()

    def add(self, scheduler: BatchScheduler) -> None:
        self._by_transformer[id(scheduler.transformer)] = scheduler

    def step(self, session: Session, tokens: Sequence[int], tenant: str = "") -> np.ndarray:
        scheduler = self._by_transformer.get(id(session.transformer))
        if scheduler is None:  # not a served model (tenants are refused those): run alone
            return self._direct.step(session, tokens, tenant)
        return scheduler.step(session, tokens, tenant)

    def schedulers(self) -> list[BatchScheduler]:
        return list(self._by_transformer.values())

    def close(self) -> None:
        for s in self._by_transformer.values():
            s.close()


# ---------------------------------------------------------------------------- events


@dataclass
class Emitted:
    token: int  # -1: text with no new token
    text: str


@dataclass
class Finished:
    result: GuestResult


@dataclass
class Failed:
    error: BaseException


Event = Emitted | Finished | Failed


class Host:
    def __init__(self, settings: ServerSettings, metrics: Metrics, *, progress: bool | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.router = SchedulerRouter()
        self.models: dict[str, StoredModel] = {}  # served name -> stored model
        self.loaded_at: dict[str, int] = {}  # served name -> when it was loaded (unix time)
        self.tenants: dict[str, Tenant] = {}
        self.keys = KeyRing({})
        self.open_tenant: Tenant | None = None
        self.runtime: Runtime | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self._closed = False

    # ------------------------------------------------------------------------- loading

    def load(self) -> None:
        """Load every served model (fetching catalogue models if needed), start a scheduler
        per model, load every tenant's guest module. Sets `ready`; any failure is kept in
        `load_error` and raised."""
        try:
            self._load()
        except BaseException as e:
            self.load_error = e
            raise
        self.ready.set()

    def _load(self) -> None:
        s = self.settings
        torch.set_num_threads(s.compute_threads())
        self.runtime = Runtime.on_host(
            None if s.backend in (None, "auto") else s.backend, steps=self.router, modules=ModuleCache()
        )
        store = self.runtime.models
        for m in s.model_entries():
            started = time.perf_counter()
            where = s.resolve_path(m.path) if m.path is not None else m.name
            entry = store.store_source(catalogue.locate(where, name=m.name, progress=self.progress))
            self.models[m.name] = entry
            self.loaded_at[m.name] = int(time.time())
            self.router.add(
                BatchScheduler(
                    entry.model.transformer,
                    s.max_batch_tokens,
                    self.metrics.observer(m.name),
                    gather_s=s.batch_wait_ms / 1000,
                )
            )
            log.info(
                "model %s loaded in %.1f s (sha256 %s, %s)",
                m.name,
                time.perf_counter() - started,
                entry.sha256[:16],
                entry.model.backend.name,
            )
        served = list(self.models.items())
        modules: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        for t in s.effective_tenants():
            if t.guest not in modules:
                modules[t.guest] = (
                    self.runtime.default_module()
                    if t.guest == "default"
                    else self.runtime.load_module(s.resolve_path(t.guest))
                )
            tenant = Tenant.build(t, modules[t.guest], served)
            self.tenants[t.name] = tenant
            hashes.update({k: t.name for k in t.keys})
            if t.open:
                self.open_tenant = tenant
            self.runtime.instance(tenant.module, t.name, allowed=tenant.allowed, limits=tenant.limits).close()
        self.keys = KeyRing(hashes)
        log.info("serving %s to tenants %s", ", ".join(self.models), ", ".join(self.tenants))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.router.close()

    # ------------------------------------------------------------------------- lookups

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise ServiceUnavailable(f"the server failed to start: {self.load_error}")
        if not self.ready.is_set():
            raise ServiceUnavailable("the server is loading its models; retry shortly")

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        name = self.keys.tenant_of(key) if key else None
        if name is not None:
            return self.tenants[name]
        return self.open_tenant

    def model(self, tenant: Tenant, name: str) -> StoredModel:
        """The served model `name` if `tenant` may use it: UnknownModel (404) if no such
        model is served, PermissionDenied (403) if the tenant may not use it."""
        entry = self.models.get(name)
        if entry is None:
            raise UnknownModel(f"the model {name!r} does not exist on this server")
        tenant.check_model(name, entry)
        return entry

    def default_model(self, tenant: Tenant) -> str:
        for name, entry in self.models.items():
            if tenant.allowed(name) or tenant.allowed(entry.sha256):
                return name
        raise UnknownModel(f"tenant {tenant.name} may use no model on this server")

    def prompt_tokens(self, entry: StoredModel, prompt: str | None, messages: list[dict] | None) -> list[int]:
        """The prompt's tokens as the default guest makes them: the chat template's rendering
        of `messages`, or `prompt`; BOS by the model's rule, special tokens parsed."""
        if messages is not None:
            return entry.model.prompt_tokens(messages=messages)
        return entry.model.prompt_tokens(prompt=prompt or "")

    def check_context(self, entry: StoredModel, n_prompt: int) -> None:
        ctx = entry.model.config.context_length
        if n_prompt == 0:
            raise InvalidArgument("the prompt is empty")
        if n_prompt >= ctx:
            raise ContextOverflow(
                f"the prompt has {n_prompt} tokens; model {entry.model.name}'s context holds {ctx} "
                "(and at least one token must be generated)"
            )

    # ------------------------------------------------------------------------- running

    def start(
        self,
        tenant: Tenant,
        request: dict[str, Any],
        admission: Admission,
        cancel: threading.Event,
        *,
        prompt_tokens: int,
        max_tokens: int,
    ) -> AsyncIterator[Event]:
        """Start `request` in a fresh instance of the tenant's guest, on a thread of its own,
        now; the iterator yields one Emitted per realm_emit, then Finished or Failed.

        Setting `cancel` (the iterator does it when it is closed, e.g. on client disconnect)
        makes the guest's next realm_emit or realm_forward return REALM_E_CANCELLED. The
        admission is released when the guest has really stopped, and its sessions (KV
        caches) are freed then. The tenant is charged `prompt_tokens` plus the tokens the
        guest emitted (what the host saw, not what the guest reports). Call from the event
        loop's thread."""
        if self.runtime is None:
            admission.release(0)
            raise ServiceUnavailable("the server is not ready")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        runtime = self.runtime
        active = self.metrics.active.labels(tenant.name)
        emitted = [0]

        def put(event: Event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def on_token(token: int, text: str) -> None:
            if token >= 0:
                emitted[0] += 1
                if emitted[0] > max_tokens:
                    raise GuestFault(f"guest {tenant.module.name} emitted more than max_tokens ({max_tokens}) tokens")
            put(Emitted(token, text))  # RuntimeError once the loop is gone: the guest is stopped

        def work() -> None:
            try:
                with runtime.instance(
                    tenant.module, tenant.name, allowed=tenant.allowed, limits=tenant.limits
                ) as guest:
                    result = guest.generate(request, on_token=on_token, cancel=cancel)
                event: Event = Finished(result)
            except BaseException as e:  # every failure goes to the caller; the thread ends
                if not isinstance(e, RealmError):
                    log.exception("[%s] request failed in the host", tenant.name)
                event = Failed(e)
            finally:
                admission.release(prompt_tokens + emitted[0])
                active.dec()
            try:
                put(event)
            except RuntimeError:  # the event loop has closed: nobody is listening
                pass

        active.inc()
        try:
            threading.Thread(target=work, name=f"realm-guest-{tenant.name}", daemon=True).start()
        except BaseException:
            admission.release(0)
            active.dec()
            raise
        return _events(queue, cancel)


async def _events(queue: asyncio.Queue[Event], cancel: threading.Event) -> AsyncIterator[Event]:
    try:
        while True:
            event = await queue.get()
            yield event
            if not isinstance(event, Emitted):
                return
    finally:
        cancel.set()  # a no-op once the guest has finished; stops it if the consumer left


def describe_failure(error: BaseException) -> RealmError:
    """The RealmError to report for a request's failure (a non-Realm exception is a fault
    of the server: InternalError, details in the log)."""
    if isinstance(error, RealmError):
        return error
    return InternalError(f"internal error ({type(error).__name__}); details are in the server's log")


def is_guest_trap(error: BaseException) -> bool:
    return isinstance(error, (GuestFault, AbiVersionMismatch))
