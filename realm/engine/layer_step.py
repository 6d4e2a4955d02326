"""A forward step driven layer by layer from outside the engine (ABI level 2): embed the
tokens, run each layer on hidden states the caller hands back, then the logits.

The caller holds the hidden states between calls (a guest keeps them in its own memory and
may change them); the step keeps the chunk, whose keys and values each layer stores in the
session's KV cache, and commits it to the session when the logits are computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from realm.engine.session import PREFILL_CHUNK, Session
from realm.errors import InternalError, InvalidArgument
from realm.models.transformer import Chunk

MAX_TOKENS = PREFILL_CHUNK
"""The most tokens one per-layer step takes (bounded memory for the attention mask)."""


class LayerStep:
    def __init__(self, session: Session, tokens: Sequence[int], device: torch.device) -> None:
        """A step of `tokens` on `session`, computed on `device`; InvalidArgument or
        ContextOverflow before any work if the tokens do not fit."""
        if not 0 < len(tokens) <= MAX_TOKENS:
            raise InvalidArgument(f"a per-layer step takes 1..{MAX_TOKENS} tokens, got {len(tokens)}")
        self.session = session
        self.device = device
        self.chunk: Chunk = session.chunk(tokens)
        self.dim = session.transformer.config.dim

    @property
    def hidden_size(self) -> int:
        """Floats in the hidden states of this step: (tokens, dim)."""
        return len(self.chunk.tokens) * self.dim

    def embed(self) -> torch.Tensor:
        """The first hidden states (tokens, dim)."""
        return self.session.transformer.embed([self.chunk])

    def layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer `index` on `hidden` (hidden_size floats, any shape); its keys and values go
        into the session's cache. Returns the next hidden states (tokens, dim)."""
        n_layers = self.session.transformer.config.n_layers
        if not 0 <= index < n_layers:
            raise InvalidArgument(f"layer {index} is outside 0..{n_layers - 1}")
        return self.session.transformer.layer(index, self._rows(hidden), [self.chunk])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last token's logits (vocab,) from the final hidden states; the step is then
        part of the session."""
        self.session.transformer.logits(self._rows(hidden), [self.chunk])
        self.session.commit(self.chunk)
        logits = self.chunk.logits
        if logits is None:
            raise InternalError("the transformer computed no logits for the step")
        return logits[-1]

    def _rows(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.reshape(len(self.chunk.tokens), self.dim).to(self.device)
