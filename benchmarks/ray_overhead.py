"""What the Ray path adds: `realm serve --ray` with one replica against `realm serve`, the
same model, config and compute threads, measured in the same run.

    .venv/bin/python benchmarks/ray_overhead.py [--model smollm2-135m] [--threads 2] [--rounds 3]

For 1 and 8 concurrent streaming clients (decode-heavy requests: a short prompt,
max_tokens 32, greedy), it reports p50 time to first token and p50 time per output token
of each server, and the Ray path's ratio to the single process (target: at most 1.10 for
time per output token). The servers take turns round after round and every figure is the
median over the rounds, so a slow spell of a shared machine falls on both. The Ray path's
extra hops per request: Ray's HTTP proxy, the ingress deployment, a DeploymentHandle
stream from the replica (one Ray object per SSE chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from anchor import REPO, cpu_model, free_port, stop, wait_healthy
from server_load import phase


def start(workdir: Path, config: str, ray: bool) -> subprocess.Popen:
    """`realm serve` (or `realm serve --ray --replicas 1`) of this checkout; log in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "realm.toml"
    path.write_text(config)
    log = (workdir / "realm.log").open("w")
    cmd = [sys.executable, "-m", "realm.cli", "serve", "--config", str(path), "--log-level", "warning"]
    if ray:
        cmd += ["--ray", "--replicas", "1"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)


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
    servers: dict[str, str] = {}
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in ("single", "ray"):
                port = free_port()
                config = (
                    f'port = {port}\nmodels = ["{args.model}"]\nthreads = {args.threads}\n'
                    f"[ray]\ncpus_per_replica = {args.threads}\n"
                    f'[[tenants]]\nname = "bench"\nopen = true\n'
                    f"[tenants.limits]\nmax_concurrent = {max(args.clients)}\n"
                )
                procs.append(start(Path(tmp) / name, config, ray=name == "ray"))
                servers[name] = f"http://127.0.0.1:{port}"
            wait_healthy(list(servers.values()), procs, timeout=600)
            for base in servers.values():  # the first request loads the model (on the replica: on demand)
                asyncio.run(phase([(base, None)], args.model, 1, 1, 4, {}))
            rows: dict[tuple[str, int], list[dict]] = {}
            for round_ in range(args.rounds):
                for clients in args.clients:
                    for name, base in servers.items():
                        row = asyncio.run(
                            phase([(base, None)] * clients, args.model, clients, args.requests, args.max_tokens, {})
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
