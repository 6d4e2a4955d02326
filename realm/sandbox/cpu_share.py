"""A tenant's share of the CPU: its guests may run on their own for a share of one core;
beyond it they are demoted, so they take no core and no GIL that anyone else wants.

Guests run on threads of their own, beside the model runners' compute threads and every
other tenant's guests. An honest guest waits for model steps and runs for tens of
microseconds between them (sampling); a hostile one spins in WebAssembly, floods the host
with cheap calls, or sweeps its memory. The CPU time a guest's thread uses, WebAssembly and
host calls alike, except the model work it asks of the host (steps, layers, products with
its weights: the ABI table marks them), is taken from its tenant's `CpuBudget`, which
every guest of the tenant shares (so short requests do not each get a fresh allowance): it
refills at `TENANT_SHARE` of a core and holds at most `BURST_S`. A
guest is demoted for the rest of its run when it has used more than `SLICE_S` since it last
waited for a model step (a spinning or flooding guest), or finds its tenant's budget spent
(many guests, or many short requests); it is checked when it starts, at every model step
and every few epoch ticks while it runs WebAssembly. Demoted:

* its thread runs at idle priority (Linux `SCHED_IDLE`: the OS gives it a core only when no
  other thread wants one), so a spinning guest takes no core from anyone else;
* while it keeps running on its own past its slice and its tenant's budget is spent, it
  waits at each epoch check until the budget has refilled (`hold`), so a tenant's
  spinning guests get TENANT_SHARE of a core between them, not every idle core (memory
  sweeps take memory bandwidth even from idle cores);
* once it has run on its own for YIELD_AFTER_S since it last waited for a model step, it
  yields to compute: while any model runner computes (realm/engine/model_activity.py) it
  waits, at each epoch check (every tick once demoted) and before each host call, but
  for one tick or call of its tenant's each DEMOTED_TURN_S, so that it is slow rather than
  stopped. Idle priority alone was not enough on 2 cores: a spinning guest still took a
  core whenever a step's thread slept between parallel regions, and another tenant's p99
  time per token rose by 1.5-2x beside four of them (benchmarks/noisy_neighbours.py);
* its host calls (but those that run the model) are paced at `DEMOTED_CALLS_PER_S` (in
  bursts of `DEMOTED_CALL_BURST`): a call over that rate first sleeps, holding no GIL. So
  a flood of host calls cannot keep the host's Python threads (the event loop, the model
  runners, other guests) waiting for the GIL, while a guest that makes a few host calls a
  token (a model step apart) is not slowed. Every guest's host calls are paced too, at
  `CALLS_PER_S`, so that a flood does not take the GIL from everyone else in the slice
  before its demotion; but not its `realm_matmul_cpu` and `_gpu` calls until it is
  demoted (abi.Cost).

An honest guest stays well inside both and is never demoted; what it pays is a clock read
and a lock per model step and per check. The thread gets its priority back when the run
ends, where the OS lets it (leaving `SCHED_IDLE` needs CAP_SYS_NICE or RLIMIT_NICE; the server runs
each request on a thread of its own, which ends with the request).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from realm.engine import model_activity

log = logging.getLogger("realm.sandbox")

TENANT_SHARE = 0.5
"""The fraction of one core a tenant's guests may use on their own before they are demoted.
The default guest uses under 2 ms before its first step and at most 0.3 ms a token after it
(both catalogue models), so an honest tenant stays far inside it."""

BURST_S = 0.5
"""The most CPU time a tenant's guests may use on their own in one burst."""

SLICE_S = 0.25
"""The most CPU time one guest may use on its own without waiting for a model step."""

CALLS_PER_S, CALL_BURST = 1000, 64
"""The host calls a second a guest may make, and at once before the pace holds it back
(the default guest makes 1 or 2 a token besides realm_forward, about 10 to set up)."""

DEMOTED_CALLS_PER_S, DEMOTED_CALL_BURST = 200, 8
"""The same for a demoted guest."""

YIELD_AFTER_S = 0.01
"""A demoted guest that has used this much CPU time on its own since it last waited for a
model step yields to the model runners (an honest guest samples for well under 1 ms)."""

DEMOTED_TURN_S = 2.0
"""While the model runners compute, a tenant's yielding guests get one tick (or one host
call) between them this often: a turn touches a token or two of a neighbour's stream, so
under 1% of them (at 1 s, gemma3's p99 beside memory sweeps rose x1.25; at 2 s, x0.93)."""

HOLD_TICK_S = 0.05
"""How often a held guest looks again whether it may run on."""

_IDLE = getattr(os, "SCHED_IDLE", None)  # Linux only; elsewhere a demoted guest only pauses
_restore_refused = False
T = TypeVar("T")


