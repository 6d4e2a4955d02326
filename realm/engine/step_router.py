"""One step runner for a host that serves several models: each session's steps go to the
batch scheduler of the model the session belongs to.

The sandbox's `realm_forward` hands every step to one `StepRunner` (realm/engine/steps.py);
a server runs one `BatchScheduler` per model, so this router stands in front of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from realm.engine.scheduler import BatchScheduler
from realm.engine.session import Session
from realm.engine.steps import DirectStepRunner
from realm.models.transformer import Transformer

T = TypeVar("T")


class SchedulerRouter:
    """The sandbox's step runner: each step goes to the scheduler of its session's model."""

    def __init__(self) -> None:
        self._by_transformer: dict[int, BatchScheduler] = {}
        self._direct = DirectStepRunner()

    def add(self, scheduler: BatchScheduler) -> None:
        self._by_transformer[id(scheduler.transformer)] = scheduler

    def remove(self, scheduler: BatchScheduler) -> None:
        """Stop routing to `scheduler` (its model is being unloaded)."""
        self._by_transformer.pop(id(scheduler.transformer), None)

    def step(
        self, session: Session, tokens: Sequence[int], tenant: str = "", allowed: torch.Tensor | None = None
    ) -> np.ndarray:
        scheduler = self._by_transformer.get(id(session.transformer))
        if scheduler is None:  # a model no scheduler serves (tenants are refused those): run alone
            return self._direct.step(session, tokens, tenant, allowed)
        return scheduler.step(session, tokens, tenant, allowed)

    def call(self, transformer: Transformer, fn: Callable[[], T]) -> T:
        scheduler = self._by_transformer.get(id(transformer))
        if scheduler is None:
            return self._direct.call(transformer, fn)
        return scheduler.call(fn)

    def schedulers(self) -> list[BatchScheduler]:
        return list(self._by_transformer.values())

    def close(self) -> None:
        for s in self._by_transformer.values():
            s.close()
