"""Soak: minutes of mixed load against one real `realm serve`; does anything unexpected
happen, and does its memory creep?

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--model smollm2-135m]

The load, all at once for the whole run: streaming chats (a fifth leave after their first
text), whole completions, malformed requests (bad JSON, wrong types, unknown models, a
prompt longer than the context, the wrong content type), and three hostile tenants whose
guests spin, flood the host with calls, or fill their memory. Every answer is checked
against what it should be (a stream ends in [DONE] with no error event; a bad request gets
its own 4xx; a hostile guest's request 502 or 429); anything else is counted as unexpected
and printed. The drift of the server's resident memory is measured with nothing running (the load
paused until the gauges are 0): after the warm-up (the first fifth of the run) and at the
end; under load it is sampled every 5 s (a hostile guest's memory comes and goes). At the
end the live gauges must settle to 0 (KV blocks, queued steps, active requests).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
from anchor import cpu_model, rss, start_realm_server, stop, wait_healthy
from flood import gauges as flood_gauges
from flood import settled
from noisy_neighbours import GUESTS, HOSTILE

BAD = [  # (body or raw bytes, content type, the status it must get)
    (b"{not json", "application/json", 400),
    ({"model": "MODEL", "prompt": "x", "max_tokens": True}, "application/json", 400),
    ({"model": "MODEL", "prompt": "x", "temperature": "hot"}, "application/json", 400),
    ({"model": "no-such-model", "prompt": "x"}, "application/json", 404),
    ({"model": "MODEL", "prompt": "word " * 20000, "max_tokens": 4}, "application/json", 400),
    (b'{"model": "MODEL", "prompt": "x"}', "text/plain", 415),
    ({"model": "MODEL", "messages": []}, "application/json", 400),
]


def start_server(model: str, work: Path) -> tuple:
    hostile = {"max_concurrent": 2, "guest_seconds": 5, "wall_seconds": 5}
    tenants: dict[str, dict[str, object]] = {"users": {"max_concurrent": 16, "max_tokens": 64}}
    tenants |= {name: {"guest": GUESTS / module, **hostile} for name, module in HOSTILE.items()}
    return start_realm_server(f'["{model}"]', tenants, work)


class Soak:
    def __init__(self, base: str, keys: dict[str, str], model: str, until: float) -> None:
        self.base, self.keys, self.model, self.until = base, keys, model, until
        self.outcomes: Counter[str] = Counter()
        self.unexpected: list[str] = []

    def client(self, tenant: str) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=120)

    def note(self, kind: str, ok: bool, detail: str) -> None:
        self.outcomes[f"{kind} {'ok' if ok else 'UNEXPECTED'}"] += 1
        if not ok:
            self.unexpected.append(f"{kind}: {detail}")
            print(f"  unexpected {kind}: {detail}", flush=True)

    async def streams(self, seed: int) -> None:
        rng = random.Random(seed)
        async with self.client("users") as http:
            while time.monotonic() < self.until:
                abort = rng.random() < 0.2
                body = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": f"Tell me about the number {rng.randrange(1000)}."}],
                    "max_tokens": rng.randrange(8, 64),
                    "stream": True,
                }
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        self.note("stream", False, f"HTTP {r.status_code} {(await r.aread())[:200]!r}")
                        continue
                    lines = []
                    async for line in r.aiter_lines():
                        if not line:
                            continue
                        lines.append(line)
                        if abort and '"content":"' in line:
                            break
                if abort:
                    self.note("stream aborted", True, "")
                else:
                    errors = [x for x in lines if x.startswith('data: {"error"')]
                    self.note("stream", not errors and lines[-1:] == ["data: [DONE]"], str(errors or lines[-1:]))

    async def completions(self) -> None:
        async with self.client("users") as http:
            while time.monotonic() < self.until:
                r = await http.post("/v1/completions", json={"model": self.model, "prompt": "Hi", "max_tokens": 16})
                self.note("completion", r.status_code == 200, f"HTTP {r.status_code} {r.text[:200]}")

    async def bad_requests(self) -> None:
        async with self.client("users") as http:
            while time.monotonic() < self.until:
                for body, content_type, want in BAD:
                    raw = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
                    raw = raw.replace(b"MODEL", self.model.encode())
                    r = await http.post("/v1/completions", content=raw, headers={"Content-Type": content_type})
                    detail = f"HTTP {r.status_code} (want {want}) {r.text[:200]}"
                    self.note("bad request", r.status_code == want, detail)
                await asyncio.sleep(1)

    async def hostile(self, tenant: str) -> None:
        async with self.client(tenant) as http:
            while time.monotonic() < self.until:
                r = await http.post("/v1/completions", json={"model": self.model, "prompt": "x", "max_tokens": 8})
                self.note(f"hostile {tenant}", r.status_code in (429, 502), f"HTTP {r.status_code} {r.text[:200]}")
                if r.status_code == 429:
                    await asyncio.sleep(0.5)

    async def run(self) -> None:
        await asyncio.gather(
            *(self.streams(i) for i in range(4)),
            self.completions(),
            self.bad_requests(),
            *(self.hostile(t) for t in HOSTILE),
        )


def quiet_rss(proc: subprocess.Popen, base: str, key: str) -> int:
    """The server's resident bytes once nothing runs (gauges at 0, its guests' threads gone)."""
    settled(base, key)
    time.sleep(2)
    return rss([proc.pid])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; {args.minutes:g} minutes of mixed load on {args.model}", flush=True)
    with tempfile.TemporaryDirectory(prefix="realm-soak-") as work:
        proc, base, keys = start_server(args.model, Path(work))
        try:
            wait_healthy([base], [proc], 600)
            duration = args.minutes * 60
            soak = Soak(base, keys, args.model, time.monotonic() + duration / 5)
            asyncio.run(soak.run())  # warm-up
            quiet_before = quiet_rss(proc, base, keys["users"])
            started = time.monotonic()
            soak.until = started + duration * 4 / 5
            samples: list[int] = []

            async def sample_memory() -> None:
                while time.monotonic() < soak.until:
                    samples.append(rss([proc.pid]))
                    await asyncio.sleep(5)

            async def everything() -> None:
                await asyncio.gather(soak.run(), sample_memory())

            asyncio.run(everything())
            settle_started = time.monotonic()
            quiet_after = quiet_rss(proc, base, keys["users"])
            settle_s = time.monotonic() - settle_started
            gauges = flood_gauges(base, keys["users"])
        finally:
            stop([proc])
    mib = 1 << 20
    drift = (quiet_after - quiet_before) / quiet_before
    print(f"\n{cpu_model()}; {args.minutes:g} minutes")
    for outcome, n in sorted(soak.outcomes.items()):
        print(f"  {outcome}: {n}")
    print(f"  unexpected answers: {len(soak.unexpected)}")
    print(
        f"  RSS with no request running: {quiet_before / mib:.0f} MiB after the warm-up, {quiet_after / mib:.0f} MiB "
        f"at the end (drift {drift:+.2%}); under load: median {statistics.median(samples) / mib:.0f}, "
        f"max {max(samples) / mib:.0f} MiB (hostile guests' memory included)"
    )
    print(f"  gauges {settle_s:.1f} s after the load: " + ", ".join(f"{k} {v:g}" for k, v in gauges.items()))
    if soak.unexpected or any(gauges.values()):
        raise SystemExit("the soak found unexpected answers or a server that did not settle")


if __name__ == "__main__":
    main()
