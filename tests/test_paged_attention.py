"""Realm's decode-attention kernel (realm/backends/paged_attention.cpp) against PyTorch's
operations (`attend_pages`), which the naive and GPU backends run: the same rows, tables,
positions and windows, float16 pools.

Both bodies are checked on this machine: the plain C++ one in a child process with
REALM_KERNEL_ISA=scalar, and always for a head size that is not a multiple of 16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from realm.backends import native
from realm.models.transformer import attend_pages

pytestmark = pytest.mark.skipif(not native.load(), reason="the native kernel is not built (make setup builds it)")

CASES = [
    # rows, kv heads, query heads a kv head, head dim, block, blocks a table, window
    (1, 3, 3, 64, 16, 12, 0),  # smollm2's shape
    (1, 1, 4, 256, 16, 40, 512),  # gemma3's, sliding layer, window past the context
    (5, 3, 3, 64, 16, 30, 0),  # a batch, several spans a row
    (2, 1, 4, 256, 16, 40, 100),  # a window shorter than the context
    (3, 2, 7, 32, 8, 9, 0),  # heads in a four and a three
    (2, 2, 2, 40, 16, 5, 0),  # head dim not a multiple of 16: the plain body
]


def worst_error(seed: int = 0) -> float:
    """The largest difference from attend_pages over CASES, relative to the largest output."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for rows, kv_heads, group, dim, block, n, window in CASES:
        keys, values = (torch.randn(64, kv_heads, block, dim, generator=g).half() for _ in range(2))
        tables = torch.randint(0, 64, (rows, n), generator=g)
        positions = torch.randint(0, n * block, (rows,), generator=g)
        positions[0] = n * block - 1  # a full table
        q = torch.randn(rows, kv_heads * group * dim, generator=g)
        got = torch.ops.realm.paged_attention(q, keys, values, tables, positions, window, dim**-0.5)
        want = attend_pages(q, keys, values, tables, positions, window, dim**-0.5)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    return worst


def test_the_kernel_attends_as_pytorchs_operations_do() -> None:
    assert worst_error() <= 1e-5


def test_the_plain_body_attends_the_same() -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
        "from realm.backends import native; native.load(); import test_paged_attention as t; "
        "print(torch.ops.realm.isa(), t.worst_error(1))"
    )
    env = {**os.environ, "REALM_KERNEL_ISA": "scalar"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    name, worst = done.stdout.split()
    assert name == "scalar" and float(worst) <= 1e-5


def test_a_row_attends_the_same_in_any_batch() -> None:
    """Rows are independent: batching never changes a sequence's numbers."""
    g = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(32, 3, 16, 64, generator=g).half() for _ in range(2))
    tables, positions = torch.randint(0, 32, (4, 10), generator=g), torch.tensor([159, 3, 77, 130])
    q = torch.randn(4, 9 * 64, generator=g)
    whole = torch.ops.realm.paged_attention(q, keys, values, tables, positions, 0, 0.125)
    attend = torch.ops.realm.paged_attention
    alone = [attend(q[i : i + 1], keys, values, tables[i : i + 1], positions[i : i + 1], 0, 0.125) for i in range(4)]
    assert torch.equal(whole, torch.cat(alone))


def test_a_table_past_the_pool_is_an_error_not_a_read() -> None:
    keys = values = torch.zeros(4, 1, 16, 64).half()
    q = torch.zeros(1, 64)
    with pytest.raises(RuntimeError, match="outside the pool"):
        torch.ops.realm.paged_attention(q, keys, values, torch.tensor([[0, 9]]), torch.tensor([20]), 0, 0.125)
    with pytest.raises(RuntimeError, match="past its table"):
        torch.ops.realm.paged_attention(q, keys, values, torch.tensor([[0, 1]]), torch.tensor([32]), 0, 0.125)
