"""A guest's own arithmetic (`realm_matmul_cpu`) runs on its thread alone: no OpenMP team."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

from realm.backends.devices import cpu_backend
from realm.backends.one_thread import one_thread


def _threads_while(work: Callable[[], None]) -> int:
    """How many threads appeared in the process while `work` ran on a new thread and are
    still there when it is done (a thread's OpenMP team lives as long as the thread).
    Counted by id, not net: another test's model runner ending in the meantime (it does,
    0.25 s after its last step) would hide a new one."""
    seen: list[int] = []

    def run() -> None:
        before = set(os.listdir("/proc/self/task"))
        work()
        seen.append(len(set(os.listdir("/proc/self/task")) - before))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


def test_a_cpu_matmul_starts_no_thread_and_gives_the_same_product() -> None:
    a, b = torch.randn(256, 300), torch.randn(300, 200)
    out: list[torch.Tensor] = []
    assert _threads_while(lambda: out.append(cpu_backend().matmul(a, b))) == 0
    torch.testing.assert_close(out[0], a @ b)
    if torch.get_num_threads() > 1:  # what it prevents: the same product outside starts a team
        assert _threads_while(lambda: out.append(a @ b)) > 0


def test_the_threads_own_counts_come_back_afterwards() -> None:
    def work() -> None:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before

    before = torch.get_num_threads()
    _threads_while(work)
