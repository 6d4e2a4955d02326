"""Prefill and decode speed of llama.cpp (llama-cpp-python) on one GGUF, as one JSON line.

Run by host_speed.py in whatever Python has `llama_cpp` installed (an optional benchmark
dependency: `pip install llama-cpp-python==0.3.36` compiles llama.cpp, ~8 minutes here).
"""

import json
import os
import sys
import time

import numpy as np
from llama_cpp import Llama


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    path, prompt_tokens, gen_tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    before = rss_bytes()
    llm = Llama(path, n_ctx=prompt_tokens + gen_tokens + 8, n_threads=2, n_threads_batch=2,
                n_batch=512, verbose=False)
    loaded = rss_bytes()
    text = "The quick brown fox jumps over the lazy dog. " * (prompt_tokens // 4 + 8)
    prompt = llm.tokenize(text.encode(), add_bos=False)[:prompt_tokens]
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        decode = time.perf_counter() - started
        best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)
    print(json.dumps({
        "prefill_tok_s": prompt_tokens / best_prefill,
        "decode_tok_s": gen_tokens / best_decode,
        "rss_after_load": loaded,
        "rss_before_load": before,
        "file_bytes": os.path.getsize(path),
    }))


if __name__ == "__main__":
    main()
