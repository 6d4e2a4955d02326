"""One sequence's keys and values on the host, grown in steps as the sequence grows.

Preallocating the whole context (8192 tokens for smollm2) would cost hundreds of MB per
session; growing by doubling keeps a short chat small and the copies amortised.
"""

from __future__ import annotations

import torch

from realm.errors import ContextOverflow
from realm.models.config import ModelConfig

_INITIAL = 256


class KVCache:
    def __init__(self, config: ModelConfig, max_tokens: int, device: torch.device) -> None:
        self.n_layers = config.n_layers
        self.shape = (config.n_kv_heads, 0, config.head_dim)
        self.max_tokens = max_tokens
        self.device = device
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer: (n_kv_heads, capacity, head_dim)
        self.values: list[torch.Tensor] = []

    def reserve(self, n_tokens: int) -> None:
        """Make room for positions [0, n_tokens); beyond max_tokens is a ContextOverflow."""
        if n_tokens > self.max_tokens:
            raise ContextOverflow(
                f"{n_tokens} tokens do not fit in this session's context of {self.max_tokens}"
            )
        if n_tokens <= self.capacity:
            return
        capacity = min(self.max_tokens, max(n_tokens, 2 * self.capacity, _INITIAL))
        heads, _, dim = self.shape
        for store in (self.keys, self.values):
            for i in range(self.n_layers):
                grown = torch.zeros(heads, capacity, dim, device=self.device)
                if i < len(store):
                    grown[:, : self.capacity] = store[i][:, : self.capacity]
                    store[i] = grown
                else:
                    store.append(grown)
        self.capacity = capacity

    def append(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[1]
        self.reserve(end)
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    @property
    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
