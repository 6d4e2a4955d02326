"""GGML quantized tensors decoded into PyTorch.

gguf-py ships a NumPy decoder, but it loops over 16 rows at a time and takes seconds per
model. Here each format is a handful of whole-tensor NumPy operations, done in the same
order as gguf-py so both give the same float32 bits. NumPy rather than torch ops: they run
on one thread, so decoding stays fast on a host whose cores are busy serving other tenants
(torch's thread pool slowed this twentyfold under such load); it is as fast as two torch
threads on an idle host.

Q4_0, Q4_1 and Q4_K also re-express exactly as PyTorch's int4 group layout
(`int4_groups`), so the CPU int4 matmul can run them without a lossy re-quantization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from realm.errors import ModelFormatError

__all__ = [
    "SUPPORTED",
    "INT4_EXACT",
    "INT4_PLANES",
    "Int4Groups",
    "dequantize",
    "int4_groups",
    "int4_planes",
]


# ---- byte-level helpers ------------------------------------------------------------


def _blocks(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor's bytes as a uint8 [n_blocks, block_bytes] view, after checking the size.

    A wrong size means a truncated or corrupt file; catching it here keeps every decoder
    from reading past the end or reshaping garbage.
    """
    block, nbytes = GGML_QUANT_SIZES[qtype]
    cols = shape[-1] if shape else 1
    need = math.prod(shape) // block * nbytes
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if cols % block or flat.size != need:
        raise ModelFormatError(
            f"{qtype.name} tensor of shape {shape} needs {need} bytes "
            f"(rows of whole {block}-element blocks), got {flat.size}: truncated or corrupt"
        )
    return flat.reshape(-1, nbytes)


def _half(b: np.ndarray) -> np.ndarray:
    """A 2-byte fp16 field of every block, [n, 2] bytes, as float32 [n, 1]."""
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """4-bit codes [n, 2 * bytes]: each run of `run` bytes holds `run` elements in its low
    nibbles followed by the next `run` elements in its high nibbles (GGML's layout)."""
    qs = qs.reshape(qs.shape[0], -1, 1, run)
    return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(qs.shape[0], -1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 32-bit little-endian qh [n, 4] bytes as bit j for element j, [n, 32]."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block as 8 six-bit scales and 8 mins (float32).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the
    same for mins; bytes 8-11 the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high).
    """
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([d & 63, (md & 15) | ((d >> 2) & 48)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 48)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_parts(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block of 32 of a Q4_K/Q5_K super-block: w = scale*q - offset, both [n, 8, 1]."""
    sc, mn = _k_scales(b[:, 4:16])
    return (_half(b[:, 0:2]) * sc)[..., None], (_half(b[:, 2:4]) * mn)[..., None]


# ---- one decoder per format: uint8 [n, block_bytes] -> float32 [n, block_elements] ---------


def _from_f32(b: np.ndarray) -> np.ndarray:
    # A copy, so the tensor never aliases the model file's read-only mapping.
    return b.view(np.float32).copy()


def _from_f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)


