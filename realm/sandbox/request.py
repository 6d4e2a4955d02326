"""The request a guest reads with `realm_request_read` (docs/ABI.md, "The request").

The host resolves the model first (its name and SHA-256 go in the request, so the guest
can check the id it gets against the hash), validates the sampling parameters, and fills
in a random seed when the caller gave none (a guest has no entropy of its own).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from realm.engine.logprobs import MAX_TOP_LOGPROBS
from realm.engine.model_store import StoredModel
from realm.engine.sampling import SamplingParams
from realm.errors import InvalidArgument


def build_request(
    model: StoredModel,
    *,
    prompt: str | None = None,
    messages: Sequence[Mapping[str, Any]] | None = None,
    max_tokens: int = 128,
    params: SamplingParams | None = None,
    stop: Sequence[str] = (),
    name: str | None = None,
    prompt_tokens: Sequence[int] | None = None,
    constraint: Mapping[str, Any] | None = None,
    top_logprobs: int | None = None,
) -> dict[str, Any]:
    """The request object for `model`: exactly one of `prompt` and `messages`. A host that
    has already made the prompt's tokens (models/prompt.py) passes them as `prompt_tokens`,
    so a guest need not render and tokenize the prompt a second time. `constraint`: what the
    output must match (engine/grammar.py), checked by the caller. `top_logprobs`: ask for
    each emitted token's log-probability and this many most likely alternatives (0..20);
    None: no log-probabilities."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("a request has either a prompt or messages (one of them)")
    if max_tokens < 0:
        raise InvalidArgument("max_tokens must be >= 0")
    if any(not isinstance(s, str) for s in stop):
        raise InvalidArgument("stop strings must be strings")
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}")
    p = params or SamplingParams()
    return (
        {
            "model": name or model.name,
            "model_sha256": model.sha256,
            "prompt": prompt,
            "messages": [dict(m) for m in messages] if messages is not None else None,
            "max_tokens": max_tokens,
            "temperature": p.temperature,
            "top_k": p.top_k,
            "top_p": p.top_p,
            "min_p": p.min_p,
            "repeat_penalty": p.repeat_penalty,
            "repeat_last_n": p.repeat_last_n,
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "seed": p.seed % 2**64 if p.seed is not None else random.getrandbits(63),
            "stop": list(stop),
            "logit_bias": [[t, b] for t, b in p.logit_bias],
            "logprobs": top_logprobs is not None,
            "top_logprobs": top_logprobs or 0,
        }
        | ({"prompt_tokens": [int(t) for t in prompt_tokens]} if prompt_tokens is not None else {})
        | ({"constraint": dict(constraint)} if constraint is not None else {})
    )
