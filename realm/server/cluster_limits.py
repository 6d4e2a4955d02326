"""Tenants' limits across a Ray cluster: one actor holds every tenant's Quota (concurrent
requests, tokens per minute), and every replica asks it before it starts a request.

`ClusterLimits` is the actor's class: the same Quota a single server keeps in its own
process, one per tenant, so the cluster's rule is the single server's rule. `RemoteQuota`
stands in for a tenant's Quota inside a replica: `admit` asks the actor (one round trip)
and the request's end is told to it without waiting.

When the actor cannot be reached within `limits_timeout_s` (its node is gone, it is
restarting), the replica falls back to the tenant's limits kept in its own process, as a
single server would, for `FALLBACK_S` seconds before it asks the actor again: requests
keep being served and each replica still enforces the limits, so a tenant may get up to
(replicas x) its limits cluster-wide while the actor is away. Ray restarts the actor
(max_restarts=-1); a restarted actor starts with every tenant's counts at zero and a full
bucket, and a request that ends after the restart is not counted twice (counts never go
below zero).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from realm.errors import InvalidArgument, LimitExceeded
from realm.server.settings import TenantSettings
from realm.server.tenants import Quota, Settle

log = logging.getLogger("realm.server")

ACTOR_NAME = "realm-limits"
FALLBACK_S = 10.0
"""How long a replica keeps to its own limits after the actor failed to answer."""

Refusal = tuple[str, str, float | None]
"""An admission refused by the actor, as data: (error class name, message, retry_after_s)."""


class ClusterLimits:
    """Every tenant's Quota, in one actor. Its methods never raise: a refusal is data."""

    def __init__(self, tenants: list[dict[str, Any]]) -> None:
        self.quotas = {t["name"]: Quota.of(TenantSettings.model_validate(t)) for t in tenants}
        self.admitted = 0

    def admit(self, tenant: str, reserve: int) -> Refusal | None:
        try:
            self.quotas[tenant].admit(reserve)
        except (LimitExceeded, InvalidArgument) as e:
            return (type(e).__name__, str(e), getattr(e, "retry_after_s", None))
        self.admitted += 1
        return None

    def leave(self, tenant: str, reserved: int, used: int) -> None:
        self.quotas[tenant].leave(reserved, used)

    def active(self) -> dict[str, int]:
        """Requests running now, by tenant (what the tests and an operator look at)."""
        return {name: q.active for name, q in self.quotas.items()}


class RemoteQuota:
    """A tenant's admission in a replica: the cluster's actor decides; if it does not
    answer, this replica's own Quota for the tenant does (see the module's note)."""

    def __init__(self, actor: Any, settings: TenantSettings, timeout_s: float, on_fallback: Any = None) -> None:
        self.actor = actor
        self.tenant = settings.name
        self.local = Quota.of(settings)
        self.timeout_s = timeout_s
        self.on_fallback = on_fallback  # called (no arguments) each time a request is admitted locally
        self._lock = threading.Lock()
        self._local_until = 0.0

    def admit(self, reserve: int) -> Settle:
        if time.monotonic() >= self._local_until:
            try:
                refusal = ray.get(self.actor.admit.remote(self.tenant, reserve), timeout=self.timeout_s)
            except (GetTimeoutError, RayError) as e:
                with self._lock:
                    self._local_until = time.monotonic() + FALLBACK_S
                log.warning(
                    "the cluster's limits actor did not answer (%s): tenant %s is limited by this replica alone "
                    "for %.0f s",
                    type(e).__name__,
                    self.tenant,
                    FALLBACK_S,
                )
            else:
                if refusal is not None:
                    kind, message, retry = refusal
                    raise (
                        LimitExceeded(message, retry_after_s=retry)
                        if kind == "LimitExceeded"
                        else InvalidArgument(message)
                    )
                return self._settle_remote(reserve)
        settle = self.local.admit(reserve)
        if self.on_fallback is not None:
            self.on_fallback()
        return settle

    def _settle_remote(self, reserve: int) -> Settle:
        actor, tenant = self.actor, self.tenant

        def settle(used: int) -> None:
            try:
                actor.leave.remote(tenant, reserve, used)  # not waited for: the actor may be gone
            except RayError as e:
                log.warning("could not tell the cluster's limits actor that a request of %s ended: %s", tenant, e)

        return settle


def start_limits_actor(tenants: list[TenantSettings]) -> Any:
    """The cluster's limits actor (Ray restarts it if it dies), named so a replica can find it."""
    cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(ClusterLimits)
    return cls.options(name=ACTOR_NAME, get_if_exists=True).remote([t.model_dump() for t in tenants])
