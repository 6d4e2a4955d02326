"""One server, two models: does serving the second slow the first?

    .venv/bin/python benchmarks/two_models.py [--rounds 2] [--max-tokens 200]

It starts `realm serve` with smollm2-135m and gemma3-270m loaded, and measures smollm2's
time per output token for one streaming client (p50, each round a request of
`--max-tokens`): first while only smollm2 has served, then after gemma3 has served one
request, then gemma3's alone, then both streaming at once (their tokens/s together against
the sum of each alone). Before the compute thread
(realm/engine/compute_thread.py) each model had a runner thread with an OpenMP team of its
own, and once both teams existed on 2 cores every step ran about twice as long.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from anchor import cpu_model, start_realm_server, stop, wait_healthy
from server_load import phase

FIRST, SECOND = "smollm2-135m", "gemma3-270m"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="realm-two-models-"))
    proc, base, keys = start_realm_server(f'["{FIRST}", "{SECOND}"]', {"t0": {}, "t1": {}}, work)
    try:
        wait_healthy([base], [proc], 600)
        (first_key, second_key) = keys.values()

        def tpot(model: str, key: str, rounds: int) -> list[float]:
            runs = [asyncio.run(phase([(base, key)], model, 1, 1, args.max_tokens, {})) for _ in range(rounds)]
            return [r["tpot_p50_ms"] for r in runs]

        async def side_by_side() -> tuple[float, float]:
            first, second = await asyncio.gather(
                phase([(base, first_key)], FIRST, 1, 1, args.max_tokens, {}),
                phase([(base, second_key)], SECOND, 1, 1, args.max_tokens, {}),
            )
            return first["tpot_p50_ms"], second["tpot_p50_ms"]

        tpot(FIRST, first_key, 1)  # warm-up
        alone = tpot(FIRST, first_key, args.rounds)
        tpot(SECOND, second_key, 1)
        after = tpot(FIRST, first_key, args.rounds)
        second_alone = tpot(SECOND, second_key, args.rounds)
        beside = [asyncio.run(side_by_side()) for _ in range(args.rounds)]
    finally:
        stop([proc])
    base_ms = statistics.median(alone)
    print(f"{cpu_model()}; {FIRST} time per output token, p50 of each request, one streaming client")
    print(f"  only {FIRST} has served:     {' '.join(f'{t:.2f}' for t in alone)} ms")
    ratio = statistics.median(after) / base_ms
    print(f"  after {SECOND} has served:   {' '.join(f'{t:.2f}' for t in after)} ms (x{ratio:.2f})")
    print(f"  {SECOND} alone:              {' '.join(f'{t:.2f}' for t in second_alone)} ms")
    print(f"  both streaming at once:        {' '.join(f'{a:.2f} / {b:.2f}' for a, b in beside)} ms")
    alone_rate = 1000 / base_ms + 1000 / statistics.median(second_alone)
    both_rate = statistics.median(1000 / a + 1000 / b for a, b in beside)
    print(f"  tokens/s of both at once against the sum of each alone: x{both_rate / alone_rate:.2f}")


if __name__ == "__main__":
    main()
