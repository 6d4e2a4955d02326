"""What the sandbox costs: decode speed through the default guest against host-direct.

Same model, same process, same prompt, greedy; the two paths run interleaved (host, guest,
host, guest, ...) so that a noisy machine slows both alike. A run's decode step is the
median time between consecutive tokens (the prompt's prefill, the same single host call
on both paths, is left out; a neighbour's CPU spike moves a median little), and the
median over runs is compared.

Also measured: the cost of one host call (a WAT guest calling realm_get_backend_type in a
loop), the copy of one step's logits into guest memory, and the default guest's host
calls and WebAssembly time per token.

    .venv/bin/python benchmarks/sandbox_overhead.py [--model smollm2-135m] [--tokens 64] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm.engine.sampling import SamplingParams  # noqa: E402
from realm.models import catalogue  # noqa: E402
from realm.sandbox import cpu_share  # noqa: E402
from realm.sandbox.memory import GuestMemory  # noqa: E402
from realm.sandbox.request import build_request  # noqa: E402
from realm.sandbox.runtime import Runtime  # noqa: E402

PROMPT = "Once upon a time, in a small village by the sea, there lived"

CALL_LOOP = """
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_get_backend_type" (func $backend (result i32)))
  (import "env" "realm_request_read" (func $read (param i32 i32) (result i32)))
  (memory (export "memory") 4)
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func (export "generate") (result i32)
    (local $calls i32)
    ;; the request: the number of calls to make, a little-endian u32
    (drop (call $read (i32.const 1024) (i32.const 4)))
    (local.set $calls (i32.load (i32.const 1024)))
    (block $done
      (loop $call
        (br_if $done (i32.eqz (local.get $calls)))
        (drop (call $backend))
        (local.set $calls (i32.sub (local.get $calls) (i32.const 1)))
        (br $call)))
    (i32.const 0)))
"""


def _step_seconds(stamps: list[float]) -> float:
    """The median time between consecutive tokens: robust to a noisy neighbour's spikes."""
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def host_direct_decode(model, tokens: int) -> tuple[float, list[int]]:
    """The median decode step (seconds) of one host-direct generation, and its tokens."""
    stamps = []
    generation = model.generate(PROMPT, tokens, SamplingParams.greedy())
    for _ in generation:
        stamps.append(time.perf_counter())
    return _step_seconds(stamps), generation.tokens


def guest_decode(instance, request) -> tuple[float, list[int], object]:
    stamps = []
    result = instance.generate(request, on_token=lambda t, s: stamps.append(time.perf_counter()))
    return _step_seconds(stamps), result.tokens, result


def host_call_cost(runtime: Runtime, calls: int = 200_000) -> float:
    """Seconds per host call of a guest calling in a loop, with the CPU share's pace lifted
    (1,000 calls a second, then 200 once demoted: docs/SERVING.md): that is a policy on top
    of what is measured here, and would make the loop take minutes."""
    import wasmtime

    module = runtime.load_module(wasmtime.wat2wasm(CALL_LOOP), name="call-loop")
    unpaced = dict.fromkeys(("CALLS_PER_S", "CALL_BURST", "DEMOTED_CALLS_PER_S", "DEMOTED_CALL_BURST"), 10**9)
    with runtime.instance(module, tenant="bench") as inst, mock.patch.multiple(cpu_share, **unpaced):
        inst.generate(struct.pack("<I", 1000))  # warm up
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            result = inst.generate(struct.pack("<I", calls))
            best = min(best, time.perf_counter() - started)
        assert result.host_calls == calls + 1
    return best / calls


def logits_copy_cost(runtime: Runtime, vocab: int, repeats: int = 2000) -> float:
    import wasmtime

    module = runtime.load_module(wasmtime.wat2wasm(CALL_LOOP), name="call-loop")
    logits = torch.randn(vocab)
    with runtime.instance(module, tenant="bench") as inst:
        memory, store = inst.state.memory, inst._store
        memory.grow(store, (vocab * 4) // 65536 + 1)
        started = time.perf_counter()
        for _ in range(repeats):
            GuestMemory(memory, store).write_floats(4096, logits)
        return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    runtime = Runtime.on_host("cpu")
    entry = runtime.models.store_source(catalogue.locate(args.model, progress=False))
    model = entry.model
    instance = runtime.instance(runtime.default_module(), tenant="bench")
    request = build_request(entry, prompt=PROMPT, max_tokens=args.tokens, params=SamplingParams.greedy())

    # warm up both paths, and check they agree
    _, host_tokens = host_direct_decode(model, args.tokens)
    _, guest_tokens, _ = guest_decode(instance, request)
    if host_tokens != guest_tokens:
        raise SystemExit("the default guest and host-direct disagree: the comparison would be meaningless")

    host_s, guest_s, calls, wasm_s = [], [], [], []
    for _ in range(args.repeats):
        seconds, _ = host_direct_decode(model, args.tokens)
        host_s.append(seconds)
        seconds, _, result = guest_decode(instance, request)
        guest_s.append(seconds)
        calls.append(result.host_calls / len(result.tokens))
        wasm_s.append(result.guest_seconds / len(result.tokens))
    host_tok_s = 1.0 / statistics.median(host_s)
    guest_tok_s = 1.0 / statistics.median(guest_s)
    call_s = host_call_cost(runtime)
    copy_s = logits_copy_cost(runtime, model.config.vocab_size)
    report = {
        "model": model.name,
        "backend": runtime.backends.active.description,
        "threads": torch.get_num_threads(),
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "host_direct_tok_s": host_tok_s,
        "guest_tok_s": guest_tok_s,
        "overhead_pct": 100.0 * (1.0 - guest_tok_s / host_tok_s),
        "host_direct_runs_ms_per_step": [1e3 * s for s in host_s],
        "guest_runs_ms_per_step": [1e3 * s for s in guest_s],
        "host_call_us": 1e6 * call_s,
        "logits_copy_us": 1e6 * copy_s,
        "host_calls_per_token": statistics.median(calls),
        "wasm_us_per_token": 1e6 * statistics.median(wasm_s),
    }
    instance.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['model']} on {report['backend']}, {args.tokens} greedy tokens, "
        f"median of {args.repeats} interleaved runs"
    )
    print(f"  host-direct      {host_tok_s:7.2f} tok/s")
    print(f"  default guest    {guest_tok_s:7.2f} tok/s   sandbox overhead {report['overhead_pct']:+.2f} %")
    print(f"  one host call    {report['host_call_us']:.2f} us   ({report['host_calls_per_token']:.1f} per token)")
    print(f"  logits copy      {report['logits_copy_us']:.2f} us per step ({model.config.vocab_size} floats)")
    print(f"  WebAssembly time {report['wasm_us_per_token']:.1f} us per token (sampling, text, stop strings)")


if __name__ == "__main__":
    main()
