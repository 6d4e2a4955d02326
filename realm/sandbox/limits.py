"""What one guest instance may use: memory, time and the host resources it may hold."""

from __future__ import annotations

from dataclasses import dataclass

from realm.errors import InvalidArgument


@dataclass(frozen=True)
class Limits:
    """What one guest instance may use."""

    memory_bytes: int = 256 << 20  # linear memory cap (memory.grow beyond it returns -1)
    guest_seconds: float = 30.0  # time running WebAssembly per request (host calls not counted)
    wall_seconds: float = 600.0  # a whole request, host calls included
    max_sessions: int = 8  # sessions open at once
    max_grammars: int = 8  # grammars (realm_grammar_compile) held at once
    max_log_messages: int = 1000  # realm_log calls kept per request

    def __post_init__(self) -> None:
        if self.memory_bytes < 65536:
            raise InvalidArgument("a guest's memory cap must be at least one 64 KiB page")
        if self.guest_seconds <= 0 or self.wall_seconds <= 0:
            raise InvalidArgument("a guest's time limits must be > 0")
