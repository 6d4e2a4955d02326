"""The output projection on the CPU: every logit screened in int8, the best ones exact.

The output projection is the largest matrix a decode step reads (a third of smollm2's
bytes, half of gemma3's). Sampling, the reference bounds and a guest's choice of token all
hang on the largest logits; the tail only has to keep its place far below them. So the
vocabulary is screened first with one int8 code per weight and a scale per row, or per
block of 32 with Realm's own kernel (1 to 1.06 bytes a weight against 1.25 for the two
int4 planes a Q8_0 matrix takes), then each row's
`CANDIDATES` largest logits are recomputed in float32 from their weights exactly as
stored, read from the GGUF's memory map.

Re-quantizing a whole row to int8 moves a logit by a few hundredths (a tenth with the
activations rounded to int8 too, as below, and as llama.cpp computes every logit); that
alone flipped near-tie argmaxes past the reference bounds. After the exact pass the
largest logits carry no screening error at all, and the tail stays within
`tests/test_screened.py`'s bounds. On 2 threads, smollm2: one row 2.3 ms with the planes,
1.8 ms screened, eight rows 5.8 against 4.8 ms; gemma3, eight rows: 29 against 23 ms.

The codes live in oneDNN's own blocked layout (`Int8Matrix`), prepacked once: against
`torch._int_mm` on the plain matrix, a whole decode step (steps of the two kinds taking
turns, medians of 60, 2 threads) went on smollm2 from 9.3 / 13.6 / 20.2 ms to 9.3 / 12.3 /
19.0 for 1 / 4 / 8 sequences, and on gemma3 from 18.9 / 28.9 / 46.1 to 17.4 / 22.0 / 37.4.
The sums are the same integers either way.
"""

from __future__ import annotations

import torch

from realm.backends import native
from realm.errors import InternalError
from realm.models.gguf_file import TensorData

CANDIDATES = 32
"""Logits per row recomputed exactly: more than any reference check or sampler looks at
closely (llama.cpp's reference keeps 20), few enough that the exact pass costs little."""

_ROWS_PER_PIECE = 8192  # bounds the float32 copy held while the codes are made
_RUN = 64  # logits per run in `largest`


class ScreenedLinear:
    """`Linear` for an output projection: screened in int8, the top `CANDIDATES` exact."""

    def __init__(self, tensor: TensorData) -> None:
        self.tensor = tensor
        self.out_features, self.in_features = tensor.shape
        self.candidates = min(CANDIDATES, self.out_features)
        # exactly one of the two screens: Realm's kernel (codes and a scale per block of 32)
        # or oneDNN's (codes and a scale per row)
        self.blocks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.codes: Int8Matrix | None = None
        if native.load() and self.in_features % 32 == 0:
            self.blocks = _int8_blocks(tensor)
            return
        codes, scales = [], []
        for start in range(0, self.out_features, _ROWS_PER_PIECE):
            piece, scale = int8_rows(tensor.rows(slice(start, start + _ROWS_PER_PIECE)))
            codes.append(piece)
            scales.append(scale)
        self.codes = Int8Matrix(torch.cat(codes))  # (out, in)
        self.scales = torch.cat(scales)[:, 0]  # (out,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) f32 -> (T, out) f32: the screen rounds its input to int8, the candidates
        get it in float32."""
        x = x.float()
        logits = self._screen(x)
        best = largest(logits, self.candidates)  # (T, candidates)
        weights = self.tensor.rows(best.flatten().numpy()).view(len(x), self.candidates, self.in_features)
        exact = torch.bmm(weights, x[:, :, None]).squeeze(2)
        return logits.scatter_(1, best, exact)

    def _screen(self, x: torch.Tensor) -> torch.Tensor:
        """Every logit, roughly, through oneDNN's int8 GEMM, the activations rounded to int8
        per row as well, as llama.cpp does for every product. It reads the codes once for
        any number of rows: on smollm2, `_int_mm` took 1.4 ms for 1 row and 3.2 ms for 8,
        where PyTorch's bf16-input int8 kernel (`_weight_int8pack_mm`) took 2.1 and 5.8 ms
        (gemma3, 8 rows: 17 against 34 ms). Its sums are exact integers, so a row's screen
        is the same whatever else is in the batch. With Realm's own kernel (`native.py`) the
        codes have a scale per block of 32 rather than per row, which brings the tail's
        mean error from 0.13 to 0.04 (smollm2, measured), for 1/16 byte a weight more."""
        if self.codes is not None:
            codes, step = int8_rows(x)
            return self.codes(codes).mul_(step).mul_(self.scales)
        if self.blocks is None:
            raise InternalError("a ScreenedLinear was built without its int8 codes")
        return torch.ops.realm.int8_gemm(x, *self.blocks, 1, self.out_features)


def _int8_blocks(tensor: TensorData) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix in int8 codes with a float16 scale per block of 32, in the native
    kernel's layout: codes stored plus 128 (the kernel knows the block's min is -128
    scales) and scales."""
    codes, scales = [], []
    for start in range(0, tensor.shape[0], _ROWS_PER_PIECE):
        w = tensor.rows(slice(start, start + _ROWS_PER_PIECE))
        w = w.view(len(w), -1, 32)
        scale = (w.abs().amax(dim=2) / 127).half().float()
        step = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes.append((torch.round(w / step[:, :, None]).clamp_(-127, 127) + 128).to(torch.uint8).flatten(1))
        scales.append(scale)
    packed, block_scales, _ = native.group_layout(torch.cat(codes), torch.cat(scales), bits=8)
    return packed, block_scales


class Int8Matrix:
    """codes (out, in) int8, for products with activation codes (T, in) int8: the exact
    integer sums, as float32. Held prepacked in oneDNN's layout for its quantized linear
    (activations unsigned with zero point 128, unit scales) where this PyTorch has oneDNN,
    else as the plain matrix for `torch._int_mm`; the sums are the same either way."""

    def __init__(self, codes: torch.Tensor, prepack: bool = True) -> None:
        self.plain: torch.Tensor | None = codes
        self.packed: torch.Tensor | None = None
        if prepack and torch.backends.mkldnn.is_available():
            self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
            self.plain = None
            self._ones, self._zeros = torch.ones(len(codes)), torch.zeros(len(codes), dtype=torch.int64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None:  # not prepacked
            return torch._int_mm(x, self.plain.t()).float()
        unsigned = x.to(torch.int16).add_(128).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            unsigned, 1.0, 128, self.packed, self._ones, self._zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, n) as int8 codes and one scale per row, (T, 1): x ~ codes * scale."""
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row
    return torch.round(x / scale).to(torch.int8), scale


def largest(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k largest entries, in no order: `topk` over the k runs of
    `_RUN` entries with the largest maxima, which hold them all. torch.topk scans a row on
    one thread, 0.26 ms for gemma3's 262144 logits and 1.7 ms for 8 rows; this is 0.05 and
    0.4 ms."""
    rows, n = logits.shape
    if n % _RUN or n < 4 * k * _RUN:
        return logits.topk(k, dim=1, sorted=False).indices
    runs = logits.view(rows, n // _RUN, _RUN)
    best_runs = runs.amax(dim=2).topk(k, dim=1, sorted=False).indices  # (rows, k)
    within = runs.gather(1, best_runs[:, :, None].expand(rows, k, _RUN)).view(rows, k * _RUN)
    picked = within.topk(k, dim=1, sorted=False).indices
    return best_runs.gather(1, picked // _RUN) * _RUN + picked % _RUN
