"""realm.models.quants against gguf-py's reference decoder and PyTorch's int4 kernel."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from realm.errors import ModelFormatError
from realm.models.gguf_file import GGUFFile
from realm.models.quants import (
    INT4_EXACT,
    INT4_PLANES,
    SUPPORTED,
    Int4Groups,
    dequantize,
    int4_groups,
    int4_planes,
)

ROWS, COLS = 32, 512  # rows a multiple of 16 and cols of 256, as the int4 kernel and K-quants need
QUANTIZABLE = [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0]
BLOCK_TYPES = sorted(SUPPORTED - {QT.F32, QT.F16, QT.BF16})
# Byte offsets of each block's fp16 scale fields: the only bytes of a block that random
# values could make invalid (inf/nan), so the random-block generator overwrites them.
FP16_FIELDS = {
    QT.Q4_0: [0],
    QT.Q4_1: [0, 2],
    QT.Q5_0: [0],
    QT.Q5_1: [0, 2],
    QT.Q8_0: [0],
    QT.Q4_K: [0, 2],
    QT.Q5_K: [0, 2],
    QT.Q6_K: [208],
}


def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, (ROWS, COLS)).astype(np.float32)


def random_blocks(qtype: QT, seed: int = 0) -> np.ndarray:
    """Random but valid raw bytes [ROWS, bytes per row]: every bit pattern of codes, scales
    and mins, with fp16 scale fields set to magnitudes real weights use."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (ROWS, COLS // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scale = rng.uniform(1e-4, 2e-3, raw.shape[:2]) * rng.choice([-1, 1], raw.shape[:2])
        raw[..., off : off + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(ROWS, -1)


def assert_same_as_gguf(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> None:
    ours = dequantize(raw, qtype, shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    np.testing.assert_array_equal(ours.numpy(), gguf_dequantize(raw, qtype).reshape(shape))


def assert_int4_exact(g: Int4Groups, w: torch.Tensor) -> None:
    """The groups rebuild `w`, both by the formula and through PyTorch's int4 matmul."""
    rows, cols = w.shape
    assert tuple(g.codes.shape) == (rows, cols)
    assert tuple(g.scale.shape) == tuple(g.zero.shape) == (rows, cols // 32)
    assert int(g.codes.min()) >= 0 and int(g.codes.max()) <= 15
    scale = g.scale.repeat_interleave(32, dim=1)
    zero = g.zero.repeat_interleave(32, dim=1)
    rebuilt = (g.codes.float() - 8) * scale + zero
    torch.testing.assert_close(rebuilt, w, rtol=1e-6, atol=1e-7)
    # Tighter: codes and scales are exact, so only the zero point and the final add round.
    eps = torch.finfo(torch.float32).eps
    assert bool(((rebuilt - w).abs() <= eps * (zero.abs() + w.abs())).all())

    packed = torch._convert_weight_to_int4pack_for_cpu(g.codes.to(torch.int32), 1)
    sz = torch.stack([g.scale, g.zero], -1).transpose(0, 1).contiguous()
    kernel = torch._weight_int4pack_mm_for_cpu(torch.eye(cols), packed, 32, sz).t()
    torch.testing.assert_close(kernel, w, rtol=0, atol=1e-5 * float(w.abs().max()))


# ---- synthetic tensors ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_by_gguf_matches_gguf(qtype: QT) -> None:
    assert_same_as_gguf(gguf_quantize(weights(), qtype), qtype, (ROWS, COLS))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf(qtype: QT) -> None:
    assert_same_as_gguf(random_blocks(qtype), qtype, (ROWS, COLS))


def test_three_dimensional_shape() -> None:
    raw = gguf_quantize(weights(), QT.Q8_0)
    ours = dequantize(raw, QT.Q8_0, (4, ROWS // 4, COLS))
    np.testing.assert_array_equal(ours.reshape(ROWS, COLS).numpy(), gguf_dequantize(raw, QT.Q8_0))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda t: t.name)
def test_int4_groups_of_quantized_weights(qtype: QT) -> None:
    raw = gguf_quantize(weights(1), qtype)
    assert_int4_exact(int4_groups(raw, qtype, (ROWS, COLS)), dequantize(raw, qtype, (ROWS, COLS)))


@pytest.mark.parametrize("qtype", sorted(INT4_EXACT), ids=lambda t: t.name)
def test_int4_groups_of_random_blocks(qtype: QT) -> None:
    raw = random_blocks(qtype, seed=2)
    assert_int4_exact(int4_groups(raw, qtype, (ROWS, COLS)), dequantize(raw, qtype, (ROWS, COLS)))


# ---- bad input ---------------------------------------------------------------------------


def test_truncated_tensor_is_a_format_error() -> None:
    raw = random_blocks(QT.Q4_K).reshape(-1)[:-1]
    with pytest.raises(ModelFormatError, match="Q4_K.*truncated or corrupt"):
        dequantize(raw, QT.Q4_K, (ROWS, COLS))
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        int4_groups(raw, QT.Q4_K, (ROWS, COLS))


def test_row_not_whole_blocks_is_a_format_error() -> None:
    raw = np.zeros(GGML_QUANT_SIZES[QT.Q8_0][1] * 3, dtype=np.uint8)
    with pytest.raises(ModelFormatError, match="Q8_0"):
        dequantize(raw, QT.Q8_0, (2, 48))  # 96 elements, 3 blocks, but rows of 1.5 blocks


def test_unsupported_type_is_named() -> None:
    with pytest.raises(ModelFormatError, match="IQ2_XS is not supported.*Q4_K"):
        dequantize(np.zeros(66, dtype=np.uint8), QT.IQ2_XS, (256,))
    with pytest.raises(ModelFormatError, match="Q8_0 is not supported"):
        int4_groups(gguf_quantize(weights(), QT.Q8_0), QT.Q8_0, (ROWS, COLS))


# ---- real models ---------------------------------------------------------------------------

MAX_ROWS = 512  # keeps the reference decoder fast on the big embedding tables

REAL = [
    ("smollm2_path", QT.Q4_1),
    ("smollm2_path", QT.Q8_0),
    ("smollm2_path", QT.F32),
    ("gemma3_path", QT.Q4_K),
    ("gemma3_path", QT.Q5_0),
    ("gemma3_path", QT.Q6_K),
    ("gemma3_path", QT.Q8_0),
    ("gemma3_path", QT.F32),
]


@functools.cache
def reader(path: Path) -> GGUFFile:
    """Realm's own reader (tests/test_gguf_file.py checks it against the gguf package's,
    which takes 10 s over gemma3's vocabulary); the decoding below is still the package's."""
    return GGUFFile(path)


def first_tensor(path: Path, qtype: QT) -> tuple[np.ndarray, tuple[int, ...]]:
    """Up to MAX_ROWS rows of the model's first tensor of this type, with their logical shape."""
    if not path.exists():
        pytest.skip(f"{path} not present")
    t = next(t for t in reader(path).tensors.values() if t.qtype == qtype)
    data = np.asarray(t.raw)[:MAX_ROWS]
    if qtype == QT.F32:  # the package decodes plain floats from their own dtype, not bytes
        data = data.view(np.float32)
    return data, (data.shape[0], *t.shape[1:])


@pytest.mark.parametrize(("model", "qtype"), REAL, ids=lambda v: getattr(v, "name", v))
def test_real_tensor_matches_gguf(model: str, qtype: QT, request: pytest.FixtureRequest) -> None:
    data, shape = first_tensor(request.getfixturevalue(model), qtype)
    assert_same_as_gguf(data, qtype, shape)


@pytest.mark.parametrize(
    ("model", "qtype"),
    [("smollm2_path", QT.Q4_1), ("gemma3_path", QT.Q4_K)],
    ids=lambda v: getattr(v, "name", v),
)
def test_real_int4_groups(model: str, qtype: QT, request: pytest.FixtureRequest) -> None:
    data, _ = first_tensor(request.getfixturevalue(model), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    data = data[:64, : 512 // block * size]  # whole blocks, so still a valid tensor: 64 x 512
    shape = (64, 512)
    assert_int4_exact(int4_groups(data, qtype, shape), dequantize(data, qtype, shape))


def planes_rebuild(planes: list[Int4Groups]) -> torch.Tensor:
    return sum(
        (p.codes.float() - 8) * p.scale.repeat_interleave(32, dim=1) + p.zero.repeat_interleave(32, dim=1)
        for p in planes
    )


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_every_quantized_type_splits_into_exact_int4_planes(qtype: QT) -> None:
    assert qtype in INT4_PLANES
    raw = random_blocks(qtype, seed=3)
    planes = int4_planes(raw, qtype, (ROWS, COLS))
    assert len(planes) == {QT.Q6_K: 4, QT.Q4_0: 1, QT.Q4_1: 1, QT.Q4_K: 1}.get(qtype, 2)
    for p in planes:
        assert int(p.codes.min()) >= 0 and int(p.codes.max()) <= 15
    torch.testing.assert_close(planes_rebuild(planes), dequantize(raw, qtype, (ROWS, COLS)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q6_K], ids=lambda q: q.name)
def test_planes_through_the_int4_kernel(qtype: QT) -> None:
    """The planes side by side, fed the input repeated, give x @ W.T in one kernel call, to
    bf16 precision: the kernel holds each group's scale and zero in bf16 (a relative 2**-9
    each), and over 40 random inputs the largest error came to 0.63 % of the largest
    output, lone row or several. (An unseeded input once made this a coin toss at 0.5 %.)"""
    from realm.backends.linear import Int4Linear

    raw = random_blocks(qtype, seed=4)
    w = dequantize(raw, qtype, (ROWS, COLS))
    linear = Int4Linear(int4_planes(raw, qtype, (ROWS, COLS)))
    for rows in (1, 3):
        x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(rows))
        ref = x @ w.T
        assert (linear(x) - ref).abs().max() <= 1e-2 * ref.abs().max(), rows


def test_int4_linear_with_rows_not_a_multiple_of_sixteen() -> None:
    from realm.backends.linear import Int4Linear

    raw = gguf_quantize(weights()[:27], QT.Q8_0)
    w = dequantize(raw, QT.Q8_0, (27, COLS))
    x = torch.randn(2, COLS, generator=torch.Generator().manual_seed(0))  # unseeded: 12 of 500 inputs passed 5e-3
    y = Int4Linear(int4_planes(raw, QT.Q8_0, (27, COLS)))(x)
    assert y.shape == (2, 27)
    assert (y - x @ w.T).abs().max() <= 5e-3 * (x @ w.T).abs().max()
