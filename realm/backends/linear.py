"""Weight formats per device, each a `Linear`: the kernels the forward pass runs on.

On the CPU the quantized formats run in Realm's own kernels (`native.py`), as llama.cpp
runs them: each activation row rounded to 8 bits per block of 32, integer dot products
with the weights' own codes. Q4_0, Q4_1 and Q4_K are 4-bit codes (`NativeInt4Linear`);
Q5_0, Q5_1 and Q5_K 5-bit codes (`NativeInt5Linear`); Q8_0 and Q6_K signed 8-bit codes
with their scales (`NativeInt8Linear`). Nothing is re-quantized; scales are held in
float16. Every row is rounded and summed alone, so a sequence's numbers do not depend
on what else is in its batch, and through lone steps, batches and prompts the outputs
stay within the reference bounds (tests/test_reference.py).

Without those kernels (no C++ compiler, or REALM_KERNELS=pytorch) PyTorch's int4 kernel
runs the same planes (`Int4Linear`) with bf16 activations: it is 20-50x faster with bf16
than with float32 ones. A lone row goes in as two, hi = bf16(x) and lo = bf16(x - hi),
whose results are summed: 16 bits of precision for a second row through a kernel bound by
reading the weights; several rows go in rounded to bf16 (the kernel works in blocks of 4
rows, and the pair would double its passes). Its time grows with rows times planes, so a
weight of several planes also keeps a dense bf16 copy for products of `DENSE_MIN_ROWS`
rows or more (a 128-token prefill of gemma3: 360 ms -> 128 ms). Float weights stay dense.
The output projection has a format of its own (`screened.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from realm.backends import native
from realm.models.gguf_file import TensorData
from realm.models.quants import (
    INT4_PLANES,
    INT5_EXACT,
    INT8_EXACT,
    Int4Groups,
    dequantize,
    int4_planes,
    int5_codes,
    int8_codes,
)

GROUP = 32
DENSE_MIN_ROWS = 4


def _bf16_product(kernel, x: torch.Tensor) -> torch.Tensor:
    """kernel(x) for a kernel of bf16 rows: a lone row carried as hi + lo rows, several
    rows rounded to bf16 (see the module docstring)."""
    if x.shape[0] > 1:
        return kernel(x.to(torch.bfloat16)).float()
    hi = x.to(torch.bfloat16)
    y = kernel(torch.cat((hi, (x - hi).to(torch.bfloat16))))
    return y[x.shape[0] :].float().add_(y[: x.shape[0]])


class DenseLinear:
    """A plain matrix in `dtype` on any device: the GPU format, and the one for float tensors.
    A bf16 matrix takes its input as a compensated pair (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.out_features, self.in_features = weight.shape
        self.weight = weight.to(dtype).contiguous()  # (out, in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16:
            return _bf16_product(self._product, x)
        return self._product(x.to(self.weight.dtype)).float()

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()

    def dense(self) -> torch.Tensor:
        return self.weight.float()


class Int4Linear:
    """PyTorch's CPU int4 kernel: weight = (code - 8) * scale + zero per group of 32 inputs.

    A weight held as P planes (W = W_1 + ... + W_P) runs as one product of the input
    repeated P times with the planes side by side; `dense`, its bf16 copy if it has one,
    takes products of many rows instead."""

    def __init__(self, planes: Sequence[Int4Groups], dense: DenseLinear | None = None) -> None:
        self.n_planes = len(planes)
        self.dense = dense
        groups = Int4Groups(
            codes=torch.cat([p.codes for p in planes], dim=1),
            scale=torch.cat([p.scale for p in planes], dim=1),
            zero=torch.cat([p.zero for p in planes], dim=1),
        )
        self.out_features, self.in_features = groups.codes.shape[0], groups.codes.shape[1] // self.n_planes
        pad = -self.out_features % 16  # the kernel packs rows in sixteens; pad with zero rows
        if pad:
            groups = Int4Groups(
                codes=F.pad(groups.codes, (0, 0, 0, pad), value=8),
                scale=F.pad(groups.scale, (0, 0, 0, pad)),
                zero=F.pad(groups.zero, (0, 0, 0, pad)),
            )
        self.packed = torch._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
        # (in / 32, out, 2): the kernel's layout
        sz = torch.stack((groups.scale, groups.zero), dim=-1).transpose(0, 1).contiguous()
        self.scales_zeros = sz.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] >= DENSE_MIN_ROWS and not torch.compiler.is_compiling():
            return self.dense(x)
        if self.n_planes > 1:
            x = x.repeat(1, self.n_planes)
        return _bf16_product(self._kernel, x)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        return y[:, : self.out_features] if y.shape[1] != self.out_features else y


class NativeInt4Linear:
    """Realm's own int4 kernel (`native.py`): activations rounded to 8 bits per block of 32,
    as llama.cpp rounds them, against the codes in integer dot products; w = d * code + m
    with d and m in float16 (exact for Q4_0 / Q4_1, a relative 2**-11 for Q4_K's products
    of scales). Planes are stacked along the input as in `Int4Linear`. No dense copy for
    prompts: the kernel reads a group's codes once for 4 rows, and a 128-token prefill of
    gemma3 ran as fast on the codes alone as with bf16 copies (782 against 744 tok/s; 512
    tokens: 0.95x), for 2 bytes a weight less."""

    def __init__(self, planes: Sequence[Int4Groups]) -> None:
        codes = torch.cat([p.codes for p in planes], dim=1)
        scale = torch.cat([p.scale for p in planes], dim=1)
        mins = torch.cat([p.zero for p in planes], dim=1) - 8 * scale
        self.out_features, self.in_features = codes.shape[0], codes.shape[1] // len(planes)
        self.codes, self.scales, packed_mins = native.group_layout(codes, scale, mins, bits=4)
        assert packed_mins is not None
        self.mins = packed_mins

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.realm.int4_gemm(x.float(), self.codes, self.scales, self.mins, self.out_features)


