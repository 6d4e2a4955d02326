"""What the host keeps for one guest instance while its code runs: the models it holds, the
sessions it opened, the request in progress and the clocks of its limits.

Host functions (realm/sandbox/host_*.py) read and change this state; the instance
(realm/sandbox/instance.py) creates it, installs it for the thread that runs the guest,
and clears up after each request.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import wasmtime

from realm.backends.devices import BackendRegistry
from realm.engine.grammar import Grammar, GrammarCache
from realm.engine.layer_step import LayerStep
from realm.engine.logprobs import TokenLogprobs
from realm.engine.model_store import Allowed, ModelStore, StoredModel
from realm.engine.session import Session
from realm.engine.steps import StepRunner
from realm.errors import LimitExceeded, NotFound, UnknownModel
from realm.sandbox.cpu_share import CpuBudget, CpuShare
from realm.sandbox.limits import Limits

CANCEL_GRACE_S = 1.0
"""Time left to a guest told that its caller went away, then it is stopped."""

_session_handles = itertools.count(1)
"""Session handles are unique in the process: another instance's handle is never ours."""
_grammar_handles = itertools.count(1)

_current = threading.local()


def current() -> GuestState | None:
    """The state of the guest this thread is running (None outside a guest call)."""
    return getattr(_current, "state", None)


def install(state: GuestState | None) -> GuestState | None:
    """Make `state` the current guest of this thread; returns the previous one."""
    previous = getattr(_current, "state", None)
    _current.state = state
    return previous


@dataclass(frozen=True)
class HostServices:
    """The engine parts host functions reach: shared by every guest of a runtime."""

    models: ModelStore
    backends: BackendRegistry
    steps: StepRunner
    grammars: GrammarCache  # compiled constraints, per tenant


@dataclass
class HostSession:
    handle: int
    entry: StoredModel
    session: Session
    layer_step: LayerStep | None = None  # a per-layer step between realm_embed and realm_logits
    grammar: Grammar | None = None  # its mask applies to every realm_forward (realm_session_set_grammar)
    mask: np.ndarray | None = None  # (words,) uint32: applies to the next realm_forward only
    bias: tuple[np.ndarray, np.ndarray] | None = None  # token ids, float32 biases: the next one only
    last_logits: np.ndarray | None = None  # (vocab,) float32 of its last step, for realm_logprobs


@dataclass
class Call:
    """One request: its JSON, where output goes, and what the guest reported."""

    payload: bytes
    on_token: Callable[[int, str], None] | None = None
    on_logprobs: Callable[[TokenLogprobs], None] | None = None  # before on_token, for the token it reports
    cancel: threading.Event | None = None
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish: tuple[int, int, int] | None = None  # reason, prompt tokens, completion tokens
    pending_logprobs: TokenLogprobs | None = None  # realm_logprobs' report for the next token emitted
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of the tokens emitted, in order
    logs: int = 0
    cache: dict[str, Any] = field(default_factory=dict)  # last tokenize / template result


