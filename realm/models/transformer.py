"""The forward pass of every supported architecture, as a pure function of the weights.

One call runs any number of sequences at once (a batch of "chunks", each a run of new
tokens for one sequence with its own KV cache): the matrix products see all tokens of all
chunks stacked, which is where serving many sessions wins; attention runs per chunk.
Weights arrive already packed by a backend (`Linear` / `Embedding` below), so this file
knows nothing of quantization formats or devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from realm.models.config import ModelConfig

KV_DTYPE = torch.float16
"""The KV pool's element type on the CPU and GPU backends: float16, as llama.cpp keeps its
cache, for half the memory a token and half the bytes attention reads; the naive backend
keeps float32 (backends/devices.py). Stored rounded, computed with in float32."""


class Linear(Protocol):
    """y = x @ W.T for a weight the backend holds in whatever format is fastest."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) f32 -> (T, out) f32."""
        ...


class Embedding(Protocol):
    def lookup(self, ids: torch.Tensor) -> torch.Tensor: ...  # (T,) int64 -> (T, dim) f32


class KVPoolTensors(Protocol):
    """Keys and values of many sequences, per layer in blocks (blocks, n_kv_heads, block, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lock: Any  # held while the model runs over the pool (it may grow between steps)


class KVStore(Protocol):
    """One sequence's keys and values: its blocks in a shared pool, grown as it grows."""

    pool: KVPoolTensors

    def reserve(self, n_tokens: int) -> None:
        """Make room for positions [0, n_tokens)."""
        ...

    def table(self) -> torch.Tensor:
        """The sequence's blocks in order, (blocks,) int64."""
        ...

    def slots(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block and offset (int64) of positions [start, end), already reserved."""
        ...

    def append(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n_kv_heads, T, head_dim) at positions start.. and return all so far."""
        ...


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # (dim,)
    qkv: Linear  # dim -> (n_heads + 2 * n_kv_heads) * head_dim, q/k/v fused at load time
    attn_out: Linear  # n_heads * head_dim -> dim
    ffn_norm: torch.Tensor  # (dim,)
    gate_up: Linear  # dim -> 2 * ffn_dim, gate then up
    down: Linear  # ffn_dim -> dim
    q_norm: torch.Tensor | None = None  # (head_dim,) gemma3
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # (dim,) gemma3
    post_ffn_norm: torch.Tensor | None = None


@dataclass
class Weights:
    embedding: Embedding
    layers: list[LayerWeights]
    output_norm: torch.Tensor  # (dim,)
    output: Linear  # dim -> vocab


PagedAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor
]
"""Decode attention over a KV pool, (q, keys, values, tables, positions, window, scale) ->
(rows, heads * head_dim) f32: each row's queries q (rows, heads * head_dim) f32 against the
keys and values (blocks, n_kv_heads, block, head_dim) that its table (rows, N) names, up to
its position (rows,) and within `window` keys of it (0: no window). `attend_pages` below, or
a backend's kernel."""


