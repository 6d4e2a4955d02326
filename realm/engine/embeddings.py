"""Embeddings from a generative model (/v1/embeddings): the final normed hidden states of the
input, mean-pooled and L2-normalised.

The model runs layer by layer (engine/layer_step.py, ABI level 2's path) in a session of
its own that is dropped afterwards: no logits, no generation. The served models are not
trained as embedding models; docs/SERVING.md says what their vectors are good for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from realm.engine.layer_step import MAX_TOKENS, LayerStep
from realm.errors import InvalidArgument
from realm.models.transformer import rms_norm

if TYPE_CHECKING:
    from realm.engine.model import Model

MAX_EMBEDDING_TOKENS = MAX_TOKENS
"""Tokens of one input: one layer-by-layer step (bounded memory for its attention)."""


@torch.inference_mode()
def pooled_embedding(model: Model, tokens: Sequence[int], skip: int = 0) -> np.ndarray:
    """The unit-length mean of the final normed hidden states of `tokens[skip:]`, (dim,)
    float32; the first `skip` tokens (a BOS) are context, not pooled. InvalidArgument if
    nothing is left to pool, or there are more than MAX_EMBEDDING_TOKENS tokens or any
    outside the vocabulary."""
    if not 0 <= skip < len(tokens):
        raise InvalidArgument("the input has no tokens to embed")
    if len(tokens) > min(MAX_EMBEDDING_TOKENS, model.config.context_length):
        raise InvalidArgument(
            f"the input has {len(tokens)} tokens; one input may have at most "
            f"{min(MAX_EMBEDDING_TOKENS, model.config.context_length)}"
        )
    step = LayerStep(model.new_session(len(tokens)), tokens, model.backend.device)
    x = step.embed()
    for layer in range(model.config.n_layers):
        x = step.layer(layer, x)
    final = rms_norm(x, model.transformer.weights.output_norm, model.config.norm_eps)  # (tokens, dim)
    mean = final[skip:].double().mean(dim=0)
    norm = mean.norm()
    return (mean / norm if norm > 0 else mean).float().cpu().numpy()
