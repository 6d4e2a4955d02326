"""Realm's HTTP server under load, against llama.cpp's own `llama-server` serving the
same model, in the same run.

    .venv/bin/python benchmarks/server_load.py [--model smollm2-135m] [--llama-bin DIR]

For 1, 4 and 8 concurrent streaming clients (client i is tenant i: its own API key on
Realm), each sending decode-heavy requests (a short prompt, max_tokens 64, greedy), it
reports aggregate completion tokens/s, p50/p99 time per output token (the gaps between a
stream's tokens, every stream pooled), p50 time to first token, and the servers'
resident memory (VmRSS from /proc, peak while the clients run). The client counts take
turns for `--rounds` rounds, and every figure is the median over the rounds: one count's
slow spell of the machine (on 2 shared cores, 1-client runs varied by a third) then moves
no ratio alone.

The anchor is one `llama-server -np N` (N parallel slots: continuous batching in one
process; N the most clients), with its prompt cache off (`cache_prompt: false`) unless
`--llama-prompt-cache`: the clients repeat 8 prompts, which a prefix cache answers
without a prefill, and Realm has none. The second table is llama.cpp with one `llama-server`
process per tenant (the isolation a user would otherwise buy). Before each of Realm's
rounds, `realm bench` measures the engine alone at batch 1, so that the per-token cost of
the guest, the scheduler and the HTTP path over it shows as one ratio (per round, then
the median).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from anchor import (
    REPO,
    client_gc_off,
    cpu_model,
    llama_bin,
    rss,
    start_llama_server,
    start_realm_server,
    stop,
    wait_healthy,
)

# Each runs the full max_tokens (greedy, both catalogue models): a prompt answered with EOS at
# once would leave its client idle and the batch short of one sequence per client.
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "Explain how a steam engine works, step by step.",
    "Describe a walk through a busy market in the morning.",
    "The history of the bicycle begins in",
    "Write a letter to a friend about your summer holiday.",
    "Describe the life cycle of a butterfly.",
    "The sky is blue because",
    "The old lighthouse keeper looked out at the sea and",
]
FIGURES = ("tok_s", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms")


class PeakRSS:
    """Samples the resident memory of some processes every 20 ms; keeps the peak."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.peak = pids, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pids))
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- clients


async def one_request(
    client: httpx.AsyncClient, base: str, key: str | None, model: str, prompt: str, max_tokens: int, extra: dict
) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    started = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", base + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise SystemExit(f"{base}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"{base}: error in stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(stamps)
    return {"started": started, "stamps": stamps, "tokens": tokens}


async def phase(
    targets: list[tuple[str, str | None]], model: str, clients: int, requests: int, max_tokens: int, extra: dict
) -> dict:
    """`clients` concurrent clients, client i on targets[i], each sending `requests` requests."""
    # a fresh connection a request: llama-server closes idle keep-alive connections, and a
    # reused one it had closed failed the request
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(i: int) -> list[dict]:
            base, key = targets[i]
            return [
                await one_request(http, base, key, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens, extra)
                for j in range(requests)
            ]

        with client_gc_off():
            started = time.perf_counter()
            runs = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
            wall = time.perf_counter() - started
    gaps = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:])]
    ttft = [r["stamps"][0] - r["started"] for r in runs if r["stamps"]]
    tokens = sum(r["tokens"] for r in runs)

    def q(xs: list[float], p: int) -> float:
        if len(xs) > 1:
            return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]
        return xs[0] if xs else 0.0

    return {
        "clients": clients,
        "requests": len(runs),
        "tokens": tokens,
        "seconds": wall,
        "tok_s": tokens / wall,
        "tpot_p50_ms": 1000 * q(gaps, 50),
        "tpot_p99_ms": 1000 * q(gaps, 99),
        "ttft_p50_ms": 1000 * q(ttft, 50),
    }


