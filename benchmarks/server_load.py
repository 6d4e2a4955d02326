"""Realm's HTTP server under load, against llama.cpp serving the same model with one
process per tenant (the isolation a user would otherwise buy), in the same run.

    .venv/bin/python benchmarks/server_load.py [--llama-python /tmp/lcpvenv/bin/python]

For 1, 4 and 8 concurrent streaming clients (client i is tenant i: its own API key on
Realm, its own process on llama.cpp), each sending decode-heavy requests (a short prompt,
max_tokens 64, greedy), it reports aggregate completion tokens/s, p50/p99 time per output
token (the gaps between a stream's tokens, every stream pooled) and time to first token,
and the servers' resident memory (VmRSS from /proc, peak while the clients run; for
llama.cpp the sum over its processes). The client counts take turns for `--rounds`
rounds, and the ratios compare medians over the rounds: one count's slow spell of the
machine (on 2 shared cores, 1-client runs varied by a third) then moves no ratio alone.
Targets for Realm: tokens/s with 8 clients >= 3 x with 1 client; memory with 8 tenants
active <= 1.15 x with 1.

llama.cpp is started as `llama_cpp.server` when --llama-python can import it, else as
benchmarks/llama_cpp_server.py (llama_cpp plus the standard library; `llama_cpp.server`
needs extras: fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


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


def wait_healthy(urls: list[str], procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(urls)
    while pending:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"a server exited with status {p.returncode} while starting: {p.args}")
        if time.monotonic() > deadline:
            raise SystemExit(f"servers not healthy after {timeout} s: {pending}")
        try:
            if httpx.get(pending[0] + "/health", timeout=2).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


# ---------------------------------------------------------------------------- clients


async def one_request(client: httpx.AsyncClient, base: str, key: str | None, model: str, prompt: str, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
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


async def phase(targets: list[tuple[str, str | None]], model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, client i on targets[i], each sending `requests` requests."""
    limits = httpx.Limits(max_connections=clients * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(i: int) -> list[dict]:
            base, key = targets[i]
            return [await one_request(http, base, key, model, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
                    for j in range(requests)]

        started = time.perf_counter()
        runs = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - started
    gaps = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:])]
    ttft = [r["stamps"][0] - r["started"] for r in runs if r["stamps"]]
    tokens = sum(r["tokens"] for r in runs)
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else (xs[0] if xs else 0.0)  # noqa: E731
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


def run_phases(name: str, targets, model: str, pids_for, args) -> list[dict]:
    """Every client count once per round, the counts taking turns round after round, so
    that a slow spell of the machine falls on all of them rather than on one."""
    rows = []
    realm = name == "realm"
    asyncio.run(phase(targets, model, 1, 1, 8))  # warm up (first-request costs)
    for round_ in range(args.rounds):
        for clients in args.clients:
            before = batch_stats(targets[0][0]) if realm else (0.0, 0.0)
            with PeakRSS(pids_for(clients)) as peak:
                row = asyncio.run(phase(targets, model, clients, args.requests, args.max_tokens))
            row.update(rss_mib=peak.peak / 2**20, server=name, round=round_)
            extra = ""
            if realm:
                after = batch_stats(targets[0][0])
                steps = after[1] - before[1]
                row["mean_batch"] = (after[0] - before[0]) / steps if steps else 0.0
                extra = f", mean batch {row['mean_batch']:.2f}"
            rows.append(row)
            print(f"  {name:9} {clients} clients: {row['tok_s']:6.1f} tok/s, time per output token p50 "
                  f"{row['tpot_p50_ms']:6.1f} ms p99 {row['tpot_p99_ms']:6.1f} ms, ttft p50 {row['ttft_p50_ms']:6.0f} ms, "
                  f"RSS {row['rss_mib']:.0f} MiB, {row['tokens'] / row['requests']:.1f} tokens a request{extra}", flush=True)
    return rows


def summarise(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Per server and client count: the median tokens/s over the rounds, and the first
    round's peak RSS (later rounds start with whatever the earlier ones left resident, so
    only the first 1-client figure is memory with one tenant)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["clients"]), []).append(r)
    return {
        key: {"tok_s": statistics.median(r["tok_s"] for r in rs), "rss_mib": rs[0]["rss_mib"],
              "tok_s_rounds": [r["tok_s"] for r in rs]}
        for key, rs in groups.items()
    }


# ---------------------------------------------------------------------------- servers


