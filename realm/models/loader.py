"""GGUF tensor names -> the transformer's weights, through a backend's packing functions.

The table below is the only place that knows how checkpoints name their tensors; how a
tensor is stored (int4, int8, bf16, which device) is the backend's choice, passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from realm.errors import ModelFormatError
from realm.models.config import ModelConfig, config_from_gguf
from realm.models.gguf_file import GGUFFile, TensorData
from realm.models.transformer import Embedding, LayerWeights, Linear, Weights

PackLinear = Callable[[Sequence[TensorData]], Linear]
"""Packs one or more layer tensors with the same input width as one Linear (outputs stacked)."""
PackOutput = Callable[[TensorData], Linear]
"""Packs the output projection: a product whose largest entries decide everything, so a
backend may compute the rest less exactly (see backends/screened.py)."""
MakeEmbedding = Callable[[TensorData], Embedding]
MakeVector = Callable[[TensorData], torch.Tensor]

_OPTIONAL_NORMS = {
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "post_attn_norm": "post_attention_norm",
    "post_ffn_norm": "post_ffw_norm",
}


_LAYER_SHAPES = {  # each layer tensor's (rows, columns), in sizes that `_sizes` names
    "attn_norm": ("dim",),
    "attn_q": ("q", "dim"),
    "attn_k": ("kv", "dim"),
    "attn_v": ("kv", "dim"),
    "attn_output": ("dim", "q"),
    "ffn_norm": ("dim",),
    "ffn_gate": ("ffn", "dim"),
    "ffn_up": ("ffn", "dim"),
    "ffn_down": ("dim", "ffn"),
}
_QK_NORM_SHAPES = {"attn_q_norm": ("head",), "attn_k_norm": ("head",)}
_SANDWICH_NORM_SHAPES = {"post_attention_norm": ("dim",), "post_ffw_norm": ("dim",)}
_BLOCK = re.compile(r"blk\.(\d{1,9})\.")  # longer numbers name no block Realm would load


def checked_config(gguf: GGUFFile) -> ModelConfig:
    """The file's config, checked against its tensors before anything is allocated: every
    tensor the model needs is there with the shape the metadata implies, and the blocks
    present are exactly `block_count`. A defect is a ModelFormatError naming the key or
    tensor and the values that disagree."""
    config = config_from_gguf(gguf)
    blocks = {int(m.group(1)) for name in gguf.tensors if (m := _BLOCK.match(name))}
    extra = sorted(b for b in blocks if b >= config.n_layers)
    if extra or len(blocks) < config.n_layers:
        has = f"tensors for block {extra[0]}" if extra else f"tensors for {len(blocks)} blocks"
        raise ModelFormatError(
            f"{gguf.path}: {config.architecture}.block_count is {config.n_layers} but the file has {has}"
        )
    sizes = _sizes(config)
    expected = {"token_embd.weight": ("vocab", "dim"), "output_norm.weight": ("dim",)}
    if "output.weight" in gguf.tensors:
        expected["output.weight"] = ("vocab", "dim")
    required = dict(_LAYER_SHAPES)
    if config.qk_norm:
        required |= _QK_NORM_SHAPES
    if config.sandwich_norms:
        required |= _SANDWICH_NORM_SHAPES
    for i in range(config.n_layers):  # an optional norm the file has is used, so it is checked too
        for name, shape in (_LAYER_SHAPES | _QK_NORM_SHAPES | _SANDWICH_NORM_SHAPES).items():
            if name in required or f"blk.{i}.{name}.weight" in gguf.tensors:
                expected[f"blk.{i}.{name}.weight"] = shape
    for name, shape in expected.items():
        got = gguf.tensor(name).shape
        want = tuple(sizes[size][0] for size in shape)
        if got != want:
            raise ModelFormatError(
                f"{gguf.path}: tensor {name} has shape {got} where the metadata makes it {want} "
                f"({' x '.join(sizes[size][1] for size in shape)})"
            )
    return config


def _sizes(config: ModelConfig) -> dict[str, tuple[int, str]]:
    """Each size a tensor's shape is made of, and where the metadata says it."""
    return {
        "dim": (config.dim, "embedding_length"),
        "q": (config.n_heads * config.head_dim, "head_count * head_dim"),
        "kv": (config.n_kv_heads * config.head_dim, "head_count_kv * head_dim"),
        "head": (config.head_dim, "head_dim"),
        "ffn": (config.ffn_dim, "feed_forward_length"),
        "vocab": (config.vocab_size, "the tokenizer's token count"),
    }


def load_weights(
    gguf: GGUFFile,
    config: ModelConfig,
    pack_linear: PackLinear,
    pack_output: PackOutput,
    make_embedding: MakeEmbedding,
    make_vector: MakeVector,
) -> Weights:
    """Build `Weights` for `config` (from `checked_config`, so every tensor fits it).

    The output projection is packed on a thread of its own while the layers are: it is the
    largest matrix (gemma3's screen took 1.1 s of a 2.2 s pack), and packing is NumPy and
    PyTorch work that lets go of the GIL."""
    embedding = gguf.tensor("token_embd.weight")
    output = gguf.tensors.get("output.weight", embedding)  # tied to the embedding if absent
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="realm-pack") as pool:
        packed_output = pool.submit(pack_output, output)
        layers = _layers(gguf, config, pack_linear, make_vector)
        output_linear = packed_output.result()
    return Weights(
        embedding=make_embedding(embedding),
        layers=layers,
        output_norm=make_vector(gguf.tensor("output_norm.weight")),
        output=output_linear,
    )


def _layers(
    gguf: GGUFFile, config: ModelConfig, pack_linear: PackLinear, make_vector: MakeVector
) -> list[LayerWeights]:
    layers = []
    for i in range(config.n_layers):
        t = lambda name, i=i: gguf.tensor(f"blk.{i}.{name}.weight")  # noqa: E731
        norms = {
            field: make_vector(gguf.tensors[f"blk.{i}.{name}.weight"])
            for field, name in _OPTIONAL_NORMS.items()
            if f"blk.{i}.{name}.weight" in gguf.tensors
        }
        layers.append(
            LayerWeights(
                attn_norm=make_vector(t("attn_norm")),
                qkv=pack_linear([t("attn_q"), t("attn_k"), t("attn_v")]),
                attn_out=pack_linear([t("attn_output")]),
                ffn_norm=make_vector(t("ffn_norm")),
                gate_up=pack_linear([t("ffn_gate"), t("ffn_up")]),
                down=pack_linear([t("ffn_down")]),
                **norms,
            )
        )
    return layers
