"""How long a client waits for a model the server loads on demand, while another model is
busy: its packed weights mapped from `$REALM_HOME/packed`, against packed at the load
(REALM_PACKED_CACHE=off), in rounds that take turns.

    .venv/bin/python benchmarks/load_on_demand.py [--rounds 3]

Each round starts `realm serve` with smollm2-135m preloaded and gemma3-270m served but not
loaded; one client streams smollm2 the whole time; then a streamed gemma3 request is timed
to its first token, which includes gemma3's load. Medians, with the CPU model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from anchor import cpu_model, start_realm_server, stop, wait_healthy

BUSY, ON_DEMAND = "smollm2-135m", "gemma3-270m"


def first_token_on_demand(packed: bool) -> float:
    """One server, one round: seconds to the on-demand model's first token."""
    work = Path(tempfile.mkdtemp(prefix="realm-on-demand-"))
    os.environ["REALM_PACKED_CACHE"] = "on" if packed else "off"  # the server inherits it
    try:
        proc, base, keys = start_realm_server(
            f'["{BUSY}", "{ON_DEMAND}"]', {"t0": {"max_concurrent": 8}}, work, settings=(f'preload = ["{BUSY}"]',)
        )
    finally:
        del os.environ["REALM_PACKED_CACHE"]
    headers = {"Authorization": f"Bearer {next(iter(keys.values()))}"}
    stopping = threading.Event()

    def busy() -> None:
        body = {"model": BUSY, "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0}
        while not stopping.is_set():
            try:
                httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=120)
            except httpx.HTTPError:  # the server stopped at the end of the round
                return

    client = threading.Thread(target=busy)
    try:
        wait_healthy([base], [proc], 300)
        client.start()
        time.sleep(2)  # the busy model is decoding
        body = {"model": ON_DEMAND, "prompt": "Hi", "max_tokens": 4, "temperature": 0, "stream": True}
        started = time.perf_counter()
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    return time.perf_counter() - started
        raise SystemExit(f"no token from {ON_DEMAND}")
    finally:
        stopping.set()
        stop([proc])
        if client.is_alive():
            client.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for packed in (True, False):
            times[packed].append(first_token_on_demand(packed))
            print(f"  packed weights {'kept' if packed else 'off'}: {times[packed][-1]:.2f} s", flush=True)
    kept, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"{cpu_model()}; {ON_DEMAND} loaded on demand while {BUSY} streams, first token, median of {args.rounds}:")
    print(f"  packed weights kept {kept:.2f} s, off {off:.2f} s: x{kept / off:.2f}")


if __name__ == "__main__":
    main()
