"""The model's weights reached by their GGUF tensor names: the host's packed matrices (for
products with a guest's activations) and any tensor's values, decoded (for a guest that
computes itself).

The loader fuses q/k/v and gate/up into one Linear each (checkpoint naming stays out of
the forward pass); a guest that multiplies by `blk.N.attn_q.weight` gets a slice of the
fused product, the same numbers the forward pass computes. The fused weights are also
reachable as `blk.N.attn_qkv.weight` and `blk.N.ffn_gate_up.weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from realm.engine.model import Model
from realm.errors import InvalidArgument, NotFound, Unsupported
from realm.models.gguf_file import TensorData
from realm.models.quants import dequantize
from realm.models.transformer import Linear


@dataclass(frozen=True)
class WeightSlice:
    """Output rows [start, end) of a host Linear: one GGUF matrix, as the host holds it."""

    linear: Linear
    start: int
    end: int

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.end - self.start

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (m, in_features) @ this matrix^T -> (m, out_features)."""
        with torch.inference_mode():
            out = self.linear(x)
        return out if self.start == 0 and self.end == out.shape[1] else out[:, self.start : self.end]


def weight_by_name(model: Model, name: str) -> WeightSlice:
    """The matrix the host multiplies with for GGUF tensor `name`; Unsupported for a tensor
    that is not one (a norm), NotFound for a name the model does not have."""
    cfg, w = model.config, model.transformer.weights
    if name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in model.gguf.tensors):
        return WeightSlice(w.output, 0, w.output.out_features)
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        i = int(parts[1])
        if i < cfg.n_layers:
            layer = w.layers[i]
            n_q, n_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
            table = {
                "attn_q": WeightSlice(layer.qkv, 0, n_q),
                "attn_k": WeightSlice(layer.qkv, n_q, n_q + n_kv),
                "attn_v": WeightSlice(layer.qkv, n_q + n_kv, n_q + 2 * n_kv),
                "attn_qkv": WeightSlice(layer.qkv, 0, n_q + 2 * n_kv),
                "attn_output": WeightSlice(layer.attn_out, 0, layer.attn_out.out_features),
                "ffn_gate": WeightSlice(layer.gate_up, 0, cfg.ffn_dim),
                "ffn_up": WeightSlice(layer.gate_up, cfg.ffn_dim, 2 * cfg.ffn_dim),
                "ffn_gate_up": WeightSlice(layer.gate_up, 0, 2 * cfg.ffn_dim),
                "ffn_down": WeightSlice(layer.down, 0, layer.down.out_features),
            }
            if parts[2] in table:
                return table[parts[2]]
    if name in model.gguf.tensors:
        raise Unsupported(f"tensor {name!r} is not a matrix the host multiplies with (read it with realm_tensor_read)")
    raise NotFound(f"model {model.name} has no tensor {name!r}")


def tensor_by_name(model: Model, name: str) -> TensorData:
    """GGUF tensor `name` of `model`, as stored; NotFound if it has none."""
    t = model.gguf.tensors.get(name)
    if t is None:
        raise NotFound(f"model {model.name} has no tensor {name!r}")
    return t


def tensor_values(t: TensorData, offset: int, count: int) -> torch.Tensor:
    """Elements [offset, offset + count) of `t` flattened row-major, float32, cut at its end;
    only the rows they lie in are decoded."""
    total = math.prod(t.shape)
    if not 0 <= offset <= total:
        raise InvalidArgument(f"offset {offset} is outside tensor {t.name} of {total} elements")
    n = min(count, total - offset)
    if n <= 0:
        return torch.empty(0)
    cols = t.shape[-1]
    r0, r1 = offset // cols, -(-(offset + n) // cols)
    raw = t.raw.reshape(total // cols, -1)[r0:r1]
    values = dequantize(np.ascontiguousarray(raw), t.qtype, (r1 - r0, cols)).reshape(-1)
    start = offset - r0 * cols
    return values[start : start + n]
