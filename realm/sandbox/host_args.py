"""Checked arguments of host functions: the guest's memory for one call, text, names, token
arrays and sizes, each refused with an error from realm/errors.py before any work is done."""

from __future__ import annotations

import numpy as np

from realm.errors import Cancelled, InternalError, InvalidArgument, LimitExceeded
from realm.sandbox.memory import MAX_TRANSFER, GuestMemory
from realm.sandbox.state import GuestState
from realm.sandbox.wasmtime_bridge import StoreContext

MAX_NAME = 256  # bytes of a model or tensor name


def guest_memory(st: GuestState, caller: StoreContext) -> GuestMemory:
    """The guest's linear memory for this call."""
    if st.memory is None:
        raise InternalError("the guest's memory is not available")
    return GuestMemory(st.memory, caller)


def utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def write_sized(mem: GuestMemory, out: int, cap: int, data: bytes, what: str) -> int:
    """The size convention: always return the size; write only if it fits in cap."""
    if len(data) > MAX_TRANSFER:
        raise LimitExceeded(f"{what} of {len(data)} bytes exceeds the per-call limit of {MAX_TRANSFER} bytes")
    if len(data) <= cap:
        mem.write(out, data, what)
    return len(data)


def non_negative(value: int, what: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{what} must be >= 0, got {value}")
    return value


def check_cancel(st: GuestState) -> None:
    """Cancelled if the caller of the request in progress went away."""
    call = st.call
    if call is not None and call.cancel is not None and call.cancel.is_set():
        raise Cancelled("the caller went away: stop generating and return")


def tokens(mem: GuestMemory, ptr: int, n: int, limit: int) -> list[int]:
    """n int32 token ids at ptr, 1 <= n <= limit."""
    if n <= 0:
        raise InvalidArgument(f"a step needs at least one token, got n = {n}")
    if n > limit:
        raise LimitExceeded(f"{n} tokens in one call exceed the limit of {limit}")
    return mem.read_array(ptr, n, np.int32, "tokens").tolist()


def name(mem: GuestMemory, ptr: int, length: int, what: str) -> str:
    """A model or tensor name: UTF-8, at most MAX_NAME bytes."""
    if length > MAX_NAME:
        raise InvalidArgument(f"{what} of {length} bytes is longer than {MAX_NAME}")
    return utf8(mem.read(ptr, length, what), what)
