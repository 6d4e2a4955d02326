"""Prefill and decode speed of a model at batch 1: what `realm bench` and benchmarks/ report."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from realm.engine.best_tokens import best_tokens
from realm.engine.memory import rss_bytes

if TYPE_CHECKING:
    from realm.engine.model import Model


def measure_speed(model: Model, prompt_tokens: int = 128, gen_tokens: int = 64, repeats: int = 3) -> dict:
    """Best of `repeats`: one prefill of `prompt_tokens`, then `gen_tokens` greedy steps,
    through whichever decode step the model has now (reported as `decode_step`). Each token
    is taken as a greedy guest's `realm_forward_top` takes it (best_tokens, one native pass),
    so that the server's path is measured against the same work (torch.argmax over gemma3's
    262k logits took 60-110 us a token, the native pass about 20)."""
    text = "The quick brown fox jumps over the lazy dog. " * (prompt_tokens // 4 + 8)
    prompt = model.tokenizer.encode(text)[:prompt_tokens]
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        session = model.new_session(prompt_tokens + gen_tokens + 1)
        started = time.perf_counter()
        logits = session.feed(prompt)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(gen_tokens):
            ids, _ = best_tokens(logits[-1].float().cpu().numpy(), 1)
            logits = session.feed([int(ids[0])])
        decode = time.perf_counter() - started
        best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)
    return {
        "model": model.name,
        "backend": model.backend.name,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "prefill_tok_s": prompt_tokens / best_prefill,
        "decode_tok_s": gen_tokens / best_decode,
        "decode_step": model.decode_step,
        "threads": torch.get_num_threads(),
        "rss_after_load": model.rss_after_load,
        "rss_after_run": rss_bytes(),
        "file_bytes": model.gguf.size_bytes,
        "bytes_held": model.bytes_held,
    }
