"""llama.cpp's own programs as the anchor of every speed benchmark, and the machine facts
every figure carries.

`llama-bench` and `llama-server` are built once by `../shared/tools/llama-cpp-build`
(about 15 minutes on 2 cores, then cached) from the source the llama-cpp-python package
ships; `--llama-bin DIR` points at another build.
"""

from __future__ import annotations

import gc
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BUILD_TOOL = REPO.parent / "shared" / "tools" / "llama-cpp-build"


@contextmanager
def client_gc_off() -> Iterator[None]:
    """While a client times a server's tokens: its own garbage collections would be counted
    as the server's gaps (this client's took 8-20 ms each, a dozen a minute, measured with
    gc.callbacks: more than a server's p99 time per token)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def cpu_model() -> str:
    """The CPU's model name and the ISA extensions that decide the kernels, for every figure."""
    name, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni") if f in flags]
    return f"{name} ({os.cpu_count()} CPUs; {' '.join(isa) or 'no AVX2'})"


def llama_bin(given: str | None) -> Path:
    """The folder holding llama-bench and llama-server: `given`, else the build tool's."""
    if given:
        return Path(given)
    if not BUILD_TOOL.exists():
        raise SystemExit(f"no --llama-bin given and {BUILD_TOOL} is missing")
    done = subprocess.run([str(BUILD_TOOL)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{BUILD_TOOL} failed:\n{done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss(pids: list[int]) -> int:
    """Resident bytes of these processes together (VmRSS; 0 for one that is gone)."""
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


def start_llama_server(
    bin_dir: Path, model: Path, slots: int, ctx_per_slot: int, threads: int, log: Path
) -> tuple[subprocess.Popen, str]:
    """One llama-server with `slots` parallel sequences (continuous batching), each with
    `ctx_per_slot` tokens of context; (process, base URL)."""
    port = free_port()
    cmd = [
        str(bin_dir / "llama-server"),
        "-m",
        str(model),
        "--port",
        str(port),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-np",
        str(slots),
        "-c",
        str(slots * ctx_per_slot),
        "--no-webui",
        "--threads-http",
        str(2 * slots + 2),
    ]  # by default one per CPU: streams beyond that were dropped
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    return proc, f"http://127.0.0.1:{port}"


def start_realm_server(
    models: str,
    tenants: dict[str, dict[str, object]],
    workdir: Path,
    repo: Path = REPO,
    settings: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """`realm serve` of the checkout `repo` (with command-line `options`), serving `models`
    (a TOML value) to `tenants`: name -> its limits, plus "guest" (a module's path) for a
    guest of its own. Each tenant gets a new API key. The config (with `settings`, TOML
    lines) and the log go to `workdir`. Not waited for (see wait_healthy): (process, base
    URL, name -> key)."""
    sys.path.insert(0, str(REPO))
    from realm.server.keys import hash_key, new_key

    keys = {name: new_key() for name in tenants}
    port = free_port()
    lines = [f"port = {port}", 'backend = "cpu"', f"models = {models}", *settings, ""]
    for name, spec in tenants.items():
        limits = {k: v for k, v in spec.items() if k != "guest"}
        lines += ["[[tenants]]", f'name = "{name}"', f'keys = ["{hash_key(keys[name])}"]']
        if "guest" in spec:
            lines.append(f'guest = "{spec["guest"]}"')
        if limits:
            lines += ["[tenants.limits]", *(f"{k} = {v}" for k, v in limits.items())]
        lines.append("")
    config = workdir / "realm.toml"
    config.write_text("\n".join(lines))
    log = (workdir / "realm.log").open("w")
    cmd = [sys.executable, "-m", "realm.cli", "serve", "--config", str(config), "--log-level", "warning", *options]
    return subprocess.Popen(cmd, cwd=repo, stdout=log, stderr=log), f"http://127.0.0.1:{port}", keys


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


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
