"""A step's few best tokens, for a sampler that looks no further (greedy, top-k): what
`realm_forward_top` hands a guest instead of the whole row of logits, and how a grammar is
then checked lazily.

A whole row is 192 KiB (smollm2) or 1 MiB (gemma3) to copy into guest memory and scan there
(about 0.1 and 0.26 ms a token together); the host finds the best in one native pass of 7
to 35 us (backends/best_logits.cpp).

Under a grammar the mask is the costly part of a step: llguidance walks the vocabulary
(gemma3: 0.2 to 0.6 ms a step), where asking it about one token takes about a microsecond.
So a greedy step runs unmasked, and the grammar is asked about the row's best tokens in
order until it allows one (the model's favourite is allowed at about seven steps in eight,
over the schema suite; `LAZY_MOST`); only when none of the row's best `CANDIDATES` is
allowed is the mask computed, and the row masked and made exact as a
masked step makes it. Either way the logits handed back are exact (computed from the weights
as stored: a screened output projection is exact only at its own favourites). The result is
the best allowed tokens among the step's `CANDIDATES` best; a masked step's can differ only
where a token outside those would, computed exactly, beat them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from realm.backends import native
from realm.backends.one_thread import one_thread
from realm.backends.screened import CANDIDATES, largest
from realm.engine.grammar import Grammar, apply_mask
from realm.engine.session import Session

LAZY_MOST = 1
"""The most best tokens a step under a grammar checks lazily: a greedy step's. At top-k 40
(gemma3, the schema suite's own outputs, sampled) the row's best 64 held fewer than 40
allowed tokens at two steps in three; checking them first, then masking anyway, took
0.80 ms a step against 0.39 for the mask alone. At k = 1 it took 0.12 against 0.41."""

Exact = Callable[[np.ndarray], np.ndarray]
"""Token ids (n,) int64 -> their logits at a step, exact, float32 (n,)."""


def exact_logits(session: Session, row: np.ndarray) -> Exact | None:
    """The session's last step's logits (its `row`) at any tokens, exact: read from the row
    where the step computed them exactly, else computed now from the weights as stored (a
    screened output projection, backends/screened.py, is exact at its own favourites only).
    None where the whole row is exact already."""
    exact_at = getattr(session.transformer.weights.output, "exact_at", None)
    x = session.normed
    if exact_at is None or x is None:
        return None
    known = set() if session.exact_ids is None else set(session.exact_ids.tolist())

    def exact(ids: np.ndarray) -> np.ndarray:
        values = row[ids]
        todo = np.array([i not in known for i in ids.tolist()], dtype=bool)
        if todo.any():
            values[todo] = exact_at(x, torch.from_numpy(ids[todo])).numpy()
        return values

    return exact


def best_tokens(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits of `row` (vocab,) float32 and their token ids (int32), best
    first in the sampler's order (equal logits the lower id first, NaN above everything, as
    argmax takes it), -inf left out: fewer than k where fewer are above it."""
    found = native.best_logits(row, k)
    if found is not None:
        return found
    k = min(k, row.size)
    key = np.where(np.isnan(row), np.inf, row)
    ids = np.flatnonzero(key >= np.partition(key, -k)[-k])  # the k best, and any tied with the k-th
    ids, values = _in_order(ids, row[ids])
    kept = ~np.isneginf(values[:k])
    return ids[:k][kept], values[:k][kept]


def best_allowed(row: np.ndarray, k: int, grammar: Grammar, exact: Exact | None) -> tuple[np.ndarray, np.ndarray]:
    """The k best tokens that `grammar` allows next of an unmasked step's `row`, exact, best
    first: the grammar asked about the row's best tokens in order, its mask computed only
    when fewer than k of the row's CANDIDATES best are allowed. `row` is left as it was."""
    ids, _ = best_tokens(row, CANDIDATES)
    allowed = grammar.allowed_among(ids, k)
    if allowed.size < k:
        return _masked_best(row, grammar.mask(), k, exact)
    values = row[allowed] if exact is None else exact(allowed.astype(np.int64))
    return _in_order(allowed, values)


def _masked_best(row: np.ndarray, mask: np.ndarray, k: int, exact: Exact | None) -> tuple[np.ndarray, np.ndarray]:
    """From an unmasked step's row, what a step told of `mask` gives (ScreenedLinear.
    constrained): exact at the best CANDIDATES tokens the mask leaves, -inf where it
    forbids; its k best."""
    masked = row.copy()
    apply_mask(mask, masked)
    if exact is not None:
        with one_thread():  # on a guest's thread: no OpenMP team of its own
            best = largest(torch.from_numpy(masked)[None], CANDIDATES)[0].numpy()
        masked[best] = exact(best.astype(np.int64))
        apply_mask(mask, masked)  # with fewer than CANDIDATES allowed, `best` held forbidden tokens
    return best_tokens(masked, k)


def _in_order(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted best first: NaN, then larger, equal values the lower id first."""
    nan = np.isnan(values)
    order = np.lexsort((ids, -np.where(nan, 0, values), ~nan))
    return ids[order].astype(np.int32), values[order].astype(np.float32)
