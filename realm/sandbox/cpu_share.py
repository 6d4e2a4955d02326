"""A guest's share of the CPU: one that runs on its own for longer than a slice is demoted.

Guests run on threads of their own, beside the model runners' compute threads and every
other tenant's guests. An honest guest spends its time waiting for model steps and runs for
tens of microseconds between them (sampling); a hostile one spins in WebAssembly, floods
the host with cheap calls, or sweeps its memory. A guest whose thread has used more than
`SLICE_S` of CPU time since it last waited for a batched model step (its WebAssembly and
the host calls it runs on its own thread both count) is demoted for the rest of the run:

* its thread runs at idle priority (Linux `SCHED_IDLE`: the OS gives it a core only when no
  other thread wants one), so a spinning guest takes no core from anyone else;
* each of its host calls first sleeps `PAUSE_S`, holding no GIL, so a flood of host calls
  cannot keep the host's Python threads (the event loop, the model runners, other guests)
  waiting for the GIL.

An honest guest is never demoted, and the check costs it one clock read per model step.
The thread gets its priority back when the run ends, where the OS lets it (leaving
`SCHED_IDLE` needs CAP_SYS_NICE or RLIMIT_NICE; the server runs each request on a thread of
its own, which ends with the request).
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("realm.sandbox")

SLICE_S = 0.05
"""CPU time a guest may use on its own between model steps before it is demoted."""

PAUSE_S = 0.001
"""How long each host call of a demoted guest first sleeps."""

_IDLE = getattr(os, "SCHED_IDLE", None)  # Linux only; elsewhere a demoted guest only pauses
_restore_refused = False


class CpuShare:
    """One guest's CPU clock and whether it is demoted; used on the thread that runs it."""

    def __init__(self) -> None:
        self.rested_at = 0.0  # thread CPU time when the guest last waited for a model step
        self.demoted = False
        self.demotions = 0  # over the instance's life: a guest demoted at least once shows here
        self._thread_id = 0
        self._policy: int | None = None  # the thread's scheduling policy before demotion

    def start(self) -> None:
        """A run of guest code begins on this thread."""
        self._thread_id = threading.get_native_id()
        self.rested_at = time.thread_time()

    def rested(self) -> None:
        """The guest has just waited for a model step: its slice starts again."""
        self.rested_at = time.thread_time()

    def check(self) -> None:
        """Demote the guest if it has used more than its slice (on the guest's thread)."""
        if not self.demoted and time.thread_time() - self.rested_at > SLICE_S:
            self.demoted = True
            self.demotions += 1
            if _IDLE is not None:
                try:
                    policy = os.sched_getscheduler(self._thread_id)
                    os.sched_setscheduler(self._thread_id, _IDLE, os.sched_param(0))
                    self._policy = policy
                except OSError as e:  # e.g. a sandbox that forbids it: the pauses still hold
                    log.debug("cannot demote guest thread %d: %s", self._thread_id, e)

    def pause(self) -> None:
        """Before a host call: a demoted guest waits, holding no GIL."""
        if self.demoted:
            time.sleep(PAUSE_S)

    def end(self) -> None:
        """The run is over: give the thread its scheduling policy back (where allowed)."""
        global _restore_refused
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
