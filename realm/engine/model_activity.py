"""Whether the model runners are computing, or did a moment ago: a guest that has spent its
CPU share spinning waits for a quiet moment instead of running beside them
(realm/sandbox/cpu_share.py).

On 2 cores a step's two compute threads need both; a spinning guest at idle priority still
takes a core whenever a step's thread sleeps between parallel regions, and its memory
traffic and caches stay in the step's way. Steps come back to back while any sequence
decodes (its guest samples for tens of microseconds between them), so "quiet" means no step
for `QUIET_S`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_S = 0.02
"""How long after the last model work the runners count as quiet: longer than a decoding
guest's gap between steps, shorter than a step."""

_lock = threading.Lock()
_running = 0
_ended_at = float("-inf")


@contextmanager
def computing() -> Iterator[None]:
    """Model work runs inside this (a batched round, a guest's per-layer call)."""
    global _running, _ended_at
    with _lock:
        _running += 1
    try:
        yield
    finally:
        with _lock:
            _running -= 1
            _ended_at = time.monotonic()


def quiet() -> bool:
    """Whether no model work runs now or has run in the last QUIET_S."""
    with _lock:
        return _running == 0 and time.monotonic() - _ended_at >= QUIET_S
