"""`realm serve` as an operator runs it, a real process sent real signals: SIGHUP takes the
config's new API keys without a restart, SIGTERM lets running streams finish (new requests
get 503) and stops those still running at the end of the grace period, and `docs = false`
hides the API's documentation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from realm.server.keys import hash_key
from tests.test_start import free_port, health

MODEL = "smollm2-135m"
KEY_A, KEY_A2, KEY_B = "realm-key-a", "realm-key-a2", "realm-key-b"


def config_text(smollm2_path: Path, key_a: str, grace_s: float) -> str:
    return f"""
docs = false
shutdown_grace_s = {grace_s}
models = [{{ name = "{MODEL}", path = "{smollm2_path}" }}]

[[tenants]]
name = "a"
keys = ["{hash_key(key_a)}"]

[[tenants]]
name = "b"
keys = ["{hash_key(KEY_B)}"]
"""


@pytest.fixture(scope="module")
def served(smollm2_path, tmp_path_factory):
    """A `realm serve --config` process on a free port, ready; its config file; killed after.
    One for the module: the SIGTERM test, the last, ends it."""
    config = tmp_path_factory.mktemp("serve") / "realm.toml"
    config.write_text(config_text(smollm2_path, KEY_A, grace_s=4))
    port = free_port()
    env = {**os.environ, "REALM_COMPILE": "cached"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "realm.cli", "serve", "--config", str(config), "--port", str(port), "--threads", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health(port, timeout=120)
        yield proc, f"http://127.0.0.1:{port}", config
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def status(base: str, key: str) -> int:
    return httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code


def until(predicate, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def stream_events(base: str, prompt: str, max_tokens: int, out: list, first: threading.Event) -> None:
    """A streamed completion's SSE data, appended to `out` as they come."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY_B}"}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                first.set()
    first.set()


def test_sighup_reloads_keys_and_docs_can_be_off(served, smollm2_path):
    proc, base, config = served
    assert httpx.get(f"{base}/docs").status_code == 404
    assert httpx.get(f"{base}/openapi.json").status_code == 404
    assert status(base, KEY_A) == 200 and status(base, KEY_A2) == 401

    config.write_text(config_text(smollm2_path, KEY_A2, grace_s=4))
    proc.send_signal(signal.SIGHUP)
    assert until(lambda: status(base, KEY_A) == 401), "a key removed from the config still works after SIGHUP"
    assert status(base, KEY_A2) == 200 and status(base, KEY_B) == 200

    config.write_text("this is not [toml")
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None, "a broken config on SIGHUP stopped the server"
    assert status(base, KEY_A2) == 200, "a broken config on SIGHUP dropped the keys"


def test_sigterm_drains_running_streams_then_stops_the_rest(served):
    proc, base, _ = served
    short: list = []
    long: list = []
    short_started, long_started = threading.Event(), threading.Event()
    threads = [
        threading.Thread(target=stream_events, args=(base, "The capital of France is", 6, short, short_started)),
        threading.Thread(target=stream_events, args=(base, "1, 2, 3, 4, 5,", 1000, long, long_started)),
    ]
    for t in threads:
        t.start()
    assert short_started.wait(60) and long_started.wait(60)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)

    assert until(lambda: httpx.get(f"{base}/health").status_code == 503, timeout=5), "/health still 200 while draining"
    refused = httpx.post(
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {KEY_B}"},
    )
    assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]

    for t in threads:
        t.join(60)
    assert proc.wait(30) == 0
    exited = time.monotonic() - signalled

    assert short[0] == 200 and short[-1] == "[DONE]"
    finish = [json.loads(d)["choices"][0]["finish_reason"] for d in short[1:-1] if '"choices"' in d]
    assert finish[-1] in ("length", "stop"), "the short stream did not finish normally"

    assert long[0] == 200 and long[-1] == "[DONE]"
    error = json.loads(long[-2])["error"]
    assert "shut down" in error["message"], error
    texts = [json.loads(d)["choices"][0]["text"] for d in long[1:-2]]
    assert 0 < len(texts) < 1000
    assert exited < 4 + 15, f"the server took {exited:.1f} s to exit after a 4 s grace period"