def batch_stats(base: str) -> tuple[float, float]:
    """Realm's realm_batch_size histogram: (sum, count) over every model."""
    text = httpx.get(base + "/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("realm_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("realm_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def run_phases(name: str, targets, model: str, pids_for, args, before_round=None) -> list[dict]:
    """Every client count once per round, the counts taking turns round after round, so
    that a slow spell of the machine falls on all of them rather than on one;
    `before_round()` runs at the start of each round, the server idle."""
    rows = []
    realm = name == "realm"
    # Realm has no prompt cache; llama-server reuses a slot's cached prefix unless told not to
    fields = {} if realm or args.llama_prompt_cache else {"cache_prompt": False}
    asyncio.run(phase(targets, model, 1, 1, 8, fields))  # warm up (first-request costs)
    for round_ in range(args.rounds):
        if before_round is not None:
            before_round()
        for clients in args.clients:
            before = batch_stats(targets[0][0]) if realm else (0.0, 0.0)
            with PeakRSS(pids_for(clients)) as peak:
                row = asyncio.run(phase(targets, model, clients, args.requests, args.max_tokens, fields))
            row.update(rss_mib=peak.peak / 2**20, server=name, round=round_)
            extra = ""
            if realm:
                after = batch_stats(targets[0][0])
                steps = after[1] - before[1]
                row["mean_batch"] = (after[0] - before[0]) / steps if steps else 0.0
                extra = f", mean batch {row['mean_batch']:.2f}"
            rows.append(row)
            print(
                f"  {name:17} {clients} clients: {row['tok_s']:6.1f} tok/s, time per output token p50 "
                f"{row['tpot_p50_ms']:6.1f} ms p99 {row['tpot_p99_ms']:6.1f} ms, "
                f"ttft p50 {row['ttft_p50_ms']:6.0f} ms, "
                f"RSS {row['rss_mib']:.0f} MiB, {row['tokens'] / row['requests']:.1f} tokens a request{extra}",
                flush=True,
            )
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per server and client count: the median of every figure over the rounds, and the
    first round's peak RSS (later rounds start with whatever the earlier ones left
    resident, so only the first 1-client figure is memory with one tenant)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["clients"]), []).append(r)
    return {
        key: {
            **{f: statistics.median(r[f] for r in rs) for f in FIGURES},
            "rss_mib": rs[0]["rss_mib"],
            "tok_s_rounds": [r["tok_s"] for r in rs],
        }
        for key, rs in groups.items()
    }


# ---------------------------------------------------------------------------- servers


def start_realm(
    model_path: Path, tenants: int, threads: int | None, workdir: Path
) -> tuple[subprocess.Popen, list[tuple[str, str]]]:
    models = f'[{{ name = "bench", path = "{model_path}" }}]'
    settings = (f"threads = {threads}",) if threads else ()
    tenant_limits = {f"tenant{i}": {"max_concurrent": 8} for i in range(tenants)}
    proc, base, keys = start_realm_server(models, tenant_limits, workdir, settings=settings)
    return proc, [(base, k) for k in keys.values()]


