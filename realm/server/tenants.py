"""Tenants at run time: who they are, which guest and models they use, and their limits
(concurrent requests, tokens per minute, max_tokens per request, guest memory and time)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from realm.errors import InvalidArgument, LimitExceeded, PermissionDenied
from realm.sandbox.runtime import GuestModule, Limits
from realm.server.schemas import invalid
from realm.server.settings import ALL_MODELS, TenantSettings


class TokenBucket:
    """`per_minute` tokens, refilled continuously; a request reserves its worst case
    (prompt + max_tokens) up front and gives back what it did not use."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, n: int) -> None:
        """Reserve n tokens, or raise LimitExceeded with the seconds until they are there."""
        if n > self.capacity:
            raise InvalidArgument(
                f"this request may use {n} tokens (prompt + max_tokens); the tenant's limit is "
                f"{int(self.capacity)} tokens per minute: ask for fewer max_tokens"
            )
        with self._lock:
            self._refill()
            if self._tokens < n:
                wait = (n - self._tokens) / self.rate
                raise LimitExceeded(
                    f"over the tenant's limit of {int(self.capacity)} tokens per minute; retry in {wait:.1f} s",
                    retry_after_s=wait,
                )
            self._tokens -= n

    def settle(self, reserved: int, used: int) -> None:
        """A request that reserved `reserved` tokens used `used`: give back (or take) the difference."""
        with self._lock:
            self._refill()
            self._tokens = min(self.capacity, self._tokens + reserved - used)


Settle = Callable[[int], None]
"""Ends one admitted request: called once with the tokens it used."""


class Quota:
    """A tenant's admission rule in this process: at most `max_concurrent` requests at once
    and `tokens_per_minute` (a TokenBucket). Another process's rule (a cluster's, kept in
    one place) stands in for it with the same `admit`."""

    def __init__(self, tenant: str, max_concurrent: int, tokens_per_minute: int | None) -> None:
        self.tenant = tenant
        self.max_concurrent = max_concurrent
        self.bucket = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.active = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, settings: TenantSettings) -> Quota:
        return cls(settings.name, settings.limits.max_concurrent, settings.limits.tokens_per_minute)

    def admit(self, reserve: int) -> Settle:
        """A slot for one request that may use `reserve` tokens; LimitExceeded (429) if the
        tenant is at its concurrency limit or out of tokens for this minute."""
        cap = self.max_concurrent
        with self._lock:
            if self.active >= cap:
                raise LimitExceeded(
                    f"tenant {self.tenant} already has {cap} requests running (its limit); retry shortly",
                    retry_after_s=1.0,
                )
            self.active += 1
        try:
            if self.bucket is not None:
                self.bucket.take(reserve)
        except BaseException:
            self.leave(0, 0)
            raise
        return lambda used: self.leave(reserve, used)

    def leave(self, reserved: int, used: int) -> None:
        if self.bucket is not None and reserved:
            self.bucket.settle(reserved, used)
        with self._lock:
            self.active = max(0, self.active - 1)


class Admitter(Protocol):
    def admit(self, reserve: int) -> Settle: ...


@dataclass
class Tenant:
    settings: TenantSettings
    module: GuestModule
    allowed_names: set[str]  # names and SHA-256 hex of the served models it may use
    quota: Admitter  # a Quota, or a cluster's stand-in for it

    @classmethod
    def build(cls, settings: TenantSettings, module: GuestModule, served: Iterable[tuple[str, str]]) -> Tenant:
        """`served`: each served model's name and SHA-256 hex, loaded or not."""
        tenant = cls(settings, module, set(), Quota.of(settings))
        for name, sha in served:
            if ALL_MODELS in settings.models or name in settings.models:
                tenant.allowed_names |= {name, sha}
        return tenant

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def limits(self) -> Limits:
        lim = self.settings.limits
        return Limits(
            memory_bytes=lim.guest_memory_mb << 20, guest_seconds=lim.guest_seconds, wall_seconds=lim.wall_seconds
        )

    def allowed(self, name_or_sha: str) -> bool:
        """The sandbox's permission rule for this tenant (model_store.Allowed): served models
        it was given, by name or SHA-256; nothing else (no uploads, no other cached models)."""
        return name_or_sha in self.allowed_names

    def check_allowed(self, name: str, sha256: str) -> None:
        """PermissionDenied (403) unless the tenant may use the model `name` with content `sha256`."""
        if name not in self.allowed_names and sha256 not in self.allowed_names:
            raise PermissionDenied(f"tenant {self.name} may not use model {name}")

    def check_max_tokens(self, max_tokens: int) -> None:
        cap = self.settings.limits.max_tokens
        if max_tokens > cap:
            raise InvalidArgument(f"max_tokens {max_tokens} is over this tenant's limit of {cap} per request")

    def check_n(self, n: int) -> None:
        """n choices run as n requests at once: at most max_n, and never more than max_concurrent."""
        lim = self.settings.limits
        if n > lim.max_n:
            raise invalid(f"n {n} is over this tenant's limit of {lim.max_n} choices per request", "n")
        if n > lim.max_concurrent:
            raise invalid(
                f"n {n} is over this tenant's limit of {lim.max_concurrent} requests at once (each choice is one)", "n"
            )

    def admit_all(self, n: int, reserve: int) -> list[Admission]:
        """Slots for n requests that may use `reserve` tokens each, all or none (LimitExceeded)."""
        admitted: list[Admission] = []
        try:
            for _ in range(n):
                admitted.append(self.admit(reserve))
        except BaseException:
            for a in admitted:
                a.release(0)
            raise
        return admitted

    def admit(self, reserve: int) -> Admission:
        """A slot for one request that may use `reserve` tokens (the tenant's Quota decides)."""
        return Admission(self.quota.admit(reserve))


class Admission:
    """One admitted request; `release(used)` exactly once, when its guest has stopped."""

    def __init__(self, settle: Settle) -> None:
        self._settle = settle
        self._released = False
        self._lock = threading.Lock()

    def release(self, used: int) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._settle(used)


def retry_after_header(error: LimitExceeded) -> str | None:
    s = getattr(error, "retry_after_s", None)
    return None if s is None else str(max(1, math.ceil(s)))
