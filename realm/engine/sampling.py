"""Choosing the next token from logits, in llama.cpp's order and with its defaults.

Order: logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> draw.
Temperature <= 0 is greedy. This is the one sampling algorithm of Realm: the default guest (guest/default.c)
runs it in WebAssembly, this module on the host (`realm run --no-sandbox`), and the same
seed gives the same tokens in both, bit for bit. docs/ABI.md ("Sampling") specifies it
exactly: penalties in float64 rounded to float32; the rest in float64, with the
candidates ordered by logit then token id, sums taken one term at a time in a stated
order, `exp` the series of `rt_exp` (guest/include/realm_rt.h, mirrored by `exp64`), and
one draw from xoshiro256** seeded through splitmix64.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from realm.errors import InvalidArgument

MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    min_p: float = 0.05  # 0.0 disables
    repeat_penalty: float = 1.0  # 1.0 disables
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a fresh random seed; taken modulo 2^64
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), ids ascending, once each

    def __post_init__(self) -> None:
        biases = tuple(sorted((int(t), float(np.float32(b))) for t, b in self.logit_bias))
        object.__setattr__(self, "logit_bias", biases)  # float32 values: what the guest adds
        checks = [
            (0 <= self.temperature < math.inf, "temperature must be >= 0 and finite"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in biases), "logit_bias: ids >= 0, biases in [-100, 100]"),
            (len({t for t, _ in biases}) == len(biases), "logit_bias names a token twice"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)

    @classmethod
    def greedy(cls) -> SamplingParams:
        return cls(temperature=0.0)

    def top_candidates(self, vocab: int, most: int) -> int:
        """How many of a step's best tokens sampling looks at, where that is at most `most`
        and nothing (a logit bias, a penalty) can bring a token in from below them: 1 when
        greedy, else top_k; 0 for the whole row. The default guest has the same rule."""
        penalised = self.repeat_last_n > 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )
        if self.logit_bias or penalised:
            return 0
        if self.temperature <= 0:
            return 1
        return self.top_k if 0 < self.top_k <= most and self.top_k < vocab else 0


# ---------------------------------------------------------------------------- the generator


def splitmix64(state: int) -> tuple[int, int]:
    """One step of splitmix64: (the next state, the output). It turns a seed into
    xoshiro256**'s state, as the xoshiro authors recommend."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & MASK64


class Xoshiro256:
    """xoshiro256** (Blackman and Vigna): the sampler's one random generator, the guest's too."""

    def __init__(self, state: Sequence[int]) -> None:
        self.s = [x & MASK64 for x in state]

    @classmethod
    def seeded(cls, seed: int) -> Xoshiro256:
        """The state is the first four outputs of splitmix64 started at `seed` mod 2^64."""
        x, state = seed & MASK64, []
        for _ in range(4):
            x, out = splitmix64(x)
            state.append(out)
        return cls(state)

    def next_u64(self) -> int:
        s = self.s
        result = (_rotl((s[1] * 5) & MASK64, 7) * 9) & MASK64
        t = (s[1] << 17) & MASK64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = _rotl(s[3], 45)
        return result

    def uniform(self) -> float:
        """A float64 in [0, 1): the output's top 53 bits times 2^-53."""
        return (self.next_u64() >> 11) * 2.0**-53


# ---------------------------------------------------------------------------- exp


_LOG2_E = 1.44269504088896338700
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


def _pow2(k: np.ndarray) -> np.ndarray:
    """2^k as float64, exactly, for integer k in [-1022, 1023] (built from its bits)."""
    return ((k + 1023) << 52).view(np.float64)


