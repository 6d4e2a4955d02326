"""POST /v1/embeddings: OpenAI's embeddings over the served models (engine/embeddings.py).

The tenant's model permissions hold as for every endpoint; a request is one of the
tenant's concurrent requests and is charged its input tokens. Texts are tokenized with
the model's BOS (context for the model, not pooled), special tokens not parsed; token
arrays are used as given.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from realm.engine.embeddings import MAX_EMBEDDING_TOKENS, pooled_embedding
from realm.server.host import Host
from realm.server.schemas import EmbeddingRequest, invalid
from realm.server.tenants import Tenant


def embeddings(host: Host, tenant: Tenant, body: EmbeddingRequest) -> dict[str, Any]:
    """The embeddings reply for a validated request. Blocks (runs the model)."""
    served = host.resolve(tenant, host.model_name(tenant, body.model))
    model = served.entry.model
    dim = model.config.dim
    if body.dimensions is not None and body.dimensions != dim:
        raise invalid(f"dimensions must be the model's embedding length, {dim}, or left out", "dimensions")
    tok = model.tokenizer
    most = min(MAX_EMBEDDING_TOKENS, model.config.context_length)
    inputs: list[tuple[list[int], int]] = []
    for i, item in enumerate(body.items()):
        if isinstance(item, str):
            ids, skip = tok.encode(item, add_bos=tok.add_bos, parse_special=False), int(tok.add_bos)
        else:
            ids, skip = item, 0
            bad = next((t for t in ids if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise invalid(f"input[{i}]: token id {bad} is outside the vocabulary (size {tok.vocab_size})", "input")
        if len(ids) <= skip:
            raise invalid(f"input[{i}] is empty", "input")
        if len(ids) > most:
            raise invalid(f"input[{i}] has {len(ids)} tokens; one input may have at most {most}", "input")
        inputs.append((ids, skip))
    total = sum(len(ids) for ids, _ in inputs)
    admission = tenant.admit(total)
    try:
        vectors = [pooled_embedding(model, ids, skip) for ids, skip in inputs]
    finally:
        admission.release(total)
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encoded(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": served.name,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }


def _encoded(vector: np.ndarray, encoding: str) -> list[float] | str:
    """float: a JSON array; base64: the little-endian float32 bytes (what the openai client asks for)."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(v) for v in vector]
