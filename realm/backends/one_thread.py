"""PyTorch work on the calling thread alone: no OpenMP team, one core at most.

libgomp gives each thread that runs a parallel region a team of worker threads for as long as
that thread lives, and once the process holds more OpenMP threads than cores it stops spinning
at its barriers, which slows every model runner's steps (engine/scheduler.py, RUNNER_IDLE_S).
A guest's own arithmetic (`realm_matmul_cpu`) runs on the guest's thread and counts in its
tenant's CPU share, as its WebAssembly does: with this it takes one core and starts no team.

PyTorch's float32 matmul is MKL's, whose thread count is set apart from OpenMP's; both are set
for this thread only (OpenMP's count is per thread; MKL's `MKL_Set_Num_Threads_Local` overrides
its global one on this thread), then put back. With one but not the other, a 256^3 matmul took
5x longer than either alone. A PyTorch without libgomp or MKL runs the work as it would.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


@functools.cache
def _controls() -> tuple[Callable[[], int], Callable[[int], None], Callable[[int], int]] | None:
    """(omp_get_max_threads, omp_set_num_threads, MKL_Set_Num_Threads_Local) as PyTorch's CPU
    library sees them (dlsym on it searches the libraries it loaded too), or None."""
    torch_cpu = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not torch_cpu.exists():
        return None
    lib = ctypes.CDLL(str(torch_cpu))
    omp_get = getattr(lib, "omp_get_max_threads", None)
    omp_set = getattr(lib, "omp_set_num_threads", None)
    mkl_set_local = getattr(lib, "MKL_Set_Num_Threads_Local", None)
    if omp_get is None or omp_set is None or mkl_set_local is None:
        return None
    return omp_get, omp_set, mkl_set_local


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch operations inside run on this thread only."""
    controls = _controls()
    if controls is None:
        yield
        return
    omp_get, omp_set, mkl_set_local = controls
    torch.get_num_threads()  # PyTorch sets this thread's OpenMP count when first used: let it, before ours
    before = omp_get()
    omp_set(1)
    mkl_before = mkl_set_local(1)
    try:
        yield
    finally:
        omp_set(before)
        mkl_set_local(mkl_before)
