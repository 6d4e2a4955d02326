"""Keys and values of every live sequence of a model, in one pool of fixed-size blocks.

One pool per model, not one tensor per sequence: a decode step of many sequences then reads
all their keys with one gather through their block tables, which is what lets that step
run as one compiled graph whatever the batch (see `Transformer.decode`). A sequence holds
only the blocks its tokens fill, so a short chat stays small however long the context; the
pool doubles when it runs out, and a sequence's blocks go back when it is dropped.

Isolation: a sequence's block table names only its own blocks, positions past its length
are masked out of attention, and a block is zeroed when it is given back, so nothing one
sequence wrote is ever read by another. Block 0 is never handed out: it is the all-zero
block that pads the tables of shorter sequences in a batch.
"""

from __future__ import annotations

import threading
import weakref

import torch

from realm.errors import ContextOverflow
from realm.models.config import ModelConfig
from realm.models.transformer import KV_DTYPE, KVPoolTensors

BLOCK = 16
"""Tokens per block."""
_INITIAL_BLOCKS = 16  # 256 tokens; the pool doubles as sessions need more


class KVPool:
    """Per layer, keys and values as (blocks, n_kv_heads, BLOCK, head_dim) of `dtype` (the
    backend's: float16, or float32 for the naive one): position p of a sequence is at block
    table[p // BLOCK], offset p % BLOCK."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype = KV_DTYPE) -> None:
        self.n_layers = config.n_layers
        self.block_shape = (config.n_kv_heads, BLOCK, config.head_dim)
        self.device = device
        self.dtype = dtype
        self.lock = threading.RLock()  # held by whoever runs the model over this pool
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.n_blocks = 0
        self._free: list[int] = []
        self._grow(_INITIAL_BLOCKS)

    def allocate(self, n: int) -> list[int]:
        with self.lock:
            while len(self._free) < n:
                self._grow(2 * self.n_blocks)
            taken, self._free = self._free[:n], self._free[n:]
            return taken

    @property
    def blocks_in_use(self) -> int:
        """Blocks held by sequences now (block 0, the shared padding block, is never held)."""
        with self.lock:
            return self.n_blocks - 1 - len(self._free)

    def release(self, blocks: list[int]) -> None:
        if not blocks:
            return
        with self.lock, torch.inference_mode():  # the pool's tensors may be inference tensors
            table = torch.tensor(blocks, dtype=torch.long, device=self.device)
            for t in self.keys + self.values:
                t.index_fill_(0, table, 0.0)
            self._free.extend(blocks)

    def _grow(self, n_blocks: int) -> None:
        with self.lock, torch.inference_mode():
            for store in (self.keys, self.values):
                for i in range(self.n_layers):
                    grown = torch.zeros(n_blocks, *self.block_shape, device=self.device, dtype=self.dtype)
                    if i < len(store):
                        grown[: self.n_blocks] = store[i]
                        store[i] = grown
                    else:
                        store.append(grown)
            self._free.extend(range(max(1, self.n_blocks), n_blocks))
            self.n_blocks = n_blocks


class KVCache:
    """One sequence's blocks in a pool, grown as the sequence grows up to `max_tokens`: the
    `KVStore` a forward step writes this sequence's keys and values to."""

    pool: KVPoolTensors  # the pool as the model reads it while it runs (KVStore's view)

    def __init__(self, pool: KVPool, max_tokens: int) -> None:
        self.pool = pool
        self._pool = pool  # the same pool, as this cache allocates from it
        self.max_tokens = max_tokens
        self.blocks: list[int] = []
        weakref.finalize(self, pool.release, self.blocks)  # the list, so later blocks go too

    def reserve(self, n_tokens: int) -> None:
        """Make room for positions [0, n_tokens); beyond max_tokens is a ContextOverflow."""
        if n_tokens > self.max_tokens:
            raise ContextOverflow(f"{n_tokens} tokens do not fit in this session's context of {self.max_tokens}")
        missing = -(-n_tokens // BLOCK) - len(self.blocks)
        if missing > 0:
            self.blocks.extend(self._pool.allocate(missing))

    def table(self) -> torch.Tensor:
        """The sequence's blocks in order, (blocks,) int64."""
        return torch.tensor(self.blocks, dtype=torch.long, device=self._pool.device)

    def slots(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block and offset of positions [start, end), already reserved."""
        positions = torch.arange(start, end, device=self._pool.device)
        return self.table()[positions // BLOCK], positions % BLOCK

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n_kv_heads, T, head_dim) at positions start..; return all keys and
        values so far, (n_kv_heads, S, head_dim)."""
        end = start + k.shape[1]
        self.reserve(end)
        blocks, offsets = self.slots(start, end)
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        keys[blocks, :, offsets] = k.transpose(0, 1).to(keys.dtype)
        values[blocks, :, offsets] = v.transpose(0, 1).to(values.dtype)
        table = self.table()[: -(-end // BLOCK)]
        heads, _, dim = self._pool.block_shape

        def so_far(blocks: torch.Tensor) -> torch.Tensor:
            return blocks[table].transpose(0, 1).reshape(heads, -1, dim)[:, :end].to(k.dtype)

        return so_far(keys), so_far(values)