def _from_bf16(b: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    """Block 32: d fp16, 16 bytes of nibbles; w = d * (q - 8)."""
    return (_nibbles(b[:, 2:], 16).view(np.int8) - np.int8(8)) * _half(b[:, 0:2])


def _q4_1(b: np.ndarray) -> np.ndarray:
    """Block 32: d, m fp16, 16 bytes of nibbles; w = d * q + m."""
    return _half(b[:, 0:2]) * _nibbles(b[:, 4:], 16) + _half(b[:, 2:4])


def _q5_codes(b: np.ndarray, first: int) -> np.ndarray:
    """Q5_0 / Q5_1 codes q = 16*hi + lo in 0..31, [n, 32]; `first`: where qh starts."""
    return _nibbles(b[:, first + 4 :], 16) | (_fifth_bits(b[:, first : first + 4]) << 4)


def _q5_0(b: np.ndarray) -> np.ndarray:
    """Block 32: d fp16, 32-bit qh (the 5th bits), 16 bytes of nibbles; w = d * (q - 16)."""
    return (_q5_codes(b, 2).view(np.int8) - np.int8(16)) * _half(b[:, 0:2])


def _q5_1(b: np.ndarray) -> np.ndarray:
    """Block 32: d, m fp16, 32-bit qh, 16 bytes of nibbles; w = d * q + m."""
    return _half(b[:, 0:2]) * _q5_codes(b, 4) + _half(b[:, 2:4])


def _q8_0(b: np.ndarray) -> np.ndarray:
    """Block 32: d fp16, 32 int8; w = d * q."""
    return b[:, 2:].view(np.int8) * _half(b[:, 0:2])


def _q4_k(b: np.ndarray) -> np.ndarray:
    """Super-block 256: d, dmin fp16, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    (runs of 32); sub-block i of 32: w = d*sc[i]*q - dmin*m[i]."""
    scale, offset = _k_parts(b)
    q = _nibbles(b[:, 16:], 32).reshape(-1, 8, 32)
    return (scale * q - offset).reshape(-1, 256)


def _q5_k_codes(b: np.ndarray) -> np.ndarray:
    """Q4_K's layout with 32 bytes qh before the nibbles: bit i of byte j is the 5th bit of
    element 32*i + j. The codes in 0..31, [n, 8, 32]."""
    high = np.unpackbits(b[:, 16:48, None], axis=2, bitorder="little")  # [n, byte j, bit i]
    return _nibbles(b[:, 48:], 32).reshape(-1, 8, 32) | (high.transpose(0, 2, 1) << 4)


def _q5_k(b: np.ndarray) -> np.ndarray:
    """Super-block 256 as Q4_K's with 5-bit codes; sub-block i of 32: w = d*sc[i]*q - dmin*m[i]."""
    scale, offset = _k_parts(b)
    return (scale * _q5_k_codes(b) - offset).reshape(-1, 256)


_PAIRS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)


