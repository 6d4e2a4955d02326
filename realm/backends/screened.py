"""The output projection on the CPU: every logit screened in few bits, the best ones exact.

The output projection is the largest matrix a decode step reads (a fifth of smollm2's
bytes, more than half of gemma3's: 262,144 rows). Sampling, the reference bounds and a
guest's choice of token all hang on the largest logits; the tail only has to keep its
place far below them. So the vocabulary is screened first, then each row's `CANDIDATES`
largest logits are recomputed in float32 from their weights exactly as stored, read from
the GGUF file.

The screen, with Realm's own kernel (native.py): int8 codes with a float16 scale per block
of 32 (1.06 bytes a weight), or, for a matrix whose 8-bit screen would pass
`FOUR_BIT_FROM` bytes, 4-bit codes with a scale and a minimum per block (0.625 bytes a
weight). Without the native library: oneDNN's int8 GEMM, one scale per row.

Re-quantizing a whole row to int8 moves a logit by a few hundredths (a tenth with the
activations rounded to int8 too, as below, and as llama.cpp computes every logit); that
alone flipped near-tie argmaxes past the reference bounds. After the exact pass the
largest logits carry no screening error at all. The tail moves by 0.04 on average with
8-bit blocks (smollm2); with 4 bits by 0.26 (at most 1.9, gemma3's reference prompts),
for a screen that reads half: gemma3's took 2.8 against 5.5 ms a row (AMD EPYC, 2
threads), of a 13 ms step. Sampling with top-k up to `CANDIDATES` (the default is 40)
sees exact logits only.

oneDNN's codes live in its own blocked layout (`Int8Matrix`), prepacked once: against
`torch._int_mm` on the plain matrix, a whole decode step (steps of the two kinds taking
turns, medians of 60, 2 threads) went on smollm2 from 9.3 / 13.6 / 20.2 ms to 9.3 / 12.3 /
19.0 for 1 / 4 / 8 sequences, and on gemma3 from 18.9 / 28.9 / 46.1 to 17.4 / 22.0 / 37.4.
The sums are the same integers either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from realm.backends import native
from realm.backends.one_thread import one_thread
from realm.errors import InternalError
from realm.models.gguf_file import TensorData

CANDIDATES = 64
"""Logits per row recomputed exactly: more than any reference check or default sampler
looks at (llama.cpp's reference keeps 20, top-k defaults to 40), and enough that the
4-bit screen never left one of the true top 20 out on gemma3's reference prompts (with
32, 131 rows of 962 lost one); few enough that the exact pass costs little."""
FOUR_BIT_FROM = 128 << 20
"""Bytes of an 8-bit screen past which it is made of 4-bit codes instead: gemma3's (178 MB,
more than half of a step's reads) is, smollm2's (30 MB, where 4 bits would save 6% of a
step for a tail error 0.43 on average instead of 0.04) is not."""

_ROWS_PER_PIECE = 8192  # bounds the float32 copy held while the codes are made
_RUN = 64  # logits per run in `largest`


class ScreenedLinear:
    """`Linear` for an output projection: screened in 8 or 4 bits, the top `CANDIDATES` exact."""

    def __init__(self, tensor: TensorData) -> None:
        self.tensor = tensor
        self.out_features, self.in_features = tensor.shape
        self.candidates = min(CANDIDATES, self.out_features)
        # exactly one of the three screens: Realm's kernel (8-bit codes and a scale per block
        # of 32, or 4-bit codes and a scale and a minimum) or oneDNN's (a scale per row)
        self.blocks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.nibbles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.codes: Int8Matrix | None = None
        if native.load() and self.in_features % 32 == 0:
            eight_bit_bytes = self.out_features * self.in_features * (32 + 2) // 32  # codes, a scale a block
            if eight_bit_bytes > FOUR_BIT_FROM:
                self.nibbles = _int4_blocks(tensor)
            else:
                self.blocks = _int8_blocks(tensor)
            return
        codes, scales = [], []
        for _, w in _pieces(tensor):
            piece, scale = int8_rows(w)
            codes.append(piece)
            scales.append(scale)
        self.codes = Int8Matrix(torch.cat(codes))  # (out, in)
        self.scales = torch.cat(scales)[:, 0]  # (out,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(T, in) f32 -> (T, out) f32: the screen rounds its input to int8, the candidates
        get it in float32."""
        return self.screened(x)[0]

    def screened(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As a call, and the ids of each row's logits made exact (T, candidates)."""
        x = x.float()
        logits = self._screen(x)
        best = largest(logits, self.candidates)  # (T, candidates)
        return logits.scatter_(1, best, self._exact(x, best)), best

    def constrained(self, x: torch.Tensor, rows: list[int], allowed: torch.Tensor) -> torch.Tensor:
        """As a call, and rows `rows` of x also exact at the best `candidates` tokens that
        `allowed` (len(rows), out) bool leaves them: a mask (a grammar, a guest's) that forbids
        a row's favourites then lets no roughly screened logit (4 bits: ~0.3 off) decide
        among the rest. The logits stay unmasked: the caller masks them."""
        x = x.float()
        logits = self(x)
        picked = logits[rows].masked_fill_(~allowed, float("-inf"))
        best_allowed = largest(picked, self.candidates)
        index = torch.tensor(rows)
        return logits.index_put_((index[:, None], best_allowed), self._exact(x[index], best_allowed))

    def exact_at(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One row x (in,)'s logits at ids (n,), exact: as the step computes its candidates',
        on the calling thread alone (a guest's thread: one_thread.py)."""
        with one_thread():
            return self._exact(x.float()[None], ids[None])[0]

    def _exact(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Row t's logits at ids[t] (T, k), from the weights as stored."""
        weights = native.read_rows(self.tensor, ids.flatten()).view(*ids.shape, self.in_features)
        return torch.bmm(weights, x[:, :, None]).squeeze(2)

    def precise(self, x: torch.Tensor) -> torch.Tensor:
        """Every logit exact, for rows that want them all (perplexity, scoring), where the
        tail's screening error would move a score: the matrix dequantized a slice of rows
        at a time. gemma3, 292 rows: 0.9 s against 0.3 s screened."""
        x = x.float()
        return torch.cat([x @ w.T for _, w in _pieces(self.tensor)], dim=1)

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
        if self.nibbles is not None:
            return torch.ops.realm.int4_gemm(x, *self.nibbles, self.out_features)
        if self.blocks is None:
            raise InternalError("a ScreenedLinear was built without its codes")
        return torch.ops.realm.int8_gemm(x, *self.blocks, 1, self.out_features)


def _pieces(tensor: TensorData) -> Iterator[tuple[int, torch.Tensor]]:
    """The matrix dequantized to float32, `_ROWS_PER_PIECE` rows at a time, with each
    piece's first row."""
    for start in range(0, tensor.shape[0], _ROWS_PER_PIECE):
        yield start, tensor.rows(slice(start, start + _ROWS_PER_PIECE))


def _int8_blocks(tensor: TensorData) -> tuple[torch.Tensor, torch.Tensor]:
    """The matrix in int8 codes with a float16 scale per block of 32, in the native
    kernel's layout: codes stored plus 128 (the kernel knows the block's min is -128
    scales) and scales."""
    codes = torch.empty(tensor.shape, dtype=torch.uint8)
    scales = []
    for start, w in _pieces(tensor):
        w = w.view(len(w), -1, 32)
        low, high = w.amin(dim=2), w.amax(dim=2)  # 5x faster than torch.aminmax over 32
        scale = (torch.maximum(high, low.neg_()) / 127).half().float()
        step = torch.where(scale > 0, scale, torch.ones_like(scale))
        # in place and into `codes`: each fresh piece-sized tensor costs its page faults (transient_heap)
        w.div_(step[:, :, None]).round_().clamp_(-127, 127).add_(128)
        codes[start : start + len(w)] = w.flatten(1)
        scales.append(scale)
    packed, block_scales, _ = native.group_layout(codes, torch.cat(scales), bits=8)
    return packed, block_scales


def _int4_blocks(tensor: TensorData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matrix in 4-bit codes with a float16 scale and minimum per block of 32
    (w ~ d * code + m, as Q4_1 stores a weight), in the native kernel's layout."""
    codes = torch.empty(tensor.shape, dtype=torch.uint8)
    scales, mins = [], []
    for start, w in _pieces(tensor):
        w = w.view(len(w), -1, 32)
        low, high = w.amin(dim=2).half().float(), w.amax(dim=2)  # 5x faster than torch.aminmax over 32
        scale = ((high - low) / 15).half().float()
        step = torch.where(scale > 0, scale, torch.ones_like(scale))
        w.sub_(low[:, :, None]).div_(step[:, :, None]).round_().clamp_(0, 15)  # in place, as in _int8_blocks
        codes[start : start + len(w)] = w.flatten(1)
        scales.append(scale)
        mins.append(low)
    packed, block_scales, block_mins = native.group_layout(codes, torch.cat(scales), torch.cat(mins))
    assert block_mins is not None
    return packed, block_scales, block_mins


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
