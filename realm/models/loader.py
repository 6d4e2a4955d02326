"""GGUF tensor names -> the transformer's weights, through a backend's packing functions.

The table below is the only place that knows how checkpoints name their tensors; how a
tensor is stored (int4, int8, bf16, which device) is the backend's choice, passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from realm.models.config import ModelConfig
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


def load_weights(
    gguf: GGUFFile,
    config: ModelConfig,
    pack_linear: PackLinear,
    pack_output: PackOutput,
    make_embedding: MakeEmbedding,
    make_vector: MakeVector,
) -> Weights:
    """Build `Weights` for `config` from the file; a missing tensor is a ModelFormatError."""
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
    embedding = gguf.tensor("token_embd.weight")
    output = gguf.tensors.get("output.weight", embedding)  # tied to the embedding if absent
    return Weights(
        embedding=make_embedding(embedding),
        layers=layers,
        output_norm=make_vector(gguf.tensor("output_norm.weight")),
        output=pack_output(output),
    )