class NativeInt5Linear:
    """Realm's own kernel on 5-bit codes with a float16 scale and minimum per 32 weights
    (`quants.int5_codes`): Q5_0 and Q5_1 exactly as stored, Q5_K with its products of two
    scales rounded to float16. 0.75 bytes a weight, where the same codes as signed 8-bit
    ones took 1.06 (gemma3's Q5_0 layers: 45 MiB instead of 64) and their int4 planes 1.25."""

    def __init__(self, tensors: Sequence[TensorData]) -> None:
        parts = [int5_codes(t.raw, t.qtype, t.shape) for t in tensors]
        codes, scale, mins = (torch.cat(column) for column in zip(*parts, strict=True))
        self.out_features, self.in_features = codes.shape
        self.codes, self.scales, packed_mins = native.group_layout(codes, scale, mins, bits=5)
        assert packed_mins is not None
        self.mins = packed_mins

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.realm.int5_gemm(x.float(), self.codes, self.scales, self.mins, self.out_features)


class NativeInt8Linear:
    """Realm's own kernel on signed 8-bit codes with a float16 scale per 16 or 32 weights:
    Q8_0, Q6_K (and Q5_0 stacked with them) exactly as stored (`quants.int8_codes`; Q6_K's
    products of two scales round to float16, a relative 2**-11), 1.06-1.12 bytes a weight
    where their int4 planes took 1.25 to 2.5 (gemma3's layers: 92 MiB a step instead of ~126)."""

    def __init__(self, tensors: Sequence[TensorData]) -> None:
        parts = [int8_codes(t.raw, t.qtype, t.shape) for t in tensors]
        codes = torch.cat([c for c, _ in parts]).to(torch.int16) + 128
        scale = torch.cat([s for _, s in parts])
        self.out_features, self.in_features = codes.shape
        self.scales_per_block = 1 if torch.equal(scale[:, 0::2], scale[:, 1::2]) else 2
        if self.scales_per_block == 1:
            scale = scale[:, 0::2]
        self.codes, self.scales, _ = native.group_layout(codes, scale, bits=8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.realm.int8_gemm(x.float(), self.codes, self.scales, self.scales_per_block, self.out_features)


def _stack_planes(tensors: Sequence[TensorData]) -> list[Int4Groups]:
    """The tensors' int4 planes stacked along the output rows; a tensor with fewer planes
    than the others gets all-zero planes (code 8, scale 0, zero 0)."""
    per_tensor = [int4_planes(t.raw, t.qtype, t.shape) for t in tensors]
    depth = max(len(p) for p in per_tensor)
    for planes in per_tensor:
        while len(planes) < depth:
            g = planes[0]
            planes.append(Int4Groups(torch.full_like(g.codes, 8), torch.zeros_like(g.scale), torch.zeros_like(g.zero)))
    return [
        Int4Groups(
            codes=torch.cat([p[i].codes for p in per_tensor]),
            scale=torch.cat([p[i].scale for p in per_tensor]),
            zero=torch.cat([p[i].zero for p in per_tensor]),
        )
        for i in range(depth)
    ]


def dequantize_stacked(tensors: Sequence[TensorData]) -> torch.Tensor:
    """The tensors dequantized to float32 and stacked along the output dimension."""
    return torch.cat([dequantize(t.raw, t.qtype, t.shape) for t in tensors])


def pack_for_cpu(
    tensors: Sequence[TensorData],
) -> NativeInt8Linear | NativeInt5Linear | NativeInt4Linear | Int4Linear | DenseLinear:
    """The fastest exact-enough CPU format for these layer tensors (stacked as one Linear)."""
    qtypes = {t.qtype for t in tensors}
    in_features = tensors[0].shape[-1]
    if qtypes <= INT5_EXACT and in_features % GROUP == 0 and native.load():
        return NativeInt5Linear(tensors)
    if qtypes <= INT8_EXACT and in_features % GROUP == 0 and native.load():
        return NativeInt8Linear(tensors)
    if qtypes <= INT4_PLANES and in_features % GROUP == 0:
        planes = _stack_planes(tensors)
        if native.load():
            return NativeInt4Linear(planes)
        dense = None
        if len(planes) > 1:
            dense = DenseLinear(dequantize_stacked(tensors), torch.bfloat16)
        return Int4Linear(planes, dense)
    weight = dequantize_stacked(tensors)
    if qtypes <= {QT.F16, QT.BF16}:
        return DenseLinear(weight, torch.bfloat16)
    return DenseLinear(weight, torch.float32)


def pack_dense(tensors: Sequence[TensorData], device: torch.device, dtype: torch.dtype) -> DenseLinear:
    """Dequantized onto `device`: the format for accelerators and for the float32 reference."""
    return DenseLinear(dequantize_stacked(tensors).to(device), dtype)
