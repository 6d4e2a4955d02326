"""Noisy neighbours: does a tenant running hostile guests slow another tenant down?

    .venv/bin/python benchmarks/noisy_neighbours.py [--rounds 3] [--repo DIR ...]

One `realm serve` with a victim tenant (the default guest) and four hostile tenants, each
with a guest from tests/guests/: `loop.wat` (a busy loop in WebAssembly), `host_flood.wat`
(realm_abi_version in a loop: Python host calls, the GIL), `fill_memory.wat` (grows its
memory to its cap, then sweeps it) and `matmul_flood.wat` (realm_matmul_cpu in a loop: the
host's kernels on the guest's behalf). The victim streams greedy completions alone, then
beside 4 requests of each hostile tenant in turn (kept at 4: one that its limits stop is
sent again), round after round, so a slow spell of the machine falls on every phase. It
reports the victim's time per output token (p50, p99: the gaps between a stream's tokens,
pooled per phase), each hostile phase's ratio to the alone phase of the same round, the
median ratio over the rounds, the ratio of p99s with every round's gaps pooled, and whether
the victim's text was the same in every phase.

`--repo DIR ...` runs one server from each checkout (e.g. main before a change and this one
after it), with this script's hostile guests; their phases take turns in every round, so
the figures of both come from the same minutes of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from anchor import REPO, client_gc_off, cpu_model, start_realm_server, stop, wait_healthy

GUESTS = REPO / "tests" / "guests"
HOSTILE = {"busy": "loop.wat", "flood": "host_flood.wat", "memory": "fill_memory.wat", "matmul": "matmul_flood.wat"}
PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "Explain how a steam engine works, step by step.",
]


def start_server(repo: Path, model: str, work: Path, hostile_seconds: float) -> tuple:
    """`realm serve` from `repo`: tenant victim (default guest) and one tenant per hostile guest."""
    hostile = {"max_concurrent": 4, "guest_seconds": hostile_seconds, "wall_seconds": hostile_seconds}
    tenants: dict[str, dict[str, object]] = {"victim": {"max_concurrent": 4}}
    tenants |= {name: {"guest": GUESTS / module, **hostile} for name, module in HOSTILE.items()}
    return start_realm_server(f'["{model}"]', tenants, work, repo)


async def victim_stream(http: httpx.AsyncClient, base: str, key: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    stamps: list[float] = []
    text: list[str] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with http.stream("POST", base + "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise SystemExit(f"victim: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"victim: error in stream: {chunk['error']}")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
    return {"gaps": [b - a for a, b in zip(stamps, stamps[1:])], "text": "".join(text)}


async def hostile_client(http: httpx.AsyncClient, base: str, key: str, model: str, stop_event: asyncio.Event) -> int:
    """Keeps one hostile request running until told to stop; how many it sent."""
    body = {"model": model, "prompt": "x", "max_tokens": 8}
    sent = 0
    while not stop_event.is_set():
        sent += 1
        request = asyncio.ensure_future(
            http.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        )
        done, _ = await asyncio.wait([request, asyncio.ensure_future(stop_event.wait())], return_when="FIRST_COMPLETED")
        if request not in done:
            request.cancel()  # the client goes away: the server cancels the guest
            break
        if request.result().status_code not in (502, 429):
            raise SystemExit(f"hostile: unexpected HTTP {request.result().status_code}: {request.result().text[:300]}")
    return sent


def active(base: str, tenant: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'realm_active_requests{{tenant="{tenant}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def phase(base: str, keys: dict, model: str, hostile: str | None, args) -> dict:
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        stop_event = asyncio.Event()
        attackers = []
        if hostile:
            attackers = [
                asyncio.ensure_future(hostile_client(http, base, keys[hostile], model, stop_event))
                for _ in range(args.hostile)
            ]
            while await asyncio.to_thread(active, base, hostile) < args.hostile:
                await asyncio.sleep(0.05)
            await asyncio.sleep(args.settle)
        with client_gc_off():
            runs = [await victim_stream(http, base, keys["victim"], model, p, args.max_tokens) for p in PROMPTS]
        stop_event.set()
        sent = sum(await asyncio.gather(*attackers))
    started = time.perf_counter()
    while hostile and await asyncio.to_thread(active, base, hostile) > 0:
        await asyncio.sleep(0.1)
    gaps = sorted(g for r in runs for g in r["gaps"])
    q = statistics.quantiles(gaps, n=100, method="inclusive")
    return {
        "hostile": hostile or "alone",
        "p50_ms": 1000 * q[49],
        "p99_ms": 1000 * q[98],
        "gaps": gaps,
        "texts": [r["text"] for r in runs],
        "hostile_requests": sent,
        "wind_down_s": time.perf_counter() - started,
    }


def pooled_p99(rows: list[dict], hostile: str) -> float:
    """The p99 of a phase's gaps over every round together: a p99 of one round's ~250 gaps is
    its third largest, which one slow spell of the machine decides."""
    gaps = sorted(g for r in rows if r["hostile"] == hostile for g in r["gaps"])
    return statistics.quantiles(gaps, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hostile", type=int, default=4, help="hostile requests at once")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hostile-seconds", type=float, default=10.0, help="the hostile tenants' time limits")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.3,
        help="seconds from the hostile requests running to the victim's first (0.3: their CPU slices before "
        "demotion, 0.25 s each, fall in the victim's streams; 2: the victim sees demoted guests only)",
    )
    parser.add_argument("--repo", type=Path, nargs="+", default=[REPO], help="the checkouts whose servers run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"{cpu_model()}; servers from {', '.join(map(str, args.repo))}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="realm-noisy-") as tmp:
        servers = []
        for i, repo in enumerate(args.repo):
            (Path(tmp) / str(i)).mkdir()
            servers.append((str(repo), *start_server(repo, args.model, Path(tmp) / str(i), args.hostile_seconds)))
        try:
            for _, proc, base, keys in servers:
                wait_healthy([base], [proc], 600)
                asyncio.run(phase(base, keys, args.model, None, args))  # warm up
            for round_ in range(args.rounds):
                for hostile in [None, *HOSTILE]:
                    for repo, _, base, keys in servers:
                        row = asyncio.run(phase(base, keys, args.model, hostile, args))
                        rows.append(row | {"round": round_, "server": repo})
                        print(
                            f"  round {round_} {repo} {row['hostile']:6}: victim TPOT p50 {row['p50_ms']:6.1f} ms "
                            f"p99 {row['p99_ms']:6.1f} ms ({row['hostile_requests']} hostile requests, "
                            f"wind-down {row['wind_down_s']:.1f} s)",
                            flush=True,
                        )
        finally:
            stop([proc for _, proc, _, _ in servers])
    same_text, summary = True, {}
    print(f"\n{cpu_model()}; victim beside {args.hostile} hostile requests / alone, same round; median over rounds")
    for repo in map(str, args.repo):
        mine = [r for r in rows if r["server"] == repo]
        alone = {r["round"]: r for r in mine if r["hostile"] == "alone"}
        same_text &= all(r["texts"] == alone[r["round"]]["texts"] == alone[0]["texts"] for r in mine)
        print(
            f"  {repo}: alone TPOT p50 {statistics.median(a['p50_ms'] for a in alone.values()):.1f} ms "
            f"p99 {statistics.median(a['p99_ms'] for a in alone.values()):.1f} ms (medians)"
        )
        pooled_alone = pooled_p99(mine, "alone")
        for hostile in HOSTILE:
            ratios = {
                q: [r[q] / alone[r["round"]][q] for r in mine if r["hostile"] == hostile] for q in ("p50_ms", "p99_ms")
            }
            pooled = pooled_p99(mine, hostile) / pooled_alone
            summary[f"{repo}:{hostile}"] = {q: statistics.median(v) for q, v in ratios.items()} | {
                "pooled_p99": pooled,
                "rounds": ratios,
            }
            print(
                f"    {hostile:6}: TPOT p50 x{statistics.median(ratios['p50_ms']):.2f} "
                f"p99 x{statistics.median(ratios['p99_ms']):.2f} "
                f"(p99 rounds: {', '.join(f'{x:.2f}' for x in ratios['p99_ms'])}; all rounds pooled: x{pooled:.2f})"
            )
    print(f"  victim's text the same in every phase: {same_text}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "rows": rows, "summary": summary}, indent=2))
    if not same_text:
        raise SystemExit("the victim's text changed beside a hostile tenant")


if __name__ == "__main__":
    main()
