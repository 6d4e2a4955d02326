"""Log-probabilities of sampled tokens, as OpenAI's `logprobs` reports them: the model's own
distribution at the step, the log-softmax of its raw logits (before logit bias, penalties,
top-k/p, min-p and temperature, as vLLM and OpenAI report it), in float64.

Computed on the host from the logits the step produced (realm_logprobs, docs/ABI.md), so a
guest pays no WebAssembly time for it and gemma3's 262,144-token vocabulary costs about a
millisecond."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from realm.engine.sampling import _first_n, _ordered
from realm.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20
"""The most alternatives one token may list (OpenAI's limit)."""

FLOOR = -9999.0
"""What an impossible token (-inf logit, or NaN) reports: OpenAI's own floor, and valid JSON."""


@dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's log-probability and the step's most likely tokens, most likely
    first (the lower id first on equal logits)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability)


def token_logprobs(logits: np.ndarray, token: int, n_top: int) -> TokenLogprobs:
    """`token`'s log-probability under the logits (vocab,) float32, and the `n_top` most
    likely tokens'. InvalidArgument for a token outside the vocabulary or n_top outside
    0..MAX_TOP_LOGPROBS."""
    vocab = logits.size
    if not 0 <= token < vocab:
        raise InvalidArgument(f"token {token} is outside the vocabulary (size {vocab})")
    if not 0 <= n_top <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"n_top must be in 0..{MAX_TOP_LOGPROBS}, got {n_top}")
    x = logits.astype(np.float64)
    x[np.isnan(x)] = -math.inf
    m = float(x.max())
    if not math.isfinite(m):
        raise InvalidArgument("the step's logits have no finite largest value")
    log_total = m + math.log(float(np.exp(x - m).sum()))
    top = _ordered(x, _first_n(x, n_top)) if n_top else np.empty(0, np.int64)
    return TokenLogprobs(
        token,
        _finite(float(x[token]) - log_total),
        tuple((int(t), _finite(float(x[t]) - log_total)) for t in top),
    )


def _finite(v: float) -> float:
    return v if math.isfinite(v) else FLOOR
