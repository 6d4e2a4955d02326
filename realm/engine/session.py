"""A session: one sequence being generated, its tokens so far and its KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from realm.engine.kv_cache import KVCache, KVPool
from realm.errors import ContextOverflow, InternalError, InvalidArgument
from realm.models.transformer import Chunk, Transformer

PREFILL_CHUNK = 512
"""Long prompts run in pieces of this many tokens: bounded memory for the attention mask."""


class Session:
    def __init__(self, transformer: Transformer, context_length: int, pool: KVPool) -> None:
        self.transformer = transformer
        self.context_length = context_length
        self.vocab_size = transformer.config.vocab_size
        self.tokens: list[int] = []
        self.kv = KVCache(pool, context_length)
        # The decode step this sequence started with, kept to its end: a model switched to its
        # compiled step meanwhile (engine/compiled_step.py) changes no sequence midway.
        self.graph = transformer.decode_graph
        # the last step's last row as the output projection saw it, and the ids of its logits
        # the projection computed exactly (screened: only some are)
        self.normed: torch.Tensor | None = None
        self.exact_ids: torch.Tensor | None = None

    def check(self, tokens: Sequence[int]) -> None:
        """Refuse tokens outside the vocabulary or past the context before any work is done."""
        if len(self.tokens) + len(tokens) > self.context_length:
            raise ContextOverflow(
                f"{len(self.tokens) + len(tokens)} tokens exceed the context length of {self.context_length}"
            )
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")

    def chunk(self, tokens: Sequence[int], all_logits: bool = False, allowed: torch.Tensor | None = None) -> Chunk:
        """The next forward step for this session, for a caller that batches sessions;
        `allowed` (vocab,) bool: the tokens a mask lets follow (Transformer.logits)."""
        self.check(tokens)
        return Chunk(list(tokens), len(self.tokens), self.kv, all_logits, self.graph, allowed=allowed)

    def commit(self, chunk: Chunk) -> torch.Tensor:
        """Record that `chunk` has run; returns the logits the forward step gave it."""
        if chunk.logits is None:
            raise InternalError("a forward step returned without the logits of one of its chunks")
        self.tokens.extend(chunk.tokens)
        self.normed, self.exact_ids = chunk.normed, chunk.exact_ids
        return chunk.logits

    def feed(
        self, tokens: Sequence[int], all_logits: bool = False, allowed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run tokens through the model; logits of the last token (1, V) or of all (T, V),
        on the CPU whatever the device. `allowed`: the tokens a mask lets follow the last
        (`chunk`); the logits come back unmasked."""
        if not tokens:
            raise InvalidArgument("no tokens to feed")
        self.check(tokens)
        out = []
        for i in range(0, len(tokens), PREFILL_CHUNK):
            piece = tokens[i : i + PREFILL_CHUNK]
            last = i + PREFILL_CHUNK >= len(tokens)
            chunk = self.chunk(piece, all_logits, allowed if last else None)
            self.transformer.forward([chunk])
            logits = self.commit(chunk)
            if all_logits or last:
                out.append(logits)
        return torch.cat(out).float().cpu()

    def rewind(self, n_tokens: int) -> None:
        """Forget everything after the first n_tokens (the KV cache is overwritten in place)."""
        if not 0 <= n_tokens <= len(self.tokens):
            raise InvalidArgument(f"cannot rewind to {n_tokens}: session holds {len(self.tokens)} tokens")
        del self.tokens[n_tokens:]
