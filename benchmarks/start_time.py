"""How long a user waits: `realm run` and `realm serve` started eager (REALM_COMPILE=off),
cold (no compiled decode step on the machine yet: REALM_COMPILE=auto starts a background
build and decodes eagerly), warm (the compiled step built) and unpacked (warm, but the
weights packed at the load rather than mapped from `$REALM_HOME/packed`:
REALM_PACKED_CACHE=off), side by side in one run.

    .venv/bin/python benchmarks/start_time.py [--model smollm2-135m] [--rounds 3]

`realm run -n 8 "Hi"` is timed to its first token and to its exit; `realm serve` to its
first /health 200 and then to the first token of a streamed completion. The three starts
take turns round by round, in a $REALM_HOME of their own whose models are the cache's;
figures are medians, given as ratios to the eager start, with the CPU model. A cold start's
background build is stopped after the measurement, so every cold round is cold.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

MODES = {
    "eager": {"REALM_COMPILE": "off"},
    "cold": {"REALM_COMPILE": "auto"},
    "warm": {"REALM_COMPILE": "cached"},
    "unpacked": {"REALM_COMPILE": "cached", "REALM_PACKED_CACHE": "off"},
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed_run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds to the first byte of output and to the exit, and the output."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    to_first = time.perf_counter() - started
    rest, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return to_first, time.perf_counter() - started, (first + rest).decode()


def timed_serve(realm: list[str], model: str, env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds to the first /health 200 and to the first streamed token after it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*realm, "serve", "-m", model, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise SystemExit("realm serve exited before it was healthy")
            time.sleep(0.05)
        healthy = time.perf_counter() - started
        body = {"model": model, "prompt": "Hi", "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    token = time.perf_counter() - started
                    break
        step = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["decode_steps"][model]
        return healthy, token, step
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def stop_builds(home: Path) -> None:
    """Kill a cold start's background build and remove what it left."""
    subprocess.run(["pkill", "-f", str(home / "models")], check=False)  # the build's argv names the model
    time.sleep(0.5)
    for p in (home / "compiled").glob("*"):
        if p.is_dir() and not (p / "manifest.json").exists():
            shutil.rmtree(p, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from realm.models.catalogue import pull

    path = pull(args.model, progress=False)
    realm = [sys.executable, "-m", "realm.cli"]
    with tempfile.TemporaryDirectory(prefix="realm-start-") as scratch:
        home = Path(scratch)
        (home / "models").symlink_to(path.parent)
        base = {**os.environ, "REALM_HOME": str(home)}
        started = time.perf_counter()
        subprocess.run([*realm, "compile", args.model], env=base, check=True, capture_output=True)
        build_seconds = time.perf_counter() - started
        built = next(p for p in (home / "compiled").iterdir() if p.is_dir())
        shelf = home / "shelf"
        runs: dict[str, list] = {m: [] for m in MODES}
        serves: dict[str, list] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode, settings in MODES.items():
                if mode == "cold":
                    built.rename(shelf)
                env = {**base, **settings}
                runs[mode].append(
                    timed_run([*realm, "run", "-m", args.model, "-n", "8", "--temperature", "0", "Hi"], env)
                )
                stop_builds(home)
                serves[mode].append(timed_serve(realm, args.model, env))
                stop_builds(home)
                if mode == "cold":
                    shutil.rmtree(built, ignore_errors=True)
                    shelf.rename(built)

    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    report = {
        "cpu": cpu_model(),
        "model": args.model,
        "rounds": args.rounds,
        "build_seconds": round(build_seconds, 1),
        "run": {m: {"first_token_s": round(med(r, 0), 2), "exit_s": round(med(r, 1), 2)} for m, r in runs.items()},
        "serve": {
            m: {"health_s": round(med(r, 0), 2), "first_token_s": round(med(r, 1), 2), "decode_step": r[-1][2]}
            for m, r in serves.items()
        },
        "same_text": len({r[2] for rows in runs.values() for r in rows}) == 1,
    }
    for kind, key in (("run", "exit_s"), ("run", "first_token_s"), ("serve", "health_s"), ("serve", "first_token_s")):
        eager = report[kind]["eager"][key]
        for mode in ("cold", "warm", "unpacked"):
            report[kind][mode][f"{key}_vs_eager"] = round(report[kind][mode][key] / eager, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
