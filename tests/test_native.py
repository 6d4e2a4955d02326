"""Realm's own CPU kernels (realm/backends/quantized_gemm.cpp) against the arithmetic they
claim: activations rounded to int8 per block of 32, exact integer sums, float16 scales;
and the token mask (token_mask.cpp) against NumPy's select.

Every instruction-set body is checked on this machine: the library picks one when it
loads, so the AVX2 and plain C++ bodies run in child processes with REALM_KERNEL_ISA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from test_quants import COLS, ROWS, random_blocks

from realm.backends import native
from realm.backends.linear import Int4Linear, NativeInt4Linear, NativeInt5Linear, NativeInt8Linear, pack_for_cpu
from realm.errors import InternalError
from realm.models.quants import dequantize, int4_planes

pytestmark = pytest.mark.skipif(not native.load(), reason="the native kernel is not built (make setup builds it)")

SHAPES = [(96, 64, 1, 1), (100, 576, 1, 3), (64, 640, 2, 8), (17, 96, 1, 5), (36, 160, 4, 2), (8, 544, 2, 9)]
"""(rows of W, inputs, planes, rows of x): groups of 16 and not, odd block counts, tiles of 4 and not."""


def rounded_product(x: torch.Tensor, w: torch.Tensor, planes: int) -> torch.Tensor:
    """x rounded to int8 per block of 32 as the kernel rounds it, repeated per plane, @ w.T in float64."""
    t, k = x.shape
    blocks = x.view(t, k // 32, 32)
    step = blocks.abs().amax(dim=2, keepdim=True) / 127
    inverse = torch.where(step > 0, 1 / step, torch.zeros_like(step))  # float32, as the kernel: x * (1 / dx)
    q = torch.round(blocks * inverse) * step
    return q.view(t, k).repeat(1, planes).double() @ w.double().T


def check_kernels(seed: int = 0) -> float:
    """The largest error of any kernel (4, 5 and 8 bits) over SHAPES, relative to the
    largest output."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n, k, planes, t in SHAPES:
        x = torch.randn(t, k, generator=g)
        codes = torch.randint(0, 16, (n, k * planes), generator=g)
        scale = (torch.rand(n, k * planes // 32, generator=g) * 0.02).half().float()
        mins = (-torch.rand(n, k * planes // 32, generator=g) * 0.1).half().float()
        w = (codes.float().view(n, -1, 32) * scale[:, :, None] + mins[:, :, None]).view(n, -1)
        y = torch.ops.realm.int4_gemm(x, *native.group_layout(codes, scale, mins, bits=4), n)
        want = rounded_product(x, w, planes)
        worst = max(worst, float((y.double() - want).abs().max() / want.abs().max()))
        fives = torch.randint(0, 32, (n, k), generator=g)  # every fifth bit pattern, in every row and slice
        w5 = (fives.float().view(n, -1, 32) * scale[:, : k // 32, None] + mins[:, : k // 32, None]).view(n, k)
        y5 = torch.ops.realm.int5_gemm(x, *native.group_layout(fives, scale[:, : k // 32], mins[:, : k // 32], 5), n)
        want5 = rounded_product(x, w5, 1)
        worst = max(worst, float((y5.double() - want5).abs().max() / want5.abs().max()))
        signed = torch.randint(-128, 128, (n, k), generator=g)
        for per_block in (1, 2):  # a scale per 32 weights, or per 16
            scale8 = (torch.rand(n, k // 32 * per_block, generator=g) * 0.02).half().float()
            w8 = (signed.float().view(n, -1, 32 // per_block) * scale8[:, :, None]).view(n, k)
            codes8, scales8, _ = native.group_layout(signed + 128, scale8, bits=8)
            y8 = torch.ops.realm.int8_gemm(x, codes8, scales8, per_block, n)
            want8 = rounded_product(x, w8, 1)
            worst = max(worst, float((y8.double() - want8).abs().max() / want8.abs().max()))
    return worst


def mask_agrees(seed: int = 0) -> bool:
    """Whether the native mask forbids exactly the tokens whose bit is clear, over vocabularies
    of whole words and not, and masks that allow almost nothing, half and almost everything."""
    rng = np.random.default_rng(seed)
    for vocab in (33, 1000, 49152, 262144):
        for share in (0.001, 0.5, 0.999):
            allowed = rng.random(vocab) < share
            mask = np.packbits(np.pad(allowed, (0, -vocab % 32)), bitorder="little").view(np.uint32).copy()
            logits = rng.standard_normal(vocab).astype(np.float32)
            want = np.where(allowed, logits, np.float32(-np.inf))
            if not native.mask_logits(logits, mask) or not np.array_equal(logits, want):
                return False
    return True


def best_in_order(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampler's order, by sorting the whole row: NaN first, then larger, equal logits
    the lower id first; -inf left out."""
    nan = np.isnan(row)
    order = np.lexsort((np.arange(row.size), -np.where(nan, 0, row), ~nan))
    order = order[~np.isneginf(row[order])][:k]
    return order.astype(np.int32), row[order]


def best_agrees(seed: int = 0) -> bool:
    """Whether the native best logits are the sorted row's first k: many ties (small
    integers), -inf, NaN, rows shorter than k, and real-sized rows."""
    rng = np.random.default_rng(seed)
    for trial in range(600):
        n = int(rng.integers(1, 3000)) if trial < 590 else (49152, 262144)[trial % 2]
        row = rng.integers(-4, 4, size=n).astype(np.float32) if trial % 2 else rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            row[rng.integers(0, n, n // 3 + 1)] = -np.inf
        if trial % 5 == 0:
            row[rng.integers(0, n, 3)] = np.nan
        k = int(rng.integers(1, 70))
        found, (ids, values) = native.best_logits(row, k), best_in_order(row, k)
        if found is None or not np.array_equal(found[0], ids) or not np.array_equal(found[1], values, equal_nan=True):
            return False
    return True


def test_the_kernels_compute_the_rounded_product() -> None:
    """Only float32 accumulation separates the kernel from the float64 product of the same
    rounded numbers."""
    assert check_kernels() <= 1e-5


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_instruction_set_body_computes_the_same(isa: str) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
        "from realm.backends import native; native.load(); import test_native as t; "
        "print(torch.ops.realm.isa(), t.check_kernels(), t.mask_agrees(), t.best_agrees())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "REALM_KERNEL_ISA": isa},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    name, worst, masks, best = done.stdout.split()
    assert name == isa and float(worst) <= 1e-5 and masks == "True" and best == "True"


def test_the_token_mask_forbids_exactly_the_clear_bits() -> None:
    assert mask_agrees()
    with pytest.raises(InternalError, match="does not cover"):
        native.mask_logits(np.zeros(65, np.float32), np.zeros(2, np.uint32))


def test_a_rows_best_logits_are_the_first_of_the_sorted_row() -> None:
    assert best_agrees()
    with pytest.raises(InternalError, match="float32 row"):
        native.best_logits(np.zeros(8, np.float64), 2)


def test_a_rows_product_is_the_same_in_any_batch() -> None:
    """Each row is rounded and summed alone: batching never changes a sequence's numbers."""
    g = torch.Generator().manual_seed(1)
    codes, scale = torch.randint(0, 16, (48, 256), generator=g), torch.rand(48, 8, generator=g) * 0.01
    packed = native.group_layout(codes, scale, -8 * scale, bits=4)
    x = torch.randn(7, 256, generator=g)
    whole = torch.ops.realm.int4_gemm(x, *packed, 48)
    assert torch.equal(whole, torch.cat([torch.ops.realm.int4_gemm(row[None], *packed, 48) for row in x]))


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_K, QT.Q8_0, QT.Q6_K], ids=lambda q: q.name)
def test_the_native_linear_against_the_dequantized_weight(qtype: QT) -> None:
    """A real format through its planes: within 1.5 % of the largest output of x @ W.T (the
    error of rounding x to 8 bits, as llama.cpp does), as close as PyTorch's bf16 kernel."""
    raw = random_blocks(qtype, seed=5)
    w = dequantize(raw, qtype, (ROWS, COLS))
    planes = int4_planes(raw, qtype, (ROWS, COLS))
    lin, theirs = NativeInt4Linear(planes), Int4Linear(planes)
    for rows in (1, 3):
        x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(rows))
        ref = x @ w.T
        assert (lin(x) - ref).abs().max() <= 1.5e-2 * ref.abs().max(), rows
        assert (theirs(x) - ref).abs().max() <= 1.5e-2 * ref.abs().max(), rows


@pytest.mark.parametrize(
    ("qtype", "beside", "kind"),
    [
        (QT.Q8_0, QT.Q8_0, NativeInt8Linear),
        (QT.Q6_K, QT.Q6_K, NativeInt8Linear),
        (QT.Q5_0, QT.Q8_0, NativeInt8Linear),
        (QT.Q5_0, QT.Q5_0, NativeInt5Linear),
        (QT.Q5_1, QT.Q5_1, NativeInt5Linear),
        (QT.Q5_K, QT.Q5_K, NativeInt5Linear),
    ],
    ids=lambda v: getattr(v, "name", None) or getattr(v, "__name__", "?"),
)
def test_formats_through_their_own_codes(qtype: QT, beside: QT, kind: type) -> None:
    """Q8_0 and Q6_K as signed 8-bit codes (one scale per 32 weights where the format
    repeats it, two, per 16, for Q6_K), Q5_0 stacked with them too; the 5-bit formats alone
    or together as 5-bit codes: within the error of rounding x to 8 bits."""
    from realm.models.gguf_file import TensorData

    raws = [random_blocks(q, seed=7 + i) for i, q in enumerate((qtype, beside))]
    w = torch.cat([dequantize(raw, q, (ROWS, COLS)) for raw, q in zip(raws, (qtype, beside), strict=True)])
    tensors = [TensorData(name="w", qtype=q, shape=(ROWS, COLS), raw=raw) for raw, q in zip(raws, (qtype, beside))]
    lin = pack_for_cpu(tensors)  # stacked, as q/k/v are
    assert isinstance(lin, kind)
    if isinstance(lin, NativeInt8Linear):
        assert lin.scales_per_block == (2 if qtype == QT.Q6_K else 1)
    for rows in (1, 5):
        x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(rows))
        ref = x @ w.T
        assert (lin(x) - ref).abs().max() <= 1.5e-2 * ref.abs().max(), rows


def test_the_cpu_backend_packs_for_the_native_kernel_unless_told_not_to() -> None:
    from realm.models.gguf_file import TensorData

    raw = random_blocks(QT.Q4_0, seed=6)
    tensor = TensorData(name="w", qtype=QT.Q4_0, shape=(ROWS, COLS), raw=raw)
    assert isinstance(pack_for_cpu([tensor]), NativeInt4Linear)
    code = "from realm.backends import native, linear; print(native.load(), native.isa())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "REALM_KERNELS": "pytorch"},
        check=True,
    )
    assert done.stdout.split() == ["False", "pytorch"]


def test_compiled_graphs_depend_on_the_operators_not_on_the_body_that_runs_them() -> None:
    """Graphs call the kernels through PyTorch's dispatcher: the same artifacts serve every
    instruction-set body, and PyTorch's kernels (another weight format) get their own."""
    code = "from realm.backends import native; print(native.identity())"
    ids = {
        env: subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, **dict([env.split("=")])},
        ).stdout.strip()
        for env in ("REALM_KERNEL_ISA=avx2", "REALM_KERNEL_ISA=scalar", "REALM_KERNELS=pytorch")
    }
    assert ids["REALM_KERNEL_ISA=avx2"] == ids["REALM_KERNEL_ISA=scalar"] == native.identity()
    assert ids["REALM_KERNELS=pytorch"] == "pytorch"


def test_a_damaged_library_is_a_warning_and_pytorchs_kernels(tmp_path: Path) -> None:
    """A truncated .so (a build killed half way, a disk error) must not stop a model loading."""
    built = native.library_path()
    broken = tmp_path / native.LIBRARY
    broken.write_bytes(built.read_bytes()[:4096])
    (tmp_path / (native.LIBRARY + ".sha256")).write_text(Path(str(built) + ".sha256").read_text())
    code = (
        f"from pathlib import Path; from realm.backends import native; "
        f"native.library_path = lambda: Path({str(broken)!r}); print(native.load(), native.isa())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "pytorch"]
    assert "do not load" in done.stderr


def test_rows_read_by_the_native_loop_are_the_files_rows(smollm2_path) -> None:
    """file_rows.cpp: the same bytes, dequantized the same, as TensorData.rows; an id
    outside the matrix is an error, never a read past it."""
    from realm.errors import ModelFormatError
    from realm.models.gguf_file import GGUFFile

    tensor = GGUFFile(smollm2_path).tensors["token_embd.weight"]
    ids = torch.tensor([0, 49151, 7, 7, 30000])
    assert torch.equal(native.read_rows(tensor, ids), tensor.rows(ids.numpy()))
    with pytest.raises(ModelFormatError, match="outside"):
        native.read_rows(tensor, torch.tensor([49152]))