def realm_bench(model: str, threads: int | None) -> dict:
    """The engine alone at batch 1 (`realm bench`, compiled step, one run in a process of
    its own). One run before each round of the server's, the server idle meanwhile, so
    that the two share the machine's slow and fast spells: run all before the server, the
    path overhead read anywhere from -12% to +36% on one noisy machine within an hour.
    Not `realm bench`'s best of several, which is biased upward on a noisy machine by as
    much as the overhead it is compared with. With the server's GOMP_SPINCOUNT (unless the
    environment sets one): with libgomp's default the engine alone decodes faster (smollm2,
    5.0-5.8 against 6.3-7.2 ms a token) by keeping both cores spinning between tokens, which
    a server cannot do (its guests and event loop need them then; its own time per token
    was the same with either), so the ratio would measure the spin, not the path."""
    cmd = [
        sys.executable,
        "-m",
        "realm.cli",
        "bench",
        "--model",
        model,
        "--json",
        "--backend",
        "cpu",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "64",
        "--repeats",
        "1",
    ]
    from realm.settings import SERVING_SPIN_COUNT

    env = {
        "GOMP_SPINCOUNT": SERVING_SPIN_COUNT,
        **os.environ,
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_llama(bin_dir: Path, model_path: Path, processes: int, slots: int, args, work: Path, name: str) -> list[dict]:
    procs, targets = [], []
    for i in range(processes):
        proc, base = start_llama_server(
            bin_dir, model_path, slots, args.llama_ctx, args.llama_threads, work / f"{name}{i}.log"
        )
        procs.append(proc)
        targets.append((base, None))
    try:
        wait_healthy([t[0] for t in targets], procs, 600)
        if processes == 1:
            targets = targets * max(args.clients)
            return run_phases(name, targets, "model", lambda n: [procs[0].pid], args)
        return run_phases(name, targets, "model", lambda n: [p.pid for p in procs[:n]], args)
    finally:
        stop(procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="catalogue name or GGUF path")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--rounds", type=int, default=3, help="times each client count runs, taking turns")
    parser.add_argument("--threads", type=int, help="Realm's compute threads (default: the server's own, one per CPU)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--llama-bin", help="folder with llama-server (default: ../shared/tools/llama-cpp-build's)")
    parser.add_argument("--no-llama", action="store_true", help="Realm alone")
    parser.add_argument(
        "--per-tenant",
        action="store_true",
        help="also llama.cpp with one llama-server process per tenant (the second table)",
    )
    parser.add_argument(
        "--llama-prompt-cache",
        action="store_true",
        help="let llama-server reuse cached prompt prefixes (its default; Realm has no such cache, "
        "and the clients repeat their prompts, so by default it is off)",
    )
    parser.add_argument("--llama-threads", type=int, default=2, help="-t of each llama-server")
    parser.add_argument("--llama-ctx", type=int, default=1024, help="context of each llama-server slot")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    tenants = max(args.clients)

    sys.path.insert(0, str(REPO))
    from realm.models.catalogue import resolve

    model_path = resolve(args.model, progress=False)
    subprocess.run([sys.executable, "-m", "realm.cli", "compile", args.model], check=True, cwd=REPO)
    results: dict = {"model": args.model, "cpu": cpu_model(), "max_tokens": args.max_tokens, "rows": []}
    print(cpu_model(), flush=True)
    engine_runs: list[dict] = []

    def bench_engine() -> None:
        engine_runs.append(realm_bench(args.model, args.threads))
        run = engine_runs[-1]
        print(
            f"  realm bench (engine alone, batch 1): decode {run['decode_tok_s']:.1f} tok/s "
            f"({1000 / run['decode_tok_s']:.1f} ms a token, {run['decode_step']} step)",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="realm-bench-") as tmp:
        work = Path(tmp)
        print(f"Realm: one server, {tenants} tenants, model {args.model}", flush=True)
        proc, targets = start_realm(model_path, tenants, args.threads, work)
        try:
            wait_healthy([targets[0][0]], [proc], 600)
            results["rows"] += run_phases("realm", targets, "bench", lambda n: [proc.pid], args, bench_engine)
        finally:
            stop([proc])
        results["realm_bench_decode_tok_s"] = [r["decode_tok_s"] for r in engine_runs]
        if not args.no_llama:
            bin_dir = llama_bin(args.llama_bin)
            print(f"llama.cpp: one llama-server -np {tenants} (-t {args.llama_threads})", flush=True)
            results["rows"] += serve_llama(bin_dir, model_path, 1, tenants, args, work, f"llama-server-np{tenants}")
            if args.per_tenant:
                print(f"llama.cpp: {tenants} llama-server processes (-np 1 -t {args.llama_threads} each)", flush=True)
                results["rows"] += serve_llama(bin_dir, model_path, tenants, 1, args, work, "llama-per-tenant")

    by = summarise(results["rows"])
    lo, hi = min(args.clients), max(args.clients)
    print(f"\n{cpu_model()}; medians over {args.rounds} rounds, first round's peak RSS")
    for (server, clients), m in sorted(by.items()):
        rounds = ", ".join(f"{t:.1f}" for t in m["tok_s_rounds"])
        print(
            f"  {server:17} {clients} clients: {m['tok_s']:6.1f} tok/s (rounds: {rounds}), TPOT p50 "
            f"{m['tpot_p50_ms']:.1f} ms p99 {m['tpot_p99_ms']:.1f} ms, TTFT p50 {m['ttft_p50_ms']:.0f} ms, "
            f"RSS {m['rss_mib']:.0f} MiB"
        )
    print("ratios")
    if 1 in args.clients:
        lone = [r for r in results["rows"] if r["server"] == "realm" and r["clients"] == 1]
        per_round = [r["tpot_p50_ms"] * e["decode_tok_s"] / 1000 - 1 for r, e in zip(lone, engine_runs)]
        overhead = statistics.median(per_round)
        results["path_overhead"] = overhead
        rounds = ", ".join(f"{x:+.0%}" for x in per_round)
        print(f"  realm, 1 client: time per token over realm bench's: {overhead:+.0%} (rounds: {rounds})")
    servers = sorted({s for s, _ in by})
    for server in servers:
        if (server, lo) in by and (server, hi) in by:
            a, b = by[(server, lo)], by[(server, hi)]
            print(
                f"  {server:17} tok/s {hi} clients / {lo}: {b['tok_s'] / a['tok_s']:.2f}   "
                f"RSS {hi} tenants / {lo}: {b['rss_mib'] / a['rss_mib']:.2f}"
            )
    results["ratios"] = {}
    for other in (s for s in servers if s != "realm"):
        for clients in args.clients:
            if ("realm", clients) in by and (other, clients) in by:
                r, o = by[("realm", clients)], by[(other, clients)]
                ratio = {f: r[f] / o[f] for f in FIGURES} | {"rss_mib": r["rss_mib"] / o["rss_mib"]}
                results["ratios"][f"realm_over_{other}_{clients}"] = ratio
                print(
                    f"  {clients} clients, Realm / {other}: tok/s {ratio['tok_s']:.2f}, TPOT p50 "
                    f"{ratio['tpot_p50_ms']:.2f} p99 {ratio['tpot_p99_ms']:.2f}, TTFT p50 {ratio['ttft_p50_ms']:.2f}, "
                    f"RSS {ratio['rss_mib']:.2f}"
                )
    results["medians"] = {f"{s}_{c}": m for (s, c), m in by.items()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
