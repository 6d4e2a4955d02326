"""The shape of a transformer, read from GGUF metadata: one dataclass for every architecture.

Architectures differ in a handful of switches (norm placement, activation, RoPE style,
sliding window); naming them here keeps `transformer.py` free of checkpoint details.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn

from realm.errors import ModelFormatError
from realm.models.gguf_file import GGUFFile

ARCHITECTURES = ("llama", "gemma3")

MAX_CONTEXT = 1 << 24
"""The longest context_length a file may declare (16M tokens: above every model published)."""
_MAX_SIZE = 2**31 - 1  # any other size: a count of heads, layers or elements in one row


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
    """Read the architecture's hyper-parameters, each checked for its type and range and
    against the others; unknown architectures and impossible values are a clear error.
    (loader.checked_config also checks them against the tensors.)"""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise ModelFormatError(
            f"{gguf.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    dim = _integer(gguf, "embedding_length")
    n_heads = _integer(gguf, "attention.head_count")
    n_kv_heads = _integer(gguf, "attention.head_count_kv", n_heads)
    if n_heads % n_kv_heads:
        _fail(gguf, f"{arch}.attention.head_count_kv {n_kv_heads} does not divide attention.head_count {n_heads}")
    if gguf.arch_key("attention.key_length") is None and dim % n_heads:
        _fail(gguf, f"{arch}.embedding_length {dim} is not a multiple of attention.head_count {n_heads}")
    head_dim = _integer(gguf, "attention.key_length", dim // n_heads)
    if _integer(gguf, "attention.value_length", head_dim) != head_dim:
        _fail(
            gguf, f"{arch}.attention.value_length differs from attention.key_length {head_dim}; Realm needs them equal"
        )
    common: dict[str, Any] = dict(
        architecture=arch,
        n_layers=_integer(gguf, "block_count"),
        dim=dim,
        ffn_dim=_integer(gguf, "feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=_vocab_size(gguf),
        context_length=_integer(gguf, "context_length", most=MAX_CONTEXT),
        norm_eps=_real(gguf, "attention.layer_norm_rms_epsilon"),
        rope_base=_real(gguf, "rope.freq_base", 10000.0),
    )
    scaling = gguf.arch_key("rope.scaling.type")
    rope_scale = _real(gguf, "rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
    if arch == "llama":
        return ModelConfig(**common, rope_neox=False, activation="silu", rope_scale=rope_scale)
    return ModelConfig(
        **common,
        rope_neox=True,
        activation="gelu_tanh",
        embed_scale=math.sqrt(dim),
        qk_norm=True,
        sandwich_norms=True,
        sliding_window=_integer(gguf, "attention.sliding_window", 0, least=0, most=MAX_CONTEXT),
        sliding_pattern=6,
        rope_base_local=10000.0,
        rope_scale=rope_scale,
    )


def _fail(gguf: GGUFFile, why: str) -> NoReturn:
    raise ModelFormatError(f"{gguf.path}: {why}")


def _shown(value: object) -> str:
    """A value as an error message shows it: its type and at most 40 characters of it."""
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _integer(gguf: GGUFFile, suffix: str, default: int | None = None, least: int = 1, most: int = _MAX_SIZE) -> int:
    """`<arch>.<suffix>` as an integer in least..most (`default` when absent; required if None)."""
    key = f"{gguf.architecture}.{suffix}"
    value = gguf.get(key, default)
    if value is None:
        _fail(gguf, f"required metadata key {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(gguf, f"{key} must be an integer, not {_shown(value)}")
    if not least <= value <= most:
        _fail(gguf, f"{key} is {value}, outside {least}..{most}")
    return value


def _real(gguf: GGUFFile, suffix: str, default: float | None = None) -> float:
    """`<arch>.<suffix>` as a finite number above 0 (`default` when absent; required if None)."""
    key = f"{gguf.architecture}.{suffix}"
    value = gguf.get(key, default)
    if value is None:
        _fail(gguf, f"required metadata key {key} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(gguf, f"{key} must be a number, not {_shown(value)}")
    if not (math.isfinite(value) and value > 0):
        _fail(gguf, f"{key} is {value}; it must be a finite number above 0")
    return float(value)


def _vocab_size(gguf: GGUFFile) -> int:
    """The tokenizer's token count, which `<arch>.vocab_size` must repeat if the file has it."""
    tokens = gguf.require("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        _fail(gguf, f"tokenizer.ggml.tokens must be a non-empty array, not {_shown(tokens)}")
    declared = _integer(gguf, "vocab_size", len(tokens))
    if declared != len(tokens):
        _fail(gguf, f"{gguf.architecture}.vocab_size is {declared} but tokenizer.ggml.tokens has {len(tokens)} tokens")
    return declared
