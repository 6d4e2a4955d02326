"""Weight formats per device, each a `Linear`: the kernels the forward pass runs on.

On the CPU, activations enter the matrix products as bfloat16: PyTorch's int4 and int8
CPU kernels are 20-50x faster with bf16 activations than with float32 ones (measured on
smollm2's shapes), and the reference bounds still hold. Q4_0, Q4_1 and Q4_K repack
exactly into the int4 group layout; other quantized types are re-quantized to int8 per
output row; float weights stay dense.
"""

from __future__ import annotations

from typing import Sequence

import torch
from gguf import GGMLQuantizationType as QT

from realm.models.gguf_file import TensorData
from realm.models.quants import INT4_EXACT, Int4Groups, dequantize, int4_groups

GROUP = 32


class DenseLinear:
    """A plain matrix in `dtype` on any device: the GPU format, and the one for float tensors."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight.to(dtype).contiguous()  # (out, in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.weight.dtype) @ self.weight.t()).float()

    def dense(self) -> torch.Tensor:
        return self.weight.float()


class Int4Linear:
    """PyTorch's CPU int4 kernel: weight = (code - 8) * scale + zero per group of 32 inputs."""

    def __init__(self, groups: Int4Groups) -> None:
        self.out_features, self.in_features = groups.codes.shape
        self.packed = torch._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
        # (in / 32, out, 2): the kernel's layout
        sz = torch.stack((groups.scale, groups.zero), dim=-1).transpose(0, 1).contiguous()
        self.scales_zeros = sz.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
        return y.float()


class Int8Linear:
    """PyTorch's CPU int8 kernel: weight = code * scale, one scale per output row."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1).clamp(min=1e-30) / 127.0
        self.codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scales = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.codes, self.scales).float()


def _stack_int4(tensors: Sequence[TensorData]) -> Int4Groups:
    parts = [int4_groups(t.raw, t.qtype, t.shape) for t in tensors]
    if len(parts) == 1:
        return parts[0]
    return Int4Groups(
        codes=torch.cat([p.codes for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero=torch.cat([p.zero for p in parts]),
    )


def dequantize_stacked(tensors: Sequence[TensorData]) -> torch.Tensor:
    """The tensors dequantized to float32 and stacked along the output dimension."""
    return torch.cat([dequantize(t.raw, t.qtype, t.shape) for t in tensors])


def pack_for_cpu(tensors: Sequence[TensorData]):
    """The fastest exact-enough CPU format for these tensors (stacked as one Linear)."""
    qtypes = {t.qtype for t in tensors}
    in_features = tensors[0].shape[-1]
    if qtypes <= INT4_EXACT and in_features % GROUP == 0:
        return Int4Linear(_stack_int4(tensors))
    weight = dequantize_stacked(tensors)
    if qtypes == {QT.F32}:
        return DenseLinear(weight, torch.float32)
    if qtypes <= {QT.F16, QT.BF16}:
        return DenseLinear(weight, torch.bfloat16)
    return Int8Linear(weight)


def pack_dense(tensors: Sequence[TensorData], device: torch.device, dtype: torch.dtype) -> DenseLinear:
    """Dequantized onto `device`: the format for accelerators and for the float32 reference."""
    return DenseLinear(dequantize_stacked(tensors).to(device), dtype)