def exp64(x: np.ndarray) -> np.ndarray:
    """e^x of a float64 array, bit for bit `rt_exp` of guest/include/realm_rt.h: the
    sampler's exp, so that the guest and the host agree to the last bit.

    k = x * log2(e) rounded half to even; r = (x - k ln2_hi) - k ln2_lo; then 1 + 14 terms
    of e^r's series, each term the previous times (r / i), added in turn; the sum times 2^k
    with one rounding (two exact factors here, as in the C); NaN stays NaN, x > 709 is inf,
    x < -745 is 0. Every operation is one IEEE float64 operation, as in the C, where no
    compiler may fuse or reorder them."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: masked at the end
        k = np.rint(x * _LOG2_E)
        r = x - k * _LN2_HI
        r -= k * _LN2_LO
        term, total, step = np.ones_like(x), np.ones_like(x), np.empty_like(x)
        for i in range(1, 15):
            np.divide(r, i, out=step)
            term *= step
            total += term
        ki = np.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0).clip(-1100, 1100).astype(np.int64)
        half = ki >> 1
        total *= _pow2(half)
        total *= _pow2(ki - half)
    total[x < -745.0] = 0.0
    total[x > 709.0] = math.inf
    return np.where(np.isnan(x), x, total)


# ---------------------------------------------------------------------------- the sampler


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed % 2**64 if params.seed is not None else random.getrandbits(63)
        self.rng = Xoshiro256.seeded(self.seed)

    def sample(self, logits: torch.Tensor, history: Sequence[int]) -> int:
        """logits: (vocab,) of the next position; history: tokens so far (for penalties)."""
        p = self.params
        raw = logits.detach().float().flatten().cpu().numpy().copy()
        penalised = self._penalise(self._bias(raw), history)
        if p.temperature <= 0:
            return int(np.argmax(penalised))  # the first maximum, or the first NaN
        x = penalised.astype(np.float64)
        x[np.isnan(x)] = -math.inf
        vocab = x.size
        ids = _first_n(x, p.top_k) if 0 < p.top_k < vocab else np.arange(vocab)  # ascending
        values = x[ids]
        m = float(values.max())
        if not math.isfinite(m):  # every candidate -inf, or some +inf: the first in the order
            return int(ids[np.flatnonzero(values == m)[0]])
        if p.top_p < 1.0 or p.min_p > 0.0:
            e = exp64(values - m)  # each candidate's probability times the sum: the best has 1
            total = float(np.cumsum(e)[-1])  # in token id order
        if p.min_p > 0.0:
            survive = e >= p.min_p
            ids, values, e = ids[survive], values[survive], e[survive]
        n = ids.size
        if p.top_p < 1.0:
            # the shortest prefix of the order whose weights reach top_p * total: sort a
            # growing head of the order, not the whole vocabulary
            threshold, head = p.top_p * total, min(n, 256)
            while True:
                order = _ordered(values, _first_n(values, head))
                cumulative = np.cumsum(e[order])
                if head == n or cumulative[-1] >= threshold:
                    break
                head = min(n, head * 8)
            order = order[: min(head, int(np.count_nonzero(cumulative < threshold)) + 1)]
        else:
            order = _ordered(values, np.arange(n))
        weights = np.cumsum(exp64((values[order] - m) / p.temperature))
        target = self.rng.uniform() * float(weights[-1])
        return int(ids[order[min(int(np.count_nonzero(weights <= target)), order.size - 1)]])

    def _bias(self, logits: np.ndarray) -> np.ndarray:
        """OpenAI's logit_bias, in place: each biased token's float32 logit plus its float32
        bias, one float32 addition (llama.cpp's logit-bias sampler, first in its chain)."""
        if not self.params.logit_bias:
            return logits
        ids = np.array([t for t, _ in self.params.logit_bias], np.int64)
        if ids[-1] >= logits.size:
            raise InvalidArgument(f"logit_bias names token {ids[-1]}, outside the vocabulary (size {logits.size})")
        logits[ids] += np.array([b for _, b in self.params.logit_bias], np.float32)
        return logits

    def _penalise(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Repeat, frequency and presence penalties over the last repeat_last_n tokens, in
        place: computed in float64 from the float32 logit and rounded back to float32."""
        p = self.params
        if p.repeat_last_n == 0 or not history:
            return logits
        if p.repeat_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            return logits
        counts = Counter(t for t in history[-p.repeat_last_n :] if 0 <= t < logits.size)
        ids = np.fromiter(counts.keys(), np.int64, len(counts))
        n = np.fromiter(counts.values(), np.float64, len(counts))
        x = logits[ids].astype(np.float64)
        x = np.where(x <= 0, x * p.repeat_penalty, x / p.repeat_penalty)
        logits[ids] = (x - n * p.frequency_penalty - p.presence_penalty).astype(np.float32)
        return logits


def _first_n(values: np.ndarray, n: int) -> np.ndarray:
    """The positions of the first n values in the order (larger first, the lower position
    first on ties), ascending. torch.topk (a few times faster than numpy's partition) leaves
    ties at the n-th value unordered: they are settled here by position."""
    if n >= values.size:
        return np.arange(values.size)
    nth = float(torch.topk(torch.from_numpy(values), n, sorted=False).values.min())
    above = np.flatnonzero(values > nth)
    tied = np.flatnonzero(values == nth)[: n - above.size]
    return np.sort(np.concatenate((above, tied)))


def _ordered(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`positions` (ascending) put in the order of their values: a stable sort keeps the
    lower position first on ties."""
    return positions[np.argsort(-values[positions], kind="stable")]
