"""Prometheus metrics of one server, in a registry of its own (several apps may share a
process, e.g. in tests), and the accounting of one generation request.

Every label value comes from a bounded set the operator configured: tenant names, served
model names (a request for any other model counts under `UNKNOWN_MODEL`) and HTTP
statuses. A client's text never becomes a label, so no request can grow the label set or
put into the exposition what it cannot encode."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from realm.engine.kv_cache import KVPool
from realm.engine.scheduler import BatchScheduler, StepObserver

_LATENCY = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)

UNKNOWN_MODEL = "(unknown)"
"""The model label of a request for a model that is not served (no served name has parentheses)."""


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        tm = ["tenant", "model"]
        self.requests = Counter("realm_requests", "Requests answered, by HTTP status", [*tm, "status"], registry=r)
        self.prompt_tokens = Counter("realm_prompt_tokens", "Prompt tokens of completed requests", tm, registry=r)
        self.completion_tokens = Counter("realm_completion_tokens", "Tokens generated", tm, registry=r)
        self.ttft = Histogram(
            "realm_time_to_first_token_seconds",
            "From the request's arrival to its first token",
            tm,
            buckets=_LATENCY,
            registry=r,
        )
        self.tpot = Histogram(
            "realm_time_per_output_token_seconds",
            "Between one output token and the next",
            tm,
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "realm_batch_size",
            "Sequences in one batched forward call",
            ["model"],
            buckets=_BATCH,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "realm_batch_tokens",
            "Tokens in one batched forward call",
            ["model"],
            buckets=_BATCH + (256, 512),
            registry=r,
        )
        self.queue_depth = Gauge("realm_queue_depth", "Forward steps waiting to run now", ["model"], registry=r)
        self.kv_blocks = Gauge(
            "realm_kv_blocks_in_use", "KV cache blocks held by live sequences now", ["model"], registry=r
        )
        self.active = Gauge("realm_active_requests", "Requests running now", ["tenant"], registry=r)
        self.guest_traps = Counter(
            "realm_guest_traps",
            "Guest failures: traps, time or memory limits, broken ABI",
            ["tenant"],
            registry=r,
        )
        self.limits_fallbacks = Counter(
            "realm_limits_fallbacks",
            "Requests admitted by this replica's own limits: the cluster's limits actor did not answer",
            ["tenant"],
            registry=r,
        )
        self._served: set[str] = set()

    def observer(self, model: str) -> StepObserver:
        """A BatchScheduler observer for `model`: batch size and tokens."""
        size, tokens = self.batch_size.labels(model), self.batch_tokens.labels(model)

        def observe(sequences: int, n_tokens: int, _waiting: int) -> None:
            size.observe(sequences)
            tokens.observe(n_tokens)

        return observe

    def serve(self, model: str, scheduler: BatchScheduler, pool: KVPool) -> None:
        """Count `model` as served (a label of its own); its gauges are read at each scrape."""
        self._served.add(model)
        self.queue_depth.labels(model).set_function(lambda: scheduler.queue_depth)
        self.kv_blocks.labels(model).set_function(lambda: pool.blocks_in_use)

    def unserve(self, model: str) -> None:
        """`model` was unloaded: its live gauges go (its counters stay, and so does its label)."""
        self.queue_depth.remove(model)
        self.kv_blocks.remove(model)

    def model_label(self, name: str) -> str:
        """`name` if it is a served model's, else UNKNOWN_MODEL."""
        return name if name in self._served else UNKNOWN_MODEL

    def render(self) -> bytes:
        return generate_latest(self.registry)


def merge_expositions(by_source: Mapping[str, bytes], label: str = "replica") -> bytes:
    """Several processes' Prometheus texts as one: each sample gains `label` = its source,
    families of the same name are one family (a scraper sees each name once)."""
    families: dict[str, Metric] = {}
    for source, text in sorted(by_source.items()):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples.extend(s._replace(labels={**s.labels, label: source}) for s in family.samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


@dataclass
class Tracker:
    """One generation request's metrics: time to first token, time per output token, its
    status and usage, counted once."""

    metrics: Metrics
    tenant: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None  # when the last token came
    done: bool = False

    def __post_init__(self) -> None:
        self.model = self.metrics.model_label(self.model)

    def token(self) -> None:
        now = time.perf_counter()
        labels = (self.tenant, self.model)
        if self.last is None:
            self.metrics.ttft.labels(*labels).observe(now - self.started)
        else:
            self.metrics.tpot.labels(*labels).observe(now - self.last)
        self.last = now

    def finish(self, status: int, prompt: int = 0, completion: int = 0) -> None:
        """Count the request as answered with `status` (the first call counts; later ones do nothing)."""
        if self.done:
            return
        self.done = True
        m, labels = self.metrics, (self.tenant, self.model)
        m.requests.labels(*labels, str(status)).inc()
        if prompt:
            m.prompt_tokens.labels(*labels).inc(prompt)
        if completion:
            m.completion_tokens.labels(*labels).inc(completion)
