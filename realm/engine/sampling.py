"""Choosing the next token from logits, in llama.cpp's order and with its defaults.

Order: penalties -> top-k -> top-p -> min-p -> temperature -> draw. Temperature <= 0 is
greedy. The same seed gives the same tokens.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from realm.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    min_p: float = 0.05  # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: (vocab,) of the next position; history: tokens so far (for penalties)."""
        p = self.params
        logits = self._penalise(logits.float().flatten().clone(), history)
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        if p.top_k > 0 and p.top_k < logits.numel():
            values, ids = torch.topk(logits, p.top_k)
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(values, dim=-1)
        keep = values.numel()
        if p.top_p < 1.0:
            cumulative = torch.cumsum(probs, dim=-1)
            keep = min(keep, int(torch.searchsorted(cumulative, torch.tensor(p.top_p))) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int((probs >= p.min_p * probs[0]).sum())))
        values, ids = values[:keep], ids[:keep]
        probs = torch.softmax(values / p.temperature, dim=-1)
        return int(ids[torch.multinomial(probs, 1, generator=self.generator)])

    def _penalise(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        p = self.params
        if p.repeat_last_n == 0 or not history:
            return logits
        if p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            return logits
        counts = Counter(history[-p.repeat_last_n :])
        ids = torch.tensor(list(counts.keys()), dtype=torch.long)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype)
        x = logits[ids]
        x = torch.where(x <= 0, x * p.repeat_penalty, x / p.repeat_penalty)
        logits[ids] = x - n * p.frequency_penalty - p.presence_penalty
        return logits