class GuestState:
    def __init__(
        self,
        name: str,
        tenant: str,
        host: HostServices,
        limits: Limits,
        allowed: Allowed | None,
        memory64: bool,
        cpu: CpuBudget,
    ) -> None:
        self.name = name
        self.tenant = tenant
        self.host = host
        self.limits = limits
        self.allowed = allowed
        self.mask = (1 << 64) - 1 if memory64 else (1 << 32) - 1
        self.memory: wasmtime.Memory | None = None  # the instance's exported wasmtime Memory
        self.models: dict[int, StoredModel] = {}  # ids this guest holds a reference to
        self.sessions: dict[int, HostSession] = {}
        self.grammars: dict[int, Grammar] = {}  # realm_grammar_compile's handles
        self.call: Call | None = None
        self.last_error: str | None = None
        self.host_calls = 0
        # limits: time in wasm (host calls excluded) against the budget, and wall time
        self.guest_seconds = 0.0
        self.resumed_at = 0.0
        self.wall_deadline = float("inf")
        self.fault: str | None = None  # why the host stopped the guest (limits), if it did
        self.cancelled_at: float | None = None  # when the guest was first told to stop
        self.stopping = False  # its deadline is set to stop it (after a fault)
        self.cpu = CpuShare(cpu)  # its tenant's share of the CPU: demoted beyond it

    # -- clocks ---------------------------------------------------------------------

    def start_clock(self) -> None:
        self.guest_seconds = 0.0
        self.fault = None
        self.cancelled_at = None
        self.stopping = False
        self.resumed_at = time.perf_counter()
        self.wall_deadline = self.resumed_at + self.limits.wall_seconds
        self.cpu.start()

    def told_to_stop(self, now: float, running: float = 0.0) -> None:
        """Its caller went away: the guest has CANCEL_GRACE_S more, then it is stopped.
        `running`: WebAssembly seconds it has run that guest_seconds does not hold yet."""
        if self.cancelled_at is None:
            self.cancelled_at = now
            self.wall_deadline = min(self.wall_deadline, now + CANCEL_GRACE_S)
            self.guest_seconds = max(self.guest_seconds, self.limits.guest_seconds - CANCEL_GRACE_S - running)

    def over_limit(self) -> str | None:
        """Why the guest must stop now (while it runs WebAssembly), or None. A guest that
        makes no host call learns of a cancelled request here too."""
        if self.fault is not None:
            return self.fault
        now = time.perf_counter()
        call = self.call
        if call is not None and call.cancel is not None and call.cancel.is_set():
            self.told_to_stop(now, now - self.resumed_at)
        over_time = self.guest_seconds + (now - self.resumed_at) > self.limits.guest_seconds
        if self.cancelled_at is not None and (over_time or now > self.wall_deadline):
            return f"did not stop within {CANCEL_GRACE_S:g} s of being told that its caller went away"
        if over_time:
            return (
                f"ran past its time limit of {self.limits.guest_seconds:g} s running WebAssembly "
                "(host calls not counted)"
            )
        if now > self.wall_deadline:
            return f"ran past its wall-clock limit of {self.limits.wall_seconds:g} s"
        return None

    # -- lookups --------------------------------------------------------------------

    def model(self, model_id: int) -> StoredModel:
        """A model this guest holds; UnknownModel if the id was never issued, NotFound if it
        was issued but this guest does not hold it (released, or never stored by it)."""
        entry = self.models.get(model_id)
        if entry is not None:
            return entry
        if self.host.models.was_issued(model_id):
            raise NotFound(f"model id {model_id} is not held by this guest (released, or stored by another)")
        raise UnknownModel(f"no model has id {model_id}")

    def hold(self, entry: StoredModel) -> None:
        """Keep one reference per model per guest: a second store of it gives the extra back."""
        if entry.id in self.models:
            self.host.models.release(entry.id)
        else:
            self.models[entry.id] = entry

    def release(self, model_id: int) -> None:
        self.model(model_id)
        del self.models[model_id]
        self.host.models.release(model_id)

    def session(self, handle: int) -> HostSession:
        s = self.sessions.get(handle)
        if s is None:
            raise NotFound(f"session {handle} does not exist or belongs to another guest")
        return s

    def open_session(self, entry: StoredModel, context_length: int) -> HostSession:
        if len(self.sessions) >= self.limits.max_sessions:
            raise LimitExceeded(f"a guest may hold at most {self.limits.max_sessions} sessions at once")
        s = HostSession(next(_session_handles), entry, entry.model.new_session(context_length or None))
        self.sessions[s.handle] = s
        return s

    def close_sessions(self) -> None:
        """Frees what a request holds: its sessions (KV caches) and its grammars."""
        self.sessions.clear()
        self.grammars.clear()

    def grammar(self, handle: int) -> Grammar:
        g = self.grammars.get(handle)
        if g is None:
            raise NotFound(f"grammar {handle} does not exist or belongs to another guest")
        return g

    def add_grammar(self, grammar: Grammar) -> int:
        if len(self.grammars) >= self.limits.max_grammars:
            raise LimitExceeded(f"a guest may hold at most {self.limits.max_grammars} grammars at once")
        handle = next(_grammar_handles)
        self.grammars[handle] = grammar
        return handle

    def release_models(self) -> None:
        for model_id in list(self.models):
            del self.models[model_id]
            self.host.models.release(model_id)
