"""The shape of a transformer, read from GGUF metadata: one dataclass for every architecture.

Architectures differ in a handful of switches (norm placement, activation, RoPE style,
sliding window); naming them here keeps `transformer.py` free of checkpoint details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from realm.errors import ModelFormatError
from realm.models.gguf_file import GGUFFile

ARCHITECTURES = ("llama", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_neox: bool  # rotate halves (NeoX) instead of adjacent pairs (GPT-J / llama.cpp "norm")
    activation: str  # "silu" or "gelu_tanh", applied to the gate of a gated FFN
    embed_scale: float = 1.0
    attn_scale: float = 0.0  # multiplies q.k; 0 means 1/sqrt(head_dim)
    qk_norm: bool = False  # RMS norm per head on q and k (gemma3)
    sandwich_norms: bool = False  # extra norms after attention and after the FFN (gemma3)
    sliding_window: int = 0  # 0: every layer attends to the whole context
    sliding_pattern: int = 0  # every n-th layer is global; the others use the window
    rope_base_local: float = 0.0  # RoPE base of the sliding-window layers
    rope_scale: float = 1.0  # linear RoPE scaling of the global layers (positions / scale)

    def __post_init__(self) -> None:
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends only to the last `sliding_window` positions."""
        if not self.sliding_window:
            return False
        return not self.sliding_pattern or (layer + 1) % self.sliding_pattern != 0


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """Read the architecture's hyper-parameters; unknown architectures are a clear error."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise ModelFormatError(
            f"{gguf.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )

    def need(suffix: str) -> int | float:
        value = gguf.arch_key(suffix)
        if value is None:
            raise ModelFormatError(f"{gguf.path}: required metadata key {arch}.{suffix} is missing")
        return value

    dim = int(need("embedding_length"))
    n_heads = int(need("attention.head_count"))
    head_dim = int(gguf.arch_key("attention.key_length", dim // n_heads))
    vocab = gguf.arch_key("vocab_size") or len(gguf.require("tokenizer.ggml.tokens"))
    common: dict[str, Any] = dict(
        architecture=arch,
        n_layers=int(need("block_count")),
        dim=dim,
        ffn_dim=int(need("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(gguf.arch_key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        vocab_size=int(vocab),
        context_length=int(need("context_length")),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_base=float(gguf.arch_key("rope.freq_base", 10000.0)),
    )
    scaling = gguf.arch_key("rope.scaling.type")
    rope_scale = float(gguf.arch_key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    if arch == "llama":
        return ModelConfig(**common, rope_neox=False, activation="silu", rope_scale=rope_scale)
    return ModelConfig(
        **common,
        rope_neox=True,
        activation="gelu_tanh",
        embed_scale=math.sqrt(dim),
        qk_norm=True,
        sandwich_norms=True,
        sliding_window=int(gguf.arch_key("attention.sliding_window", 0)),
        sliding_pattern=6,
        rope_base_local=10000.0,
        rope_scale=rope_scale,
    )
