"""Continuous batching: the forward steps of every waiting session, of every tenant, in one
backend call.

Guests run on their own threads and call `BatchScheduler.step()`, which blocks until the
model runner thread has run that step. Each round the runner takes every waiting decode
step (one token each: cheap, and where batching wins, since the weights are read once for
all) and fills the rest of a token budget with pieces of waiting prompts, taken from
tenants in turn so that one tenant's flood of long prompts cannot starve another's.
A long prompt runs a piece per round, so it never stalls everyone else's decoding, and a
round that runs anything besides one prompt takes half the budget, so that a step waits
for short rounds only: on 2 cores (AMD EPYC, smollm2, benchmarks/flood.py) a round of 256
prompt tokens takes ~0.3 s, and another tenant's request that arrived during a flood of 100
got its first token after 0.37-0.69 s with whole-budget rounds, 0.26-0.37 s with half;
the flood finished no later. A prompt alone keeps the whole budget (gemma3, a 2,300-token
prompt at half the budget: 3.6 s instead of 2.9).

`plan_round` is the whole policy, pure Python, with no torch in it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from realm.engine import model_activity
from realm.engine.session import Session
from realm.errors import InternalError, InvalidArgument
from realm.models.transformer import Transformer

T = TypeVar("T")


class Handoff(Generic[T]):
    """One step's (or call's) outcome, passed from the runner to the thread waiting for it.

    A bare lock rather than a `concurrent.futures.Future`: its waiter wakes once and takes
    the GIL once, where a Future's condition variable can wake it into a lock the runner
    still holds, one more sleep and wake-up for every guest at the end of every round."""

    __slots__ = ("_done", "_outcome")
    _outcome: T | BaseException  # set once, before `_done` is released

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()

    def set_result(self, value: T) -> None:
        self._outcome = value
        self._done.release()

    def set_exception(self, error: BaseException) -> None:
        self._outcome = error
        self._done.release()

    def result(self) -> T:
        with self._done:
            if isinstance(self._outcome, BaseException):
                raise self._outcome
            return self._outcome


@dataclass
class StepRequest:
    """One session's next tokens, waiting to run."""

    session: Session
    tokens: list[int]
    tenant: str
    outcome: Handoff[np.ndarray] = field(default_factory=Handoff)
    done: int = 0  # tokens already run (a prompt runs in pieces)
    allowed: torch.Tensor | None = None  # a mask on the token after the last (Session.chunk)

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done


