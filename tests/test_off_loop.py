"""realm/server/off_loop.py: blocking work off the event loop leaves no thread behind."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch

from realm.server.off_loop import off_loop


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work(n: int, scale: float = 1.0) -> float:
    """A matrix product big enough for PyTorch to run it on an OpenMP team."""
    a = torch.full((n, n), scale)
    return float((a @ a).sum())


def test_the_thread_and_its_openmp_team_end_with_the_call() -> None:
    async def main() -> int:  # as a server's loop: still running after the call
        before = os_threads()
        assert await off_loop(parallel_work, 512, scale=0.5) == pytest.approx(512**3 * 0.25)
        deadline = time.monotonic() + 5
        while os_threads() > before and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return os_threads() - before

    assert asyncio.run(main()) <= 0  # asyncio.to_thread leaves its pool's thread, and that thread's team


def test_an_exception_reaches_the_awaiting_task() -> None:
    async def main() -> None:
        await off_loop(int, "not a number")

    with pytest.raises(ValueError, match="not a number"):
        asyncio.run(main())