class CpuBudget:
    """One tenant's CPU time on its own: refills at TENANT_SHARE, holds BURST_S; its debt
    is bounded by BURST_S too, so a tenant that stops abusing it is trusted again within
    2 * BURST_S / TENANT_SHARE seconds."""

    def __init__(self) -> None:
        self._level = BURST_S
        self._at = time.monotonic()
        self._turn_at = 0.0  # time.monotonic() from which a yielding guest may run beside the models
        self._lock = threading.Lock()

    def take(self, seconds: float) -> bool:
        """Charge `seconds` of CPU time; whether any budget is left."""
        with self._lock:
            now = time.monotonic()
            self._level = max(-BURST_S, min(BURST_S, self._refilled(now) - seconds))
            self._at = now
            return self._level > 0

    def in_debt(self) -> bool:
        """Whether the budget, refilled up to now, is still spent."""
        with self._lock:
            return self._refilled(time.monotonic()) < 0

    def _refilled(self, now: float) -> float:
        """(With the lock held.) The level refilled up to `now`, before any bound."""
        return self._level + (now - self._at) * TENANT_SHARE

    def turn(self) -> bool:
        """Whether one of the tenant's yielding guests may run now beside the model runners
        (once each DEMOTED_TURN_S)."""
        with self._lock:
            now = time.monotonic()
            if now < self._turn_at:
                return False
            self._turn_at = now + DEMOTED_TURN_S
            return True


class CpuShare:
    """One guest's CPU clock and whether it is demoted; used on the thread that runs it."""

    def __init__(self, budget: CpuBudget) -> None:
        self.budget = budget
        self.demoted = False
        self.demotions = 0  # over the instance's life: a guest demoted at least once shows here
        self._charged_at = 0.0  # thread CPU time up to which the guest has been charged
        self._rested_at = 0.0  # thread CPU time when the guest last waited for a model step
        self._thread_id = 0
        self._policy: int | None = None  # the thread's scheduling policy before demotion
        self._calls = float(CALL_BURST)  # host calls it may make now without waiting
        self._calls_at = 0.0  # time.monotonic() when `_calls` was last brought up to date

    def start(self) -> None:
        """A run of guest code begins on this thread."""
        self._thread_id = threading.get_native_id()
        self._charged_at = self._rested_at = time.thread_time()
        self.check()

    def check(self) -> None:
        """Charge the CPU used since the last charge; demote the guest if it is over its slice
        or its tenant's budget is spent (on the guest's thread)."""
        now = time.thread_time()
        left = self.budget.take(now - self._charged_at)
        self._charged_at = now
        if not self.demoted and (not left or now - self._rested_at > SLICE_S):
            self._demote()

    def hold(self, stop: Callable[[], str | None]) -> str | None:
        """Wait while the guest may not run on (a tick at a time); why it must stop, if
        `stop()` says so meanwhile."""
        reason = stop()
        while reason is None and self._held():
            time.sleep(HOLD_TICK_S)
            reason = stop()
        return reason

    def _held(self) -> bool:
        spun = time.thread_time() - self._rested_at
        if spun > SLICE_S and self.budget.in_debt():  # spinning on a spent budget
            return True
        return self.demoted and spun > YIELD_AFTER_S and not model_activity.quiet() and not self.budget.turn()

    def waiting(self, step: Callable[[], T]) -> T:
        """Run `step`, model work the guest asked of the host (a batched step, a layer, a
        product with its weights), without charging the guest for it: a direct step runner
        computes on the guest's thread."""
        self.check()
        try:
            return step()
        finally:
            self._charged_at = self._rested_at = time.thread_time()

    def pause(self, stop: Callable[[], str | None]) -> str | None:
        """Before a host call: a guest over its pace waits for its turn, holding no GIL, and a
        demoted one yields to compute (`hold`); why it must stop, if `stop()` says so."""
        rate, burst = (DEMOTED_CALLS_PER_S, DEMOTED_CALL_BURST) if self.demoted else (CALLS_PER_S, CALL_BURST)
        now = time.monotonic()
        self._calls = min(burst, self._calls + (now - self._calls_at) * rate) - 1
        self._calls_at = now
        if self._calls < 0:
            time.sleep(-self._calls / rate)
        return self.hold(stop) if self.demoted else None

    def _demote(self) -> None:
        self.demoted = True
        self.demotions += 1
        if _IDLE is None:
            return
        try:
            policy = os.sched_getscheduler(self._thread_id)
            os.sched_setscheduler(self._thread_id, _IDLE, os.sched_param(0))
            self._policy = policy
        except OSError as e:  # e.g. a container that forbids it: the pauses still hold
            log.debug("cannot demote guest thread %d: %s", self._thread_id, e)

    def end(self) -> None:
        """The run is over: charge its last CPU time and give the thread its scheduling
        policy back (where the OS allows it)."""
        global _restore_refused
        self.budget.take(time.thread_time() - self._charged_at)
        if not self.demoted:
            return
        self.demoted = False
        if self._policy is None:
            return
        policy, self._policy = self._policy, None
        try:
            os.sched_setscheduler(self._thread_id, policy, os.sched_param(0))
        except PermissionError:
            if not _restore_refused:
                _restore_refused = True
                log.warning(
                    "a demoted guest's thread stays at idle priority: the OS refuses to raise it back "
                    "(needs CAP_SYS_NICE or RLIMIT_NICE)"
                )
