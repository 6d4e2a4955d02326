"""Blocking work off the event loop, each call on a thread of its own that ends with it.

Not `asyncio.to_thread`: its pool's threads live on, and a thread that has once run a
parallel PyTorch operation (loading a model, an embeddings batch) keeps an OpenMP thread
team of its own for as long as it lives. Once a process holds more OpenMP threads than
cores, libgomp stops spinning at its barriers (GOMP_SPINCOUNT no longer applies) and every
parallel region of the model runner's step puts its threads to sleep and wakes them again.
Measured (AMD EPYC, 2 cores, smollm2, one streaming client): after one /v1/embeddings
request on a pool thread, the runner's threads switched 8,500 times a second instead of
600; a Ray replica, which loads its models on demand, decoded at 15-20 ms a token
instead of 9. A thread that ends takes its team with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def off_loop(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread, awaited; its exception is raised here."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(outcome)  # type: ignore[arg-type]

    def run() -> None:
        try:
            outcome = context.run(fn, *args, **kwargs)
        except BaseException as e:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, e)
        else:
            loop.call_soon_threadsafe(settle, outcome, None)

    threading.Thread(target=run, name="realm-off-loop", daemon=True).start()
    return await done
