"""Where a decode step's time goes: per operation at batch 1 and batch 8, against the
memory-bandwidth limit (bytes of weights one step reads / measured read bandwidth).

    .venv/bin/python benchmarks/step_profile.py [--model smollm2-135m] [--steps 64]

The operation table comes from the eager step (PyTorch's profiler sees each operation;
the compiled step is one opaque call per run of layers): its shares say which kernels
matter. The step times are measured for the compiled step too, when it is built.
"""

from __future__ import annotations

import argparse
import time

import torch
from anchor import cpu_model
from torch.profiler import ProfilerActivity, profile

from realm.backends.devices import BackendRegistry
from realm.backends.linear import Int4Linear
from realm.backends.screened import ScreenedLinear
from realm.engine.model import Model, load, weight_bytes


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a sum over a buffer far larger than the caches, with this process's threads."""
    buffer = torch.ones(n_bytes // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - started)
    return n_bytes / best


def linear_bytes(linear: object) -> int:
    """Bytes one decode row reads from a weight (PyTorch-kernel dense prefill copies not
    counted): every tensor it holds, the GGUF rows of the exact pass aside."""
    if isinstance(linear, Int4Linear):
        return linear.packed.nbytes + linear.scales_zeros.nbytes
    if isinstance(linear, ScreenedLinear):
        if linear.blocks is not None:
            return sum(t.nbytes for t in linear.blocks)
        return linear.out_features * linear.in_features + linear.scales.nbytes
    return weight_bytes(linear)


def step_bytes(model: Model) -> int:
    w = model.transformer.weights
    total = linear_bytes(w.output)
    for layer in w.layers:
        total += sum(linear_bytes(lin) for lin in (layer.qkv, layer.attn_out, layer.gate_up, layer.down))
    return total


def step_time(model: Model, batch: int, steps: int) -> float:
    """Median seconds of one decode step of `batch` sequences (prompts of 16 tokens)."""
    sessions = [model.new_session(256) for _ in range(batch)]
    for s in sessions:
        s.feed(model.tokenizer.encode("The quick brown fox jumps over the lazy dog again and again")[:16])
    times = []
    for i in range(steps):
        chunks = [s.chunk([100 + i]) for s in sessions]
        started = time.perf_counter()
        model.transformer.forward(chunks)
        times.append(time.perf_counter() - started)
        for s, c in zip(sessions, chunks):
            s.commit(c)
    return sorted(times)[len(times) // 2]


def op_table(model: Model, batch: int, steps: int, top: int) -> list[tuple[str, float, int]]:
    sessions = [model.new_session(256) for _ in range(batch)]
    for s in sessions:
        s.feed([1, 2, 3, 4])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            chunks = [s.chunk([100 + i]) for s in sessions]
            model.transformer.forward(chunks)
            for s, c in zip(sessions, chunks):
                s.commit(c)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.self_cpu_time_total / total, e.count // steps) for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args()
    backend = BackendRegistry("cpu").active
    model = load(args.model, backend, progress=False, compile_mode="cached")
    bandwidth = read_bandwidth()
    weights = step_bytes(model)
    print(
        f"{cpu_model()}, {torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
        f"{model.name} reads {weights / 2**20:.0f} MiB of weights a step: limit {1e3 * weights / bandwidth:.2f} ms "
        f"({bandwidth / weights:.0f} steps/s)"
    )
    compiled = model.transformer.decode_graph if model.transformer.compiled else None
    for batch in (1, 8):
        for name, graph in [("compiled", compiled), ("eager", None)]:
            if name == "compiled" and graph is None:
                continue
            model.transformer.use_decode_graph(graph)
            t = step_time(model, batch, args.steps)
            print(
                f"batch {batch}, {name} step: {1e3 * t:.2f} ms ({batch / t:.0f} tok/s; "
                f"{weights / t / 1e9:.1f} GB/s of weights, {weights / t / bandwidth:.0%} of the limit)"
            )
        model.transformer.use_decode_graph(None)
        print(f"  eager step by operation (self time share, calls a step), batch {batch}:")
        for key, share, calls in op_table(model, batch, args.steps // 2, args.top):
            print(f"    {share:6.1%} {calls:5d}  {key}")


if __name__ == "__main__":
    main()
