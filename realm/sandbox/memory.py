"""Bounds-checked access to a guest's linear memory, for the length of one host call.

Linear memory moves when it grows, so its address and size are read afresh when a host
call begins (a `GuestMemory` never outlives the call that made it). Every pointer and
length is checked against the current size before a byte is touched; reads and writes are
single memmoves (the logits of one step, 49152 to 262144 floats, are one copy).

Host calls keep the GIL while they read the memory's address and size and while they copy
up to `HELD_COPY` bytes. ctypes gives the GIL up around every foreign call; with many
guests running, each such call waits its turn behind every other thread to get it back,
which costs far more than the microseconds of work in between.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
import wasmtime

from realm.errors import LimitExceeded, OutOfBounds
from realm.sandbox.wasmtime_bridge import StoreContext, memory_span

MAX_TRANSFER = 64 * 1024 * 1024
"""The most bytes one host call copies in or out of guest memory (REALM_MAX_TRANSFER)."""

HELD_COPY = 1024 * 1024
"""Copies up to this size keep the GIL (a step's logits do); larger ones let other threads run."""


_held_memmove = ctypes.PyDLL(None).memmove  # the C library's memmove, called without giving up the GIL
_held_memmove.restype, _held_memmove.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _copy(dst: int, src: Any, nbytes: int) -> None:
    (_held_memmove if nbytes <= HELD_COPY else ctypes.memmove)(dst, src, nbytes)


class GuestMemory:
    """A guest's linear memory as it is during one host call (or, from a test, between calls)."""

    __slots__ = ("base", "size")

    def __init__(self, memory: wasmtime.Memory, store: StoreContext) -> None:
        self.base, self.size = memory_span(memory, store)

    def address(self, ptr: int, nbytes: int, what: str = "buffer") -> int:
        """The host address of guest bytes [ptr, ptr + nbytes); OutOfBounds if outside memory."""
        if nbytes < 0 or ptr < 0 or ptr + nbytes > self.size:
            raise OutOfBounds(f"{what} at {ptr:#x} of {nbytes} bytes is outside the guest's memory ({self.size} bytes)")
        return self.base + ptr

    def read(self, ptr: int, nbytes: int, what: str = "buffer", limit: int = MAX_TRANSFER) -> bytes:
        _cap(nbytes, limit, what)
        return bytes(self.view(ptr, nbytes, what))

    def view(self, ptr: int, nbytes: int, what: str = "buffer") -> memoryview:
        """Zero-copy view of guest bytes: valid only until the host call returns."""
        addr = self.address(ptr, nbytes, what)
        if not nbytes:
            return memoryview(b"")
        return memoryview((ctypes.c_ubyte * nbytes).from_address(addr)).cast("B")

    def read_array(self, ptr: int, count: int, dtype: np.dtype | type, what: str = "array") -> np.ndarray:
        """A copy of `count` elements of `dtype` (little endian, any alignment): one memmove."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        _cap(nbytes, MAX_TRANSFER, what)
        addr = self.address(ptr, nbytes, what)
        out = np.empty(count, dtype=dtype)
        if nbytes:
            _copy(out.ctypes.data, addr, nbytes)
        return out

    def write(self, ptr: int, data: bytes | bytearray | memoryview, what: str = "buffer") -> int:
        n = len(data)
        _cap(n, MAX_TRANSFER, what)
        if n:
            _copy(self.address(ptr, n, what), bytes(data) if isinstance(data, memoryview) else data, n)
        return n

    def write_floats(self, ptr: int, values: torch.Tensor | np.ndarray, what: str = "output") -> int:
        """Copy a float32 tensor/array into guest memory in one memmove; returns elements written."""
        if isinstance(values, torch.Tensor):
            t = values.detach()
            if t.dtype != torch.float32:
                t = t.float()
            t = t.contiguous().cpu()
            n, src = t.numel(), t.data_ptr()
        else:
            a = np.ascontiguousarray(values, dtype=np.float32)
            n, src = a.size, a.ctypes.data
        nbytes = n * 4
        _cap(nbytes, MAX_TRANSFER, what)
        if n:
            _copy(self.address(ptr, nbytes, what), src, nbytes)
        return n

    def read_floats(self, ptr: int, count: int, what: str = "input") -> torch.Tensor:
        """`count` float32 values as a new tensor: one memmove."""
        nbytes = count * 4
        _cap(nbytes, MAX_TRANSFER, what)
        addr = self.address(ptr, nbytes, what)
        out = torch.empty(count, dtype=torch.float32)
        if nbytes:
            _copy(out.data_ptr(), addr, nbytes)
        return out


def _cap(nbytes: int, limit: int, what: str) -> None:
    if nbytes > limit:
        raise LimitExceeded(f"{what} of {nbytes} bytes exceeds the per-call limit of {limit} bytes")
