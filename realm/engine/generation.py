"""The host-side generation loop: feed, sample, detokenize, stop.

This is the path `--no-sandbox` runs; the default guest does the same inside WASM.
Text is streamed without ever splitting a UTF-8 character or showing part of a stop
string that later completes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from realm.backends.screened import CANDIDATES
from realm.engine.best_tokens import LAZY_MOST, best_allowed, exact_logits
from realm.engine.grammar import DONE, Grammar, allowed_tokens, apply_mask
from realm.engine.sampling import Sampler, SamplingParams
from realm.engine.session import Session
from realm.errors import ContextOverflow, InvalidArgument
from realm.models.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Piece:
    """One generated token and the text it made printable (maybe empty)."""

    token: int
    text: str


@dataclass
class Generation:
    """Iterate for pieces; afterwards `finish_reason`, `tokens` and `text` are final.

    It knows a tokenizer and a fresh session, not the model they come from:
    `Model.generate` makes one."""

    tokenizer: Tokenizer
    session: Session
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    stop: Sequence[str] = ()
    grammar: Grammar | None = None  # the output's constraint: each step's logits masked by it
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or stop string) or "length"

    def __iter__(self) -> Iterator[Piece]:
        budget = self._budget()
        sampler = Sampler(self.params)
        decoder = StreamDecoder(self.tokenizer)
        pending = ""  # decoded text not yet shown: it might be the start of a stop string
        fresh = list(self.prompt)  # tokens not yet run through the model
        forced = deque(self._forced(budget))  # fast-forward, as the default guest does
        self.finish_reason = "length"
        while len(self.tokens) < budget:  # no step after the last token the budget allows
            sampled = not forced
            if sampled:
                token = sampler.sample(self._step(fresh), self.session.tokens)
                fresh = []
            else:
                token = forced.popleft()
            if token in self.tokenizer.eot_ids:
                self.finish_reason = "stop"
                break
            fresh.append(token)
            self.tokens.append(token)
            pending += decoder.push(token)
            shown, pending, stopped = _split_at_stop(pending, self.stop)
            self.text += shown
            yield Piece(token, shown)
            if stopped:
                self.finish_reason = "stop"
                return
            if self.grammar is not None and self.grammar.consume([token]) & DONE:
                self.finish_reason = "stop"  # only an end token could follow
                break
            if sampled:
                forced.extend(self._forced(budget - len(self.tokens)))
        tail = pending + decoder.flush()
        if tail:
            self.text += tail
            yield Piece(-1, tail)

    def _budget(self) -> int:
        """Tokens this generation may make; InvalidArgument or ContextOverflow for a request
        that cannot run."""
        if not self.prompt:
            raise InvalidArgument("the prompt is empty")
        if self.max_tokens < 0:
            raise InvalidArgument("max_tokens must be >= 0")
        if len(self.prompt) >= self.session.context_length:
            raise ContextOverflow(
                f"the prompt has {len(self.prompt)} tokens; the context holds {self.session.context_length}"
            )
        return min(self.max_tokens, self.session.context_length - len(self.prompt))

    def _forced(self, room: int) -> list[int]:
        """The tokens the grammar forces next (the rest of a key, the punctuation between
        fields), at most `room`: taken at once, so that one step runs them all."""
        return [] if self.grammar is None or room <= 0 else self.grammar.forced()[:room]

    def _step(self, tokens: Sequence[int]) -> torch.Tensor:
        """The logits after `tokens`, those the grammar forbids at -inf, as the host does for
        a guest whose session has the grammar (sandbox/host_grammar.py); for a greedy step,
        as `realm_forward_top` gives it to the default guest: the grammar checked lazily,
        the best allowed token's logit and the rest -inf."""
        if self.grammar is None:
            return self.session.feed(tokens)[-1]
        k = self.params.top_candidates(self.session.vocab_size, CANDIDATES)
        if 0 < k <= LAZY_MOST:
            row = self.session.feed(tokens)[-1].numpy()
            ids, values = best_allowed(row, k, self.grammar, exact_logits(self.session, row))
            best = torch.full((self.session.vocab_size,), -torch.inf)
            best[torch.from_numpy(ids).long()] = torch.from_numpy(values)
            return best
        mask = self.grammar.mask().copy()
        allowed = allowed_tokens(mask, self.session.vocab_size)
        row = self.session.feed(tokens, allowed=allowed)[-1].numpy().copy()
        apply_mask(mask, row)
        return torch.from_numpy(row)


def _split_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """(text safe to show, text to hold back, whether a stop string was reached)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if hits:
        return text[: min(hits)], "", True
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold :], False