def start_realm(model_path: Path, tenants: int, threads: int | None, workdir: Path) -> tuple[subprocess.Popen, list[tuple[str, str]]]:
    sys.path.insert(0, str(REPO))
    from realm.server.keys import hash_key, new_key

    keys = [new_key() for _ in range(tenants)]
    port = free_port()
    config = workdir / "realm.toml"
    lines = [f"port = {port}", 'backend = "cpu"', f'models = [{{ name = "bench", path = "{model_path}" }}]']
    lines += [f"threads = {threads}", ""] if threads else [""]
    for i, key in enumerate(keys):
        lines += ["[[tenants]]", f'name = "tenant{i}"', f'keys = ["{hash_key(key)}"]', "[tenants.limits]",
                  "max_concurrent = 8", ""]
    config.write_text("\n".join(lines))
    proc = subprocess.Popen([sys.executable, "-m", "realm.cli", "serve", "--config", str(config), "--log-level", "warning"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=(workdir / "realm.log").open("w"))
    base = f"http://127.0.0.1:{port}"
    return proc, [(base, k) for k in keys]


def start_llama(python: str, model_path: Path, tenants: int, threads: int, n_ctx: int, workdir: Path):
    has_server = subprocess.run([python, "-c", "import llama_cpp.server.app"], capture_output=True).returncode == 0
    procs, targets = [], []
    for i in range(tenants):
        port = free_port()
        if has_server:
            cmd = [python, "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
                   "--n_threads", str(threads), "--n_ctx", str(n_ctx)]
        else:
            cmd = [python, str(HERE / "llama_cpp_server.py"), "--model", str(model_path), "--port", str(port),
                   "--n_threads", str(threads), "--n_ctx", str(n_ctx)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(workdir / f"llama{i}.log").open("w")))
        targets.append((f"http://127.0.0.1:{port}", None))
    return procs, targets, ("llama_cpp.server" if has_server else "benchmarks/llama_cpp_server.py")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="catalogue name or GGUF path")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--rounds", type=int, default=3, help="times each client count runs, taking turns")
    parser.add_argument("--threads", type=int, help="Realm's compute threads (default: the server's own, one per CPU)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--llama-python", default="/tmp/lcpvenv/bin/python",
                        help="a Python with llama_cpp (llama-cpp-python); '' skips llama.cpp")
    parser.add_argument("--llama-threads", type=int, default=2, help="--n_threads of each llama.cpp process")
    parser.add_argument("--llama-ctx", type=int, default=2048, help="--n_ctx of each llama.cpp process")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    tenants = max(args.clients)

    sys.path.insert(0, str(REPO))
    from realm.models.catalogue import resolve

    model_path = resolve(args.model, progress=False)
    results: dict = {"model": args.model, "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "rows": []}
    with tempfile.TemporaryDirectory(prefix="realm-bench-") as tmp:
        work = Path(tmp)
        print(f"Realm: one server, {tenants} tenants, model {args.model}", flush=True)
        proc, targets = start_realm(model_path, tenants, args.threads, work)
        try:
            wait_healthy([targets[0][0]], [proc], 600)
            results["rows"] += run_phases("realm", targets, "bench", lambda n: [proc.pid], args)
        finally:
            stop([proc])
        if args.llama_python:
            procs, ltargets, kind = start_llama(args.llama_python, model_path, tenants, args.llama_threads,
                                                args.llama_ctx, work)
            print(f"llama.cpp: {tenants} processes ({kind}, n_threads {args.llama_threads}, n_ctx {args.llama_ctx})",
                  flush=True)
            results["llama_cpp_server"] = kind
            try:
                wait_healthy([t[0] for t in ltargets], procs, 600)
                results["rows"] += run_phases("llama.cpp", ltargets, "model",
                                              lambda n: [p.pid for p in procs[:n]], args)
            finally:
                stop(procs)

    by = summarise(results["rows"])
    lo, hi = min(args.clients), max(args.clients)
    print(f"\nmedians over {args.rounds} rounds (tokens/s), first round's peak RSS")
    for (server, clients), m in sorted(by.items()):
        rounds = ", ".join(f"{t:.1f}" for t in m["tok_s_rounds"])
        print(f"  {server:9} {clients} clients: {m['tok_s']:6.1f} tok/s (rounds: {rounds}), RSS {m['rss_mib']:.0f} MiB")
    print("ratios")
    for server in ("realm", "llama.cpp"):
        if (server, lo) in by and (server, hi) in by:
            a, b = by[(server, lo)], by[(server, hi)]
            print(f"  {server:9} tok/s {hi} clients / {lo}: {b['tok_s'] / a['tok_s']:.2f}   "
                  f"RSS {hi} tenants / {lo}: {b['rss_mib'] / a['rss_mib']:.2f}")
    for clients in args.clients:
        if ("realm", clients) in by and ("llama.cpp", clients) in by:
            r, l = by[("realm", clients)], by[("llama.cpp", clients)]
            print(f"  {clients} clients: Realm / llama.cpp tok/s {r['tok_s'] / l['tok_s']:.2f}, "
                  f"RSS {r['rss_mib'] / l['rss_mib']:.2f}")
    results["medians"] = {f"{s}_{c}": m for (s, c), m in by.items()}
    results["ratios"] = {
        f"{s}_tok_s_{hi}_over_{lo}": by[(s, hi)]["tok_s"] / by[(s, lo)]["tok_s"]
        for s in ("realm", "llama.cpp") if (s, lo) in by and (s, hi) in by
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
