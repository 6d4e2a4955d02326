"""Agreement of a model's logits with llama.cpp's reference outputs, and perplexity.

Shared by the test suite and `scripts/gpu_check` so that both measure the same thing,
with exactly the definitions in shared/reference/README.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from realm.engine.model import Model


@dataclass
class PromptAgreement:
    index: int
    last_top1_same: bool
    argmax_agreement: float  # per position, ours vs llama.cpp's top-1
    mean_top20_abs_diff: float  # over llama.cpp's 20 largest logits at every position
    teacher_forced_agreement: float  # argmax vs llama.cpp's greedy continuation
    teacher_forced_matches: int
    teacher_forced_total: int


def prompt_agreement(
    model: Model, reference: np.lib.npyio.NpzFile, index: int, steps: int | None = None
) -> PromptAgreement:
    """Compare one reference prompt: prompt logits, then teacher-forced greedy tokens.
    `steps`: the logits come from decode steps, a token at a time, each step a batch of
    that many sequences (`step_logits`): 1 is a lone sequence, 2 or more the path a busy
    server takes. None: from one prefill pass."""
    prompt = reference[f"p{index}_tokens"].astype(np.int64).tolist()
    top_ids = reference[f"p{index}_top_ids"]
    top_logits = reference[f"p{index}_top_logits"]
    greedy = reference[f"p{index}_greedy"].astype(np.int64).tolist()
    tokens = prompt + greedy[:-1]
    if steps:
        logits = step_logits(model, tokens, steps).numpy()
    else:
        logits = model.new_session().feed(tokens, all_logits=True).numpy()
    ours = logits[: len(prompt)]
    gathered = np.take_along_axis(ours, top_ids.astype(np.int64), axis=1)
    forced = logits[len(prompt) - 1 : len(prompt) - 1 + len(greedy)].argmax(axis=1)
    matches = int((forced == np.asarray(greedy)).sum())
    return PromptAgreement(
        index=index,
        last_top1_same=int(ours[-1].argmax()) == int(reference[f"p{index}_last_logits"].argmax()),
        argmax_agreement=float((ours.argmax(axis=1) == top_ids[:, 0]).mean()),
        mean_top20_abs_diff=float(np.abs(gathered - top_logits).mean()),
        teacher_forced_agreement=matches / len(greedy),
        teacher_forced_matches=matches,
        teacher_forced_total=len(greedy),
    )


def step_logits(model: Model, tokens: Sequence[int], batch: int = 2) -> torch.Tensor:
    """The logits (T, vocab) of `tokens` fed one decode step at a time, each step run
    together with `batch - 1` other sequences of the same tokens: a lone sequence's decode
    graph for 1, the batch's for more."""
    sessions = [model.new_session(len(tokens)) for _ in range(batch)]
    rows = []
    for token in tokens:
        chunks = [s.chunk([token]) for s in sessions]
        model.transformer.forward(chunks)
        logits = [s.commit(c) for s, c in zip(sessions, chunks)]
        rows.append(logits[0][-1].float())
    return torch.stack(rows)


def perplexity(model: Model, tokens: Sequence[int], ctx: int = 512) -> tuple[float, int]:
    """llama.cpp's definition: non-overlapping windows of `ctx`; in each, score every token
    but the first given its prefix in the window. Returns (ppl, tokens scored)."""
    nll, scored = 0.0, 0
    for start in range(0, len(tokens), ctx):
        window = list(tokens[start : start + ctx])
        if len(window) < 2:
            continue
        logits = model.new_session(min(ctx, model.config.context_length)).feed(window, all_logits=True)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)
        target = torch.tensor(window[1:], dtype=torch.long)
        nll -= float(logp.gather(1, target[:, None]).sum())
        scored += len(window) - 1
    return math.exp(nll / scored), scored
