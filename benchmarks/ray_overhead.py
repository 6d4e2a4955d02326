"""What the Ray path adds: `realm serve --ray` with one replica against `realm serve`, the
same model, config and compute threads, measured in the same run.

    .venv/bin/python benchmarks/ray_overhead.py [--model smollm2-135m] [--threads 2] [--rounds 3]

For 1 and 8 concurrent streaming clients (decode-heavy requests: a short prompt,
max_tokens 32, greedy), it reports p50 time to first token and p50 time per output token
of each server, and the Ray path's ratio to the single process (target: at most 1.10 for
time per output token). The servers take turns round after round and every figure is the
median over the rounds, so a slow spell of a shared machine falls on both. The Ray path's
extra hops: HAProxy for every request and every streamed chunk, RealmRouter's answer to
HAProxy for each POST, the limits actor once per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
from pathlib import Path

from anchor import cpu_model, start_realm_server, stop, wait_healthy
from server_load import phase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=2, help="compute threads of each server (the replica's too)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2, help="requests per client per phase")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    print(f"CPU: {cpu_model()}")
    servers: dict[str, tuple[str, str]] = {}
    procs: list[subprocess.Popen] = []
    settings = (f"threads = {args.threads}", "[ray]", f"cpus_per_replica = {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, options in (("single", ()), ("ray", ("--ray", "--replicas", "1"))):
                (Path(tmp) / name).mkdir()
                tenants = {"bench": {"max_concurrent": max(args.clients)}}
                proc, base, keys = start_realm_server(
                    f'["{args.model}"]', tenants, Path(tmp) / name, settings=settings, options=options
                )
                procs.append(proc)
                servers[name] = (base, keys["bench"])
            wait_healthy([base for base, _ in servers.values()], procs, timeout=600)
            for target in servers.values():  # the first request loads the model (on the replica: on demand)
                asyncio.run(phase([target], args.model, 1, 1, 4, {}))
            rows: dict[tuple[str, int], list[dict]] = {}
            for round_ in range(args.rounds):
                for clients in args.clients:
                    for name, target in servers.items():
                        row = asyncio.run(
                            phase([target] * clients, args.model, clients, args.requests, args.max_tokens, {})
                        )
                        rows.setdefault((name, clients), []).append(row)
                        print(
                            f"  round {round_} {name:6} {clients} clients: ttft p50 {row['ttft_p50_ms']:6.0f} ms, "
                            f"tpot p50 {row['tpot_p50_ms']:6.1f} ms, {row['tok_s']:6.1f} tok/s",
                            flush=True,
                        )
        finally:
            stop(procs)
    print(f"\n{args.model}, {args.threads} threads, medians of {args.rounds} rounds")
    print("clients | ttft single | ttft ray | ratio | tpot single | tpot ray | ratio")
    for clients in args.clients:
        med = {
            (name, fig): statistics.median(r[fig] for r in rows[(name, clients)])
            for name in servers
            for fig in ("ttft_p50_ms", "tpot_p50_ms")
        }
        ttft = (med[("single", "ttft_p50_ms")], med[("ray", "ttft_p50_ms")])
        tpot = (med[("single", "tpot_p50_ms")], med[("ray", "tpot_p50_ms")])
        print(
            f"{clients:7} | {ttft[0]:8.0f} ms | {ttft[1]:5.0f} ms | {ttft[1] / ttft[0]:5.2f} | "
            f"{tpot[0]:8.1f} ms | {tpot[1]:5.1f} ms | {tpot[1] / tpot[0]:5.2f}"
        )


if __name__ == "__main__":
    main()