def attend_pages(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    positions: torch.Tensor,
    window: int,
    scale: float,
) -> torch.Tensor:
    """`PagedAttention` in PyTorch's operations: each row's keys gathered from the pool,
    padded to the longest table (the zero block) and masked past the row's position."""
    rows, (kv_heads, block, dim) = q.shape[0], keys.shape[1:]
    key_pos = torch.arange(tables.shape[1] * block, device=q.device)[None, :]
    visible = key_pos <= positions[:, None]
    if window:
        visible &= key_pos > positions[:, None] - window
    seq_k = keys[tables].transpose(1, 2).flatten(2, 3).to(q.dtype)  # (B, Hkv, S, D)
    seq_v = values[tables].transpose(1, 2).flatten(2, 3).to(q.dtype)
    scores = q.reshape(rows, kv_heads, -1, dim) @ seq_k.transpose(2, 3)
    scores = (scores * scale).masked_fill(~visible[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ seq_v).reshape(rows, -1)


DecodeGraph = Callable[..., torch.Tensor]
"""`decode_layers` with the layers bound: (x, positions, blocks, offsets, tables, rope, keys,
values) -> the last hidden states."""


@dataclass
class Chunk:
    """New tokens of one sequence, starting at position `start` of its KV cache."""

    tokens: Sequence[int]
    start: int
    kv: KVStore
    all_logits: bool = False  # logits for every token (perplexity), else only the last
    graph: DecodeGraph | None = field(default=None, repr=False)  # the decode step it keeps to
    logits: torch.Tensor | None = field(default=None, repr=False)  # filled by forward()
    allowed: torch.Tensor | None = field(default=None, repr=False)  # (vocab,) bool: a mask on its next token
    normed: torch.Tensor | None = field(default=None, repr=False)  # (dim,): the last row, normed, as projected
    exact_ids: torch.Tensor | None = field(default=None, repr=False)  # the last row's exact logits, if screened


def token_positions(chunks: Sequence[Chunk]) -> torch.Tensor:
    """The position of every chunk token, stacked in order (T,) int64, on the CPU."""
    return torch.cat([torch.arange(c.start, c.start + len(c.tokens)) for c in chunks])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


class Rope:
    """Rotary position embedding: x * cos + rotate(x) * sin, with the tables laid out for
    the pairing the checkpoint uses (adjacent pairs, or halves for NeoX), so applying it is
    a handful of tensor operations."""

    def __init__(self, head_dim: int, base: float, neox: bool, scale: float = 1.0) -> None:
        self.inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.neox = neox
        self.scale = scale

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin, (T, 1, head_dim), for just these positions."""
        angles = (positions.double()[:, None] / self.scale) * self.inv_freq[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()
        if self.neox:  # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
            cos, sin = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
        else:  # pairs (a, b) -> (a cos - b sin, b cos + a sin)
            cos, sin = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
        return cos[:, None, :], sin[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """RoPE on x (T, heads, head_dim) with a `Rope`'s tables."""
    if neox:
        x1, x2 = x.chunk(2, dim=-1)
        swapped = torch.cat((x2, x1), dim=-1)
    else:
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos + swapped * sin


GRAPH_PROMPT_TOKENS = 32
"""Prompts up to this long run as rows of the decode graph, beside the decode steps. Run
layer by layer, a short prompt costs ~15 ms of dispatch alone, stalling every decode step
of its round; in the graph, 20 tokens of smollm2 took 20 ms instead of 39 (gemma3: 37
either way; 40 tokens: 64 ms against 55, its layer path reads dense bf16 copies)."""
GRAPH_CELLS = 1 << 16
"""Rows x keys one decode-graph call may attend over: each row gathers its sequence's keys,
so this bounds that copy (50 MB a layer for smollm2) when prompts join."""

RopeTables = list[tuple[torch.Tensor, torch.Tensor]]
"""cos and sin of a step's token positions for each RoPE of the model: global, then local."""


class Transformer:
    """Config + weights + RoPE tables: everything immutable about a loaded model.

    `decode_graph` runs the decode step: `decode_layers` over the model's layers op by op
    until a compiled graph of the same function replaces it (`use_decode_graph`;
    realm/backends/compiled.py), which may happen between any two steps."""

    def __init__(self, config: ModelConfig, weights: Weights, paged_attention: PagedAttention = attend_pages) -> None:
        self.config = config
        self.weights = weights
        self.paged_attention = paged_attention
        cfg = config
        self.ropes = [Rope(cfg.head_dim, cfg.rope_base, cfg.rope_neox, cfg.rope_scale)]
        if cfg.sliding_window:
            self.ropes.append(Rope(cfg.head_dim, cfg.rope_base_local, cfg.rope_neox))
        self.decode_graph: DecodeGraph = self._eager_decode

    def use_decode_graph(self, graph: DecodeGraph | None) -> None:
        """Decode through `graph` from the next step on (None: back to the eager step)."""
        self.decode_graph = graph or self._eager_decode

    @property
    def compiled(self) -> bool:
        return self.decode_graph != self._eager_decode

    def _eager_decode(self, *inputs: Any) -> torch.Tensor:
        return self.decode_layers(self.weights.layers, *inputs)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk]) -> None:
        """Run every chunk's new tokens through the model; sets `chunk.logits` (rows, vocab).
        Decode steps and short prompts run together through the decode graph (`decode`);
        long prompts, and chunks that want every row's logits, layer by layer with
        attention per chunk."""
        rows, keys, graph, layered = 0, 0, [], []  # keys: the most any row of the graph attends over
        for c in sorted(chunks, key=lambda c: len(c.tokens)):
            n, end = len(c.tokens), c.start + len(c.tokens)
            if n == 1 or (not c.all_logits and n <= GRAPH_PROMPT_TOKENS and (rows + n) * max(keys, end) <= GRAPH_CELLS):
                graph.append(c)
                rows, keys = rows + n, max(keys, end)
            else:
                layered.append(c)
        by_graph: dict[DecodeGraph, list[Chunk]] = {}
        for c in graph:
            by_graph.setdefault(c.graph or self.decode_graph, []).append(c)
        for step, group in by_graph.items():
            self.decode(group, step)
        if layered:
            with layered[0].kv.pool.lock:
                x = self.embed(layered)
                tables = self.rope_tables(token_positions(layered), x.device)
                for i in range(self.config.n_layers):
                    x = self.layer(i, x, layered, tables)
                self.logits(x, layered)

    @torch.inference_mode()
    def decode(self, chunks: Sequence[Chunk], step: DecodeGraph | None = None) -> None:
        """Every token of the chunks as a row of one call of the decode graph, at its own
        position over its sequence's blocks: a sequence's keys are gathered from the pool
        through its block table, padded to the longest and masked past the row's position,
        so the graph is the same whatever the rows and lengths. Sets each chunk's last logits.
        `step` is the decode step to run (default: the model's current one)."""
        pool = chunks[0].kv.pool
        with pool.lock:
            for c in chunks:
                c.kv.reserve(c.start + len(c.tokens))
            x = self.embed(chunks)
            positions = token_positions(chunks)
            blocks, offsets = (
                torch.cat(t) for t in zip(*(c.kv.slots(c.start, c.start + len(c.tokens)) for c in chunks))
            )
            row_tables = [t for c in chunks for t in [c.kv.table()] * len(c.tokens)]
            tables = pad_sequence(row_tables, batch_first=True)  # 0: the zero block
            if tables.shape[1] == 1:  # a table of one block would be a graph of its own
                tables = F.pad(tables, (0, 1))
            rope = self.rope_tables(positions, x.device)
            hidden = (step or self.decode_graph)(
                x, positions.to(x.device), blocks, offsets, tables, rope, pool.keys, pool.values
            )
        self.logits(hidden, chunks)

    def decode_layers(
        self,
        layers: Sequence[LayerWeights],
        x: torch.Tensor,
        positions: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        tables: torch.Tensor,
        rope: RopeTables,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """The decode step as a pure function of tensors (what gets compiled): `layers` (the
        model's, or a run of them with the same pattern of sliding layers) over x (B, dim)
        at `positions` (B,); writes each layer's new keys and values at `blocks`, `offsets`
        (B,) of the pool, then attends (`paged_attention`) over the blocks of each row's
        table (B, N) up to its position; the last hidden states (B, dim)."""
        cfg = self.config
        for i, layer in enumerate(layers):
            r = self._rope_index(i)
            q, k, v = self._qkv(layer, x, self.ropes[r].neox, *rope[r])
            keys[i][blocks, :, offsets] = k.to(keys[i].dtype)
            values[i][blocks, :, offsets] = v.to(values[i].dtype)
            window = cfg.sliding_window if cfg.is_sliding(i) else 0
            o = self.paged_attention(q.flatten(1), keys[i], values[i], tables, positions, window, cfg.attn_scale)
            x = self._block_out(layer, x, o)
        return x

    def rope_tables(self, positions: torch.Tensor, device: torch.device) -> RopeTables:
        """cos and sin of these positions (`token_positions`), per RoPE: computed once per
        step rather than once per layer."""
        return [(cos.to(device), sin.to(device)) for cos, sin in (r.tables(positions) for r in self.ropes)]

    def _rope_index(self, layer: int) -> int:
        return 1 if self.config.is_sliding(layer) and len(self.ropes) > 1 else 0

    @torch.inference_mode()
    def embed(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """The first hidden state (T, dim) of all chunks' tokens, stacked."""
        ids = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long)
        x = self.weights.embedding.lookup(ids)
        return x * self.config.embed_scale if self.config.embed_scale != 1.0 else x

    @torch.inference_mode()
    def layer(
        self,
        index: int,
        x: torch.Tensor,
        chunks: Sequence[Chunk],
        tables: RopeTables | None = None,
    ) -> torch.Tensor:
        """One transformer block; stores the chunks' keys and values in their caches."""
        cfg, layer = self.config, self.weights.layers[index]
        rope = self._rope_index(index)
        cos, sin = (tables or self.rope_tables(token_positions(chunks), x.device))[rope]
        q, k, v = self._qkv(layer, x, self.ropes[rope].neox, cos, sin)
        with chunks[0].kv.pool.lock:
            o = self._attend_chunks(index, q, k, v, chunks, cfg.sliding_window if cfg.is_sliding(index) else 0)
        return self._block_out(layer, x, o)

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, chunks: Sequence[Chunk]) -> None:
        """Final norm and output projection of the rows each chunk wants; sets chunk.logits.
        Chunks that want every row's logits (perplexity, scoring) get them through the
        projection's `precise` form where it has one: a screened projection
        (backends/screened.py) is exact only at each row's largest logits, and, through its
        `constrained` form, at the largest its chunk's mask (`allowed`) leaves."""
        rows, offset = [], 0
        for c in chunks:
            n = len(c.tokens)
            rows.append(x[offset : offset + n] if c.all_logits else x[offset + n - 1 : offset + n])
            offset += n
        w = self.weights
        precise = getattr(w.output, "precise", w.output)
        for every, project in ((False, w.output), (True, precise)):
            group = [i for i, c in enumerate(chunks) if c.all_logits == every]
            if not group:
                continue
            normed = rms_norm(torch.cat([rows[i] for i in group]), w.output_norm, self.config.norm_eps)
            masks = {j: a for j, i in enumerate(group) if (a := chunks[i].allowed) is not None}
            constrained = getattr(project, "constrained", None)
            screened = getattr(project, "screened", None)
            exact = None  # (rows, candidates): where a screened row is exact
            if masks and constrained is not None:  # every row of this group is one chunk's last
                logits = constrained(normed, list(masks), torch.stack(list(masks.values())))
            elif screened is not None:
                logits, exact = screened(normed)
            else:
                logits = project(normed)
            offset = 0
            for i in group:
                chunks[i].logits = logits[offset : offset + len(rows[i])]
                offset += len(rows[i])
                # what rescoring some of the last row's logits exactly needs (engine/best_tokens.py)
                chunks[i].normed = normed[offset - 1]
                chunks[i].exact_ids = None if exact is None else exact[offset - 1]

    def _qkv(
        self, layer: LayerWeights, x: torch.Tensor, neox: bool, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention's inputs: q (T, H, D), k and v (T, Hkv, D), normed and rotated."""
        cfg = self.config
        h = rms_norm(x, layer.attn_norm, cfg.norm_eps)
        n_q, n_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        q, k, v = layer.qkv(h).split((n_q, n_kv, n_kv), dim=-1)
        q = q.unflatten(-1, (cfg.n_heads, cfg.head_dim))
        k = k.unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))
        v = v.unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.norm_eps)
        return rotate(q, cos, sin, neox), rotate(k, cos, sin, neox), v

    def _block_out(self, layer: LayerWeights, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The rest of the block after attention: output projection, residuals, FFN."""
        cfg = self.config
        h = layer.attn_out(o)
        if layer.post_attn_norm is not None:
            h = rms_norm(h, layer.post_attn_norm, cfg.norm_eps)
        x = x + h
        gate, up = layer.gate_up(rms_norm(x, layer.ffn_norm, cfg.norm_eps)).chunk(2, dim=-1)
        gate = F.silu(gate) if cfg.activation == "silu" else F.gelu(gate, approximate="tanh")
        h = layer.down(gate * up)
        if layer.post_ffn_norm is not None:
            h = rms_norm(h, layer.post_ffn_norm, cfg.norm_eps)
        return x + h

    def _attend_chunks(
        self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Sequence[Chunk], window: int
    ) -> torch.Tensor:
        """Each chunk's queries over its own cache, one chunk at a time; (T, H * D)."""
        outs, offset = [], 0
        for c in chunks:
            n = len(c.tokens)
            sl = slice(offset, offset + n)
            keys, values = c.kv.append(index, c.start, k[sl].transpose(0, 1), v[sl].transpose(0, 1))
            outs.append(_attend(q[sl].transpose(0, 1), keys, values, c.start, window, self.config.attn_scale))
            offset += n
        return torch.cat(outs, dim=1).transpose(0, 1).flatten(1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int, scale: float) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of q (H, T, D) over k, v (Hkv, S, D).

    Written out rather than through scaled_dot_product_attention: at decode sizes PyTorch's
    CPU kernel cost 2-70x more than these three batched products, most of all on a busy
    host. Query heads sharing a key/value head are stacked as rows of one product.
    """
    heads, t, dim = q.shape
    kv_heads, s = k.shape[0], k.shape[1]
    first = 0
    if window and start + t > window:
        first = max(0, start - window + 1)  # no query in this chunk sees a key before this
        k, v = k[:, first:], v[:, first:]
    group = heads // kv_heads
    scores = (q.reshape(kv_heads, group * t, dim) @ k.transpose(1, 2)) * scale  # (Hkv, G*T, S')
    if t > 1:  # a single new token attends to every key it was given
        q_pos = torch.arange(start, start + t, device=q.device)[:, None]
        k_pos = torch.arange(first, s, device=q.device)[None, :]
        hidden = k_pos > q_pos
        if window:
            hidden |= (q_pos - k_pos) >= window
        scores = scores.masked_fill(hidden.repeat(group, 1), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).reshape(heads, t, dim)
