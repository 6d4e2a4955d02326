"""The output projection on the CPU: every logit screened in int8, the best ones exact.

The output projection is the largest matrix a decode step reads (a third of smollm2's
bytes, half of gemma3's). Sampling, the reference bounds and a guest's choice of token all
hang on the largest logits; the tail only has to keep its place far below them. So the
vocabulary is screened first with one int8 code per weight and one scale per row (1 byte
a weight against 1.25 for the two int4 planes a Q8_0 matrix takes), then each row's
`CANDIDATES` largest logits are recomputed in float32 from their weights exactly as
stored, read from the GGUF's memory map.

Re-quantizing a whole row to int8 moves a logit by a few hundredths (a tenth with the
activations rounded to int8 too, as below, and as llama.cpp computes every logit); that
alone flipped near-tie argmaxes past the reference bounds. After the exact pass the
largest logits carry no screening error at all, and the tail stays within
`tests/test_screened.py`'s bounds. On 2 threads, smollm2: one row 2.3 ms with the planes,
1.8 ms screened, eight rows 5.8 against 4.8 ms; gemma3, eight rows: 29 against 23 ms.
"""

from __future__ import annotations

import torch

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
        codes, scales = [], []
        for start in range(0, self.out_features, _ROWS_PER_PIECE):
            piece, scale = int8_rows(tensor.rows(slice(start, start + _ROWS_PER_PIECE)))
            codes.append(piece)
            scales.append(scale)
        self.codes = torch.cat(codes)  # (out, in)
        self.scales = torch.cat(scales)[:, 0]  # (out,)

    def __call__(self, x: torch.Tensor, precise: bool = True) -> torch.Tensor:
        """(T, in) f32 -> (T, out) f32. `precise` is moot: the screen rounds its input
        anyway, and the candidates always get float32."""
        x = x.float()
        logits = self._screen(x)
        best = largest(logits, self.candidates)  # (T, candidates)
        weights = self.tensor.rows(best.flatten().numpy()).view(len(x), self.candidates, self.in_features)
        exact = torch.bmm(weights, x[:, :, None]).squeeze(2)
        return logits.scatter_(1, best, exact)

    def _screen(self, x: torch.Tensor) -> torch.Tensor:
        """Every logit, roughly, through oneDNN's int8 GEMM (`_int_mm`), the activations
        rounded to int8 per row as well, as llama.cpp does for every product. It reads the
        codes once for any number of rows: on smollm2, 1 row took 1.4 ms and 8 rows 3.2 ms,
        where PyTorch's bf16-input int8 kernel (`_weight_int8pack_mm`) took 2.1 and 5.8 ms
        (gemma3, 8 rows: 17 against 34 ms). Its sums are exact integers, so a row's screen
        is the same whatever else is in the batch."""
        codes, step = int8_rows(x)
        return torch._int_mm(codes, self.codes.t()).float().mul_(step).mul_(self.scales)


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