def plan_round(waiting: Sequence[StepRequest], budget: int) -> list[tuple[StepRequest, int]]:
    """Which requests run this round, and how many of their tokens: all single-token steps
    first, then prompt pieces round-robin by tenant until `budget` tokens are planned (half
    of it if anything but one prompt waits). Every request in `waiting` that is not planned
    keeps its place."""
    if len(waiting) > 1:
        budget = max(1, budget // 2)
    plan: list[tuple[StepRequest, int]] = []
    used = 0
    for r in waiting:
        if r.remaining == 1:
            plan.append((r, 1))
            used += 1
    by_tenant: dict[str, deque[StepRequest]] = {}
    for r in waiting:
        if r.remaining > 1:
            by_tenant.setdefault(r.tenant, deque()).append(r)
    queues = deque(by_tenant.values())
    while queues and used < budget:
        queue = queues.popleft()
        r = queue.popleft()
        n = min(r.remaining, budget - used)
        plan.append((r, n))
        used += n
        if queue:
            queues.append(queue)
    if not plan and waiting:  # a budget smaller than one piece still makes progress
        plan.append((waiting[0], min(waiting[0].remaining, max(1, budget))))
    return plan


RUNNER_IDLE_S = 0.25
"""How long a model's runner thread waits for a step before it ends; the next step starts
a new one (a fraction of a millisecond). A thread that has run a parallel PyTorch operation
keeps an OpenMP team of its own while it lives, and once a process holds more OpenMP
threads than cores, libgomp stops spinning at its barriers (GOMP_SPINCOUNT no longer
applies): every parallel region then puts its threads to sleep and wakes them again. So an
idle model's runner that lived on would slow every other model's steps. Measured
(benchmarks/two_models.py, AMD EPYC, 2 cores, one streaming client): with smollm2 and
gemma3 loaded, smollm2 decoded at 8-9 ms a token until gemma3 had served one request, then
at 17-27 ms for as long as the server ran; with this, at 8-9 ms again. Two models decoding
at once still share the cores (each thread's team is then both needed and throttled), and
do better so than one after the other on a single thread (x1.45 their tokens/s together)."""

StepObserver = Callable[[int, int, int], None]
"""Called after each batched call with (sequences, tokens, requests still waiting)."""


class BatchScheduler:
    """The model runner thread for one model, and the queue that feeds it."""

    def __init__(
        self,
        transformer: Transformer,
        max_batch_tokens: int = 256,
        observer: StepObserver | None = None,
        gather_s: float = 0.0,
    ) -> None:
        """`gather_s`: how long a round may wait for the sessions of the previous round to
        send their next step (their guests sample between steps), so that they run together
        rather than in fragments; 0 starts a round as soon as anything waits."""
        self.transformer = transformer
        self.max_batch_tokens = max_batch_tokens
        self.observer = observer
        self.gather_s = gather_s
        self._waiting: list[StepRequest] = []
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None  # the runner, while it has steps to run
        self._watched: weakref.WeakSet[Session] = weakref.WeakSet()  # sessions whose end wakes the runner
        self._calls: list[tuple[Callable[[], Any], Handoff[Any]]] = []  # other model work (`call`)

    def step(
        self, session: Session, tokens: Sequence[int], tenant: str = "", allowed: torch.Tensor | None = None
    ) -> np.ndarray:
        """Run `tokens` for `session` (batched with whatever else is waiting); returns the
        logits of the last token, (vocab,) float32 (see StepRunner). Blocks until done."""
        if not tokens:
            raise InvalidArgument("no tokens to run")
        session.check(tokens)
        request = StepRequest(session, list(tokens), tenant, allowed=allowed)
        with self._wake:
            if self._closed:
                raise InternalError("the model runner has shut down")
            self._waiting.append(request)
            self._wake_runner()
        return request.outcome.result()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()`, model work other than a step (a guest's per-layer or per-operation
        request), run on the runner thread between rounds; blocks until it has run. On a
        thread of the caller's own, the kernels' parallel regions would give that thread an
        OpenMP team of its own while it lives (RUNNER_IDLE_S says what that costs)."""
        outcome: Handoff[T] = Handoff()
        with self._wake:
            if self._closed:
                raise InternalError("the model runner has shut down")
            self._calls.append((fn, outcome))
            self._wake_runner()
        return outcome.result()

    def _wake_runner(self) -> None:
        """(With the lock held.) Start the runner if it has ended, else wake it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="realm-model-runner", daemon=True)
            self._thread.start()
        self._wake.notify()

    @property
    def queue_depth(self) -> int:
        with self._wake:
            return len(self._waiting)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        # sessions whose step finished last round: likely back soon, unless they have ended
        previous: weakref.WeakSet[Session] = weakref.WeakSet()
        while True:
            with self._wake:
                while not self._waiting and not self._calls and not self._closed:
                    if not self._wake.wait(RUNNER_IDLE_S) and not self._waiting and not self._calls:
                        self._thread = None  # the next step starts another
                        return
                if self._closed:
                    for r in self._waiting:
                        r.outcome.set_exception(InternalError("the model runner has shut down"))
                    for _, outcome in self._calls:
                        outcome.set_exception(InternalError("the model runner has shut down"))
                    return
                calls, self._calls = self._calls, []
            if calls:
                with model_activity.computing():
                    _run_calls(calls)
                continue
            with self._wake:
                if previous and self.gather_s > 0:
                    deadline = time.monotonic() + self.gather_s
                    while not self._closed and not self._calls and not self._all_back(previous):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._wake.wait(left)
                if self._closed:
                    continue
                plan = plan_round(self._waiting, self.max_batch_tokens)
            previous = weakref.WeakSet(r.session for r, n in plan if r.remaining == n)
            self._watch(previous)  # in a call of its own: no loop variable left holding a session
            with model_activity.computing():
                self._run_round(plan)
            del plan  # hold no session while waiting: one that ends meanwhile gives its KV blocks back now

    def _all_back(self, sessions: weakref.WeakSet[Session]) -> bool:
        waiting = {id(r.session) for r in self._waiting}
        return all(id(s) in waiting for s in sessions)

    def _watch(self, sessions: weakref.WeakSet[Session]) -> None:
        """Wake the runner when one of `sessions` ends, so that a round gathering the previous
        round's sessions stops waiting for one that will not come back (a request that has
        finished: with eight streams, one round in eight waited `gather_s` for nothing)."""
        for session in sessions:
            if session not in self._watched:
                self._watched.add(session)
                weakref.finalize(session, self._session_ended)

    def _session_ended(self) -> None:
        with self._wake:
            self._wake.notify()

    def _run_round(self, plan: list[tuple[StepRequest, int]]) -> None:
        chunks = [
            r.session.chunk(r.tokens[r.done : r.done + n], allowed=r.allowed if r.done + n == len(r.tokens) else None)
            for r, n in plan
        ]
        try:
            self.transformer.forward(chunks)
        except Exception as exc:  # a failed batch fails its requests, never the runner
            with self._wake:
                for r, _ in plan:
                    self._waiting.remove(r)
            for r, _ in plan:
                r.outcome.set_exception(exc)
            return
        finished, last = [], []
        for (r, n), chunk in zip(plan, chunks):
            logits = r.session.commit(chunk)
            r.done += n
            if r.remaining == 0:
                finished.append(r)
                last.append(logits[-1:])
        with self._wake:
            for r in finished:
                self._waiting.remove(r)
            waiting = len(self._waiting)
        if finished:
            for r, row in zip(finished, _host_rows(last)):
                r.outcome.set_result(row)
        if self.observer is not None:
            self.observer(len(chunks), sum(n for _, n in plan), waiting)


def _run_calls(calls: list[tuple[Callable[[], Any], Handoff[Any]]]) -> None:
    for fn, outcome in calls:
        try:
            value = fn()
        except BaseException as e:  # the caller's to handle, never the runner's
            outcome.set_exception(e)
        else:
            outcome.set_result(value)


def _host_rows(last: list[torch.Tensor]) -> list[np.ndarray]:
    """Each finished request's logits (1, vocab) as a float32 row in host memory: on the CPU
    a view of the round's logits, with no copy (gemma3 at 8 sequences: 8 MiB a round that
    would also stay fragmented in the heap); off it, one transfer for the whole round."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in last):
        return [t[0].numpy() for t in last]
    return list(torch.cat(last).float().cpu().numpy())