def _q6_k_codes(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K codes q in 0..63, [n, 256], and the scales s = d * scale, [n, 16]: one per 16
    elements, w = s * (q - 32)."""
    n = b.shape[0]
    low = _nibbles(b[:, :128], 64).reshape(n, 2, 128)
    high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _PAIRS) & 3).reshape(n, 2, 128)
    return (low | (high << 4)).reshape(n, 256), _half(b[:, 208:210]) * b[:, 192:208].view(np.int8)


def _q6_k(b: np.ndarray) -> np.ndarray:
    """Super-block 256 in two halves of 128: ql 128 bytes (low 4 bits, nibble runs of 64),
    qh 64 bytes (top 2 bits: bit pair k of byte j is element 32*k + j of its half),
    16 int8 scales (one per 16 elements), d fp16; w = d * scale * (q - 32)."""
    codes, scale = _q6_k_codes(b)
    q = (codes.view(np.int8) - np.int8(32)).reshape(-1, 16, 16)
    return (scale[..., None] * q).reshape(-1, 256)


_DECODERS: dict[QT, Callable[[np.ndarray], np.ndarray]] = {
    QT.F32: _from_f32,
    QT.F16: _from_f16,
    QT.BF16: _from_bf16,
    QT.Q4_0: _q4_0,
    QT.Q4_1: _q4_1,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.Q8_0: _q8_0,
    QT.Q4_K: _q4_k,
    QT.Q5_K: _q5_k,
    QT.Q6_K: _q6_k,
}

SUPPORTED: frozenset[QT] = frozenset(_DECODERS)


def _check_type(qtype: QT, supported: frozenset[QT]) -> None:
    if qtype not in supported:
        names = ", ".join(sorted(t.name for t in supported))
        raise ModelFormatError(f"quantization type {qtype.name} is not supported (supported: {names})")


def dequantize(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one GGUF tensor to float32.

    raw: the tensor's bytes (any array whose bytes are the tensor's, e.g. a `TensorData.raw`
    of bytes per row, or a typed float array). shape: the logical row-major shape, i.e. the
    GGUF dimensions reversed. Raises ModelFormatError for an unsupported type or a byte size
    that does not match the shape.
    """
    _check_type(qtype, SUPPORTED)
    shape = tuple(int(n) for n in shape)
    return torch.from_numpy(_DECODERS[qtype](_blocks(raw, qtype, shape)).reshape(shape))


# ---- exact int4 re-expression ------------------------------------------------------------


@dataclass(frozen=True)
class Int4Groups:
    """A weight as 4-bit codes with a scale and zero per group of 32 along cols.

    w = (codes - 8) * scale + zero, which is what PyTorch's int4 kernels
    (`torch._weight_int4pack_mm_for_cpu`) compute, so these feed them without loss.
    """

    codes: torch.Tensor  # uint8 [rows, cols], 0..15
    scale: torch.Tensor  # float32 [rows, cols // 32]
    zero: torch.Tensor  # float32 [rows, cols // 32]


_Groups = tuple[np.ndarray, np.ndarray, np.ndarray]


def _q4_0_groups(b: np.ndarray) -> _Groups:
    d = _half(b[:, 0:2])
    return _nibbles(b[:, 2:], 16), d, np.zeros_like(d)


def _q4_1_groups(b: np.ndarray) -> _Groups:
    # d*q + m = d*(q - 8) + (m + 8d)
    d, m = _half(b[:, 0:2]), _half(b[:, 2:4])
    return _nibbles(b[:, 4:], 16), d, m + 8 * d


def _q4_k_groups(b: np.ndarray) -> _Groups:
    # scale*q - offset = scale*(q - 8) + (8*scale - offset). scale and offset are exact in
    # float32 (an fp16 times a 6-bit integer), so only the zero point rounds, once.
    scale, offset = _k_parts(b)
    return _nibbles(b[:, 16:], 32), scale, 8 * scale - offset


_GROUPERS: dict[QT, Callable[[np.ndarray], _Groups]] = {
    QT.Q4_0: _q4_0_groups,
    QT.Q4_1: _q4_1_groups,
    QT.Q4_K: _q4_k_groups,
}

INT4_EXACT: frozenset[QT] = frozenset(_GROUPERS)


def int4_groups(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> Int4Groups:
    """Re-express a Q4_0 / Q4_1 / Q4_K tensor [rows, cols] as int4 groups of 32 without
    re-quantizing: the codes are GGML's own and only the zero point may round, in its last
    float32 bit. Raises ModelFormatError for other types."""
    _check_type(qtype, INT4_EXACT)
    shape = tuple(int(n) for n in shape)
    codes, scale, zero = _GROUPERS[qtype](_blocks(raw, qtype, shape))
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return Int4Groups(
        codes=torch.from_numpy(codes.reshape(rows, cols)),
        scale=torch.from_numpy(scale.reshape(rows, cols // 32)),
        zero=torch.from_numpy(zero.reshape(rows, cols // 32)),
    )


# ---- exact int4 planes for 5- and 8-bit formats ------------------------------------------


def _q8_0_planes(b: np.ndarray) -> list[_Groups]:
    # q + 128 = 16*hi + lo with lo, hi in 0..15; d*q = [d*(lo-8) + 8d] + [16d*(hi-8)]
    d = _half(b[:, 0:2])
    u = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return [(u & 15, d, 8 * d), (u >> 4, 16 * d, np.zeros_like(d))]


def _q5_planes(b: np.ndarray, offset_of: Callable[[np.ndarray], np.ndarray], first: int) -> list[_Groups]:
    # q = 16*hi + lo, hi in {0, 1}; d*q + offset = [d*(lo-8) + 8d + offset] + [16d*(hi-8) + 128d]
    d = _half(b[:, 0:2])
    q = _q5_codes(b, first)
    return [(q & 15, d, 8 * d + offset_of(d)), (q >> 4, 16 * d, 128 * d)]


def _q5_k_planes(b: np.ndarray) -> list[_Groups]:
    # sub-block of 32: scale*q - offset, q = 16*hi + lo
    scale, offset = _k_parts(b)  # [n, 8, 1]
    q = _q5_k_codes(b)
    return [(q & 15, scale, 8 * scale - offset), (q >> 4, 16 * scale, 128 * scale)]


def _q6_k_planes(b: np.ndarray) -> list[_Groups]:
    # Scales change every 16 elements, groups are 32: one plane per half-group, the other
    # half coded 8 (= 0). q = 16*h + l: s*(q - 32) = s*(l - 8) + 8s*((2h + 5) - 8).
    n = b.shape[0]
    codes, scales = _q6_k_codes(b)
    q = codes.reshape(n, 8, 2, 16)  # [block, group, half, element]
    s = scales.reshape(n, 8, 2)
    planes = []
    for half in (0, 1):
        mine = np.zeros((1, 1, 2, 1), dtype=bool)
        mine[0, 0, half, 0] = True
        zero = np.zeros_like(s[..., half])
        for codes, scale in ((q & 15, s[..., half]), (2 * (q >> 4) + 5, 8 * s[..., half])):
            planes.append((np.where(mine, codes, 8).astype(np.uint8), scale, zero))
    return planes


_PLANE_SPLITTERS: dict[QT, Callable[[np.ndarray], list[_Groups]]] = {
    QT.Q8_0: _q8_0_planes,
    QT.Q5_0: lambda b: _q5_planes(b, lambda d: -16 * d, 2),  # w = d*q - 16d
    QT.Q5_1: lambda b: _q5_planes(b, lambda d: _half(b[:, 2:4]), 4),  # w = d*q + m
    QT.Q5_K: _q5_k_planes,
    QT.Q6_K: _q6_k_planes,
}

INT4_PLANES: frozenset[QT] = INT4_EXACT | frozenset(_PLANE_SPLITTERS)


def int4_planes(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> list[Int4Groups]:
    """The tensor as a sum of int4 group tensors, exactly: one for Q4_0 / Q4_1 / Q4_K, two
    (low and high nibble of the code) for Q5_0, Q5_1, Q5_K and Q8_0, four for Q6_K (whose
    scales change every 16 elements). A matmul with the planes stacked along the input
    dimension reads 0.5 byte per weight per plane and loses nothing."""
    if qtype in INT4_EXACT:
        return [int4_groups(raw, qtype, shape)]
    _check_type(qtype, INT4_PLANES)
    shape = tuple(int(n) for n in shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return [
        Int4Groups(
            codes=torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols)),
            scale=torch.from_numpy(np.ascontiguousarray(scale).reshape(rows, cols // 32)),
            zero=torch.from_numpy(np.ascontiguousarray(zero).reshape(rows, cols // 32)),
        )
        for codes, scale, zero in _PLANE_SPLITTERS[qtype](_blocks(raw, qtype, shape))
    ]


# ---- exact 5-bit codes with a scale and a minimum per 32 ----------------------------------


def _q5_0_fives(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _half(b[:, 0:2])  # w = d * q - 16 * d
    return _q5_codes(b, 2), d, -16 * d


def _q5_1_fives(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _q5_codes(b, 4), _half(b[:, 0:2]), _half(b[:, 2:4])


def _q5_k_fives(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale, offset = _k_parts(b)  # [n, 8, 1]
    return _q5_k_codes(b).reshape(-1, 256), scale.reshape(-1, 8), -offset.reshape(-1, 8)


_FIVES: dict[QT, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    QT.Q5_0: _q5_0_fives,
    QT.Q5_1: _q5_1_fives,
    QT.Q5_K: _q5_k_fives,
}

INT5_EXACT: frozenset[QT] = frozenset(_FIVES)


def int5_codes(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q5_0 / Q5_1 / Q5_K tensor [rows, cols] as w = scale * code + min per block of 32:
    codes [rows, cols] uint8 in 0..31 (GGML's own), scales and mins [rows, cols // 32]
    float32 (Q5_K's are its products of two scales)."""
    _check_type(qtype, INT5_EXACT)
    shape = tuple(int(n) for n in shape)
    codes, scale, low = _FIVES[qtype](_blocks(raw, qtype, shape))
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return (
        torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, cols // 32)),
        torch.from_numpy(np.ascontiguousarray(low, dtype=np.float32).reshape(rows, cols // 32)),
    )


# ---- exact signed 8-bit codes for symmetric 5-, 6- and 8-bit formats ---------------------


def _q8_0_signed(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = _half(b[:, 0:2])
    return b[:, 2:].view(np.int8), np.repeat(d, 2, axis=1)


def _q5_0_signed(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # w = d * (q - 16), q = 16*hi + lo in 0..31
    return _q5_codes(b, 2).astype(np.int8) - 16, np.repeat(_half(b[:, 0:2]), 2, axis=1)


def _q6_k_signed(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q, scales = _q6_k_codes(b)
    return q.astype(np.int8) - 32, scales


_SIGNED: dict[QT, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    QT.Q8_0: _q8_0_signed,
    QT.Q5_0: _q5_0_signed,
    QT.Q6_K: _q6_k_signed,
}

INT8_EXACT: frozenset[QT] = frozenset(_SIGNED)


def int8_codes(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 / Q5_0 / Q6_K tensor [rows, cols] as w = scale * code, exactly: int8 codes
    [rows, cols] (GGML's own, re-centred on 0) and float32 scales [rows, cols // 16], one
    per 16 elements (Q6_K's scales change that often; the others repeat theirs)."""
    _check_type(qtype, INT8_EXACT)
    shape = tuple(int(n) for n in shape)
    codes, scale = _SIGNED[qtype](_blocks(raw, qtype, shape))
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return (
        torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, cols // 16)),
    )
