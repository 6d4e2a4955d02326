"""A flood of streaming clients against a real running Realm server, a fifth of them
leaving mid-stream: do the rest complete, does the server give everything back?

    .venv/bin/python benchmarks/flood.py [--clients 100] [--abort 0.2] [--max-tokens 16]

It starts `realm serve` (smollm2-135m, REALM_COMPILE=cached) with one tenant that may run
all the clients at once, measures one lone client's time to first token, then starts every
client at once (a chat request, streamed; an aborting client closes its connection after
its first piece of text), and two seconds in, one request of another tenant, "bystander".
It reports how many of the others completed, their time to first token (p50, p99, against
the lone client's), the bystander's, and the gauges /metrics shows once the server has
settled: KV cache blocks in use, steps queued, requests active (all should be 0).
tests/test_server_robustness.py runs a smaller flood in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
from anchor import cpu_model, start_realm_server, wait_healthy

MODEL = "smollm2-135m"
GAUGES = ("realm_kv_blocks_in_use", "realm_queue_depth", "realm_active_requests")


def start_server(
    workdir: Path, *, max_concurrent: int, max_tokens: int
) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """`realm serve` of smollm2-135m with a tenant "flood" of these limits and a tenant
    "bystander" of the default ones, healthy: (process, base URL, each tenant's key). Its
    log goes to `workdir`/realm.log."""
    flood = {"max_concurrent": max_concurrent, "max_tokens": max_tokens}
    server, base, keys = start_realm_server(f'["{MODEL}"]', {"flood": flood, "bystander": {}}, workdir)
    wait_healthy([base], [server], timeout=600)
    return server, base, keys


async def client(http: httpx.AsyncClient, i: int, abort: bool, max_tokens: int) -> tuple[str, float | None]:
    """One streamed chat: ("completed" | "aborted" | "failed <status>", seconds to first text)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write a sentence about the number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first, failed = None, False
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return f"failed {response.status_code}", None
        async for line in response.aiter_lines():
            failed = failed or line.startswith('data: {"error"')
            if first is None and line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                first = time.perf_counter() - started
                if abort:
                    return "aborted", first
            if line == "data: [DONE]":
                return ("failed in the stream" if failed else "completed"), first
    return "failed: the stream ended without [DONE]", first


def gauges(base: str, key: str) -> dict[str, float]:
    """Each gauge of GAUGES summed over its labels."""
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
    out = dict.fromkeys(GAUGES, 0.0)
    for line in text.splitlines():
        m = re.match(r"(\w+)(?:\{[^}]*\})? (\S+)$", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    return out


def settled(base: str, key: str, timeout: float = 60) -> tuple[dict[str, float], float]:
    """The gauges once they are all 0 (or after `timeout`), and the seconds that took."""
    started = time.perf_counter()
    while True:
        now = gauges(base, key)
        if not any(now.values()) or time.perf_counter() - started > timeout:
            return now, time.perf_counter() - started
        time.sleep(0.2)


async def flood(
    base: str, keys: dict[str, str], clients: int, abort: float, max_tokens: int, bystander: bool = True
) -> tuple[list[tuple[str, float | None]], tuple[str, float | None]]:
    """The flood's outcomes, and the bystander's (sent two seconds in; ("none", None) without one)."""
    aborting = set(range(0, clients, round(1 / abort))) if abort else set()
    limits = httpx.Limits(max_connections=clients + 2)

    async def other_tenant(http: httpx.AsyncClient) -> tuple[str, float | None]:
        if not bystander:
            return "none", None
        await asyncio.sleep(2)
        return await client(http, -1, False, max_tokens)

    def session(tenant: str) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {keys[tenant]}"}
        return httpx.AsyncClient(base_url=base, headers=headers, timeout=600, limits=limits)

    async with session("flood") as http, session("bystander") as other:
        flooding = asyncio.gather(*(client(http, i, i in aborting, max_tokens) for i in range(clients)))
        return await asyncio.gather(flooding, other_tenant(other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--abort", type=float, default=0.2, help="the share of clients that leave mid-stream")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    with tempfile.TemporaryDirectory() as work:
        server, base, keys = start_server(Path(work), max_concurrent=args.clients, max_tokens=args.max_tokens)
        try:
            lone = asyncio.run(flood(base, keys, 1, 0, args.max_tokens, bystander=False))[0][0]
            started = time.perf_counter()
            results, other = asyncio.run(flood(base, keys, args.clients, args.abort, args.max_tokens))
            took = time.perf_counter() - started
            after, settle_s = settled(base, keys["flood"])
        finally:
            server.terminate()
            server.wait(timeout=30)
    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    ttft = sorted(t for outcome, t in results if outcome == "completed" and t is not None)
    print(f"{args.clients} clients, {args.abort:.0%} leaving after their first text, max_tokens {args.max_tokens}")
    print(f"outcomes: {outcomes} in {took:.1f} s")
    if ttft:
        p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
        print(f"time to first token of the completing clients: p50 {statistics.median(ttft):.2f} s, p99 {p99:.2f} s "
              f"(one lone client before the flood: {lone[1]:.3f} s)")  # fmt: skip
    print(f"another tenant's request, sent 2 s into the flood: {other[0]}, time to first token {other[1] or 0:.2f} s")
    print(f"gauges {settle_s:.1f} s after the flood: " + ", ".join(f"{k} {v:g}" for k, v in after.items()))


if __name__ == "__main__":
    os.environ.setdefault("REALM_COMPILE", "cached")
    main()
