"""Schemathesis against the OpenAPI schema of a real running Realm server: cases made from
/openapi.json alone, valid ones (positive) and broken ones (negative), sent over HTTP;
no answer may be a 5xx.

    .venv/bin/python benchmarks/api_fuzz.py [--examples 250] [--seed 0]

It starts `realm serve` (smollm2-135m, REALM_COMPILE=cached) with one tenant whose
requests may ask for at most 4 tokens (so generations stay short), runs `--examples`
cases per operation and mode (hypothesis may make fewer where the schema allows fewer,
e.g. GET /health), and prints the count of each status per operation and mode. Exit
status 1 if any answer was a 5xx (each printed as a curl command). tests/test_server_robustness.py
runs `fuzz` with a few examples against its own server.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import hypothesis
import schemathesis
from anchor import cpu_model
from flood import start_server
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode


def fuzz(base: str, headers: dict[str, str], examples: int, seed: int = 0) -> tuple[Counter, list[str]]:
    """Up to `examples` cases per operation of the server at `base` and per mode (positive,
    negative), sent with `headers`: (counts by (method path, mode, status), each 5xx as a curl command)."""
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    counts: Counter = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        for mode in GenerationMode:
            _fuzz_operation(result.ok(), mode, base, headers, examples, seed, counts, failures)
    return counts, failures


def _fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    base: str,
    headers: dict[str, str],
    examples: int,
    seed: int,
    counts: Counter,
    failures: list[str],
) -> None:
    @hypothesis.seed(seed)
    @hypothesis.settings(
        max_examples=examples,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    def send(case: schemathesis.Case) -> None:
        response = case.call(base_url=base, headers=headers, timeout=120)
        counts[(f"{case.method} {case.path}", mode.value, response.status_code)] += 1
        if response.status_code >= 500:
            failures.append(f"{response.status_code}: {case.as_curl_command(headers)}")

    try:
        send()
    except hypothesis.errors.Unsatisfiable:  # e.g. no way to break a request that has no inputs
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=250, help="cases per operation and mode")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    with tempfile.TemporaryDirectory() as work:
        server, base, keys = start_server(Path(work), max_concurrent=4, max_tokens=4)
        try:
            started = time.perf_counter()
            counts, failures = fuzz(base, {"Authorization": f"Bearer {keys['flood']}"}, args.examples, args.seed)
            took = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=30)
    by_operation: dict[tuple[str, str], Counter] = {}
    for (operation, mode, status), n in counts.items():
        by_operation.setdefault((operation, mode), Counter())[status] += n
    for (operation, mode), statuses in sorted(by_operation.items()):
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items()))
        print(f"{operation:32} {mode:8} {sum(statuses.values()):5}  {shown}")
    total = sum(counts.values())
    per_mode = Counter({m: 0 for m in ("positive", "negative")})
    for (_, mode, _), n in counts.items():
        per_mode[mode] += n
    print(f"{total} cases ({per_mode['positive']} positive, {per_mode['negative']} negative) in {took:.0f} s; "
          f"{len(failures)} answered 5xx")  # fmt: skip
    for f in failures:
        print(f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    os.environ.setdefault("REALM_COMPILE", "cached")
    main()
