"""What `logprobs` costs a token, and what /v1/embeddings gives, on the two catalogue models.

    .venv/bin/python benchmarks/logprobs_cost.py [--steps 64]

Cost: a decode step (batch 1, the model's current decode step) against realm_logprobs' work
on its logits (the log-softmax and the 20 most likely tokens), measured alternately in one
process so that a busy machine slows both alike; medians. Embeddings: cosine similarities
of a few sentences, related pairs next to each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from realm.backends.devices import BackendRegistry
from realm.engine.embeddings import pooled_embedding
from realm.engine.logprobs import MAX_TOP_LOGPROBS, token_logprobs
from realm.engine.model import load

SENTENCES = [
    "The cat sat on the mat.",
    "A cat was sitting on a rug.",
    "How do I bake bread?",
    "What is a good recipe for a loaf of bread?",
    "Quarterly revenue rose by four percent.",
    "The stock market fell sharply today.",
]


def cost(name: str, steps: int) -> None:
    model = load(name, BackendRegistry("cpu").active, progress=False)
    session = model.new_session()
    logits = session.feed(model.tokenizer.encode("Once upon a time"))[-1]
    step_s, logprobs_s = [], []
    for _ in range(steps):
        token = int(logits.argmax())
        started = time.perf_counter()
        logits = session.feed([token])[-1]
        row = logits.numpy()
        middle = time.perf_counter()
        token_logprobs(row, int(row.argmax()), MAX_TOP_LOGPROBS)
        logprobs_s.append(time.perf_counter() - middle)
        step_s.append(middle - started)
    step, extra = statistics.median(step_s), statistics.median(logprobs_s)
    print(
        f"{name}: vocabulary {model.config.vocab_size}, decode step {step * 1e3:.1f} ms, "
        f"logprobs (top 20) {extra * 1e3:.2f} ms: +{extra / step:.1%} a token"
    )
    tok = model.tokenizer
    vectors = np.stack(
        [pooled_embedding(model, tok.encode(s, add_bos=tok.add_bos), int(tok.add_bos)) for s in SENTENCES]
    )
    print(f"{name}: embeddings (dim {model.config.dim}), cosine similarities:")
    for s, row in zip(SENTENCES, vectors @ vectors.T):
        print(f"  {s[:28]:28s} " + " ".join(f"{c:.2f}" for c in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for name in ("smollm2-135m", "gemma3-270m"):
        cost(name, args.steps)


if __name__ == "__main__":
    main()
