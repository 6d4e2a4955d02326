"""Forward steps of sessions, behind one small interface.

The sandbox's `realm_forward` asks a `StepRunner` for a step instead of calling
`Session.feed` itself, so a scheduler that batches the steps of many sessions (one
backend call for all tenants waiting) can take this place without the ABI changing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch

from realm.engine import model_activity
from realm.engine.session import Session
from realm.models.transformer import Transformer

T = TypeVar("T")


class StepRunner(Protocol):
    def step(
        self, session: Session, tokens: Sequence[int], tenant: str = "", allowed: torch.Tensor | None = None
    ) -> np.ndarray:
        """Run `tokens` through `session` for `tenant`; the logits of the last one, (vocab,)
        float32, unmasked but exact where the mask `allowed` (vocab,) bool lets the best tokens
        through (Session.chunk). NumPy rather than torch: copying them on into guest memory then takes no
        torch call, and every torch call gives up the GIL, a wait behind every other guest
        thread to get it back. `BatchScheduler` (realm/engine/scheduler.py) has this shape."""
        ...

    def call(self, transformer: Transformer, fn: Callable[[], T]) -> T:
        """`fn()`, other work on `transformer` (a guest's per-layer or per-operation
        request), run where that model's steps run."""
        ...


class DirectStepRunner:
    """Each step runs at once, alone: batch 1, exactly what the host-direct path runs."""

    def step(
        self, session: Session, tokens: Sequence[int], tenant: str = "", allowed: torch.Tensor | None = None
    ) -> np.ndarray:
        with model_activity.computing():
            return session.feed(tokens, allowed=allowed)[-1].numpy()

    def call(self, transformer: Transformer, fn: Callable[[], T]) -> T:
        with model_activity.computing():
            return fn()
