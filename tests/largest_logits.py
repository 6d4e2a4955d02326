"""Comparing logits from different paths where they are meant to agree: at the largest.

The CPU's output projection computes each row's largest logits exactly and screens the
rest, with one kernel for a lone row and another for several (realm/backends/screened.py),
so two paths' tails differ by about a tenth even when their hidden states are equal.
"""

from __future__ import annotations

import torch


def assert_largest_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, k: int = 20) -> None:
    """`actual` equals `expected` within `atol` at the k largest of each row of `expected`."""
    top = expected.topk(k, dim=-1).indices
    torch.testing.assert_close(actual.gather(-1, top), expected.gather(-1, top), atol=atol, rtol=0)
