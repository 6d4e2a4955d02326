"""The `realm` command, run as a user runs it (a subprocess), on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REFERENCE


def realm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "realm.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_tokenize_matches_llama_cpp(smollm2_path):
    case = json.loads((REFERENCE / "smollm2-135m-instruct-q4_1.tokenizer.json").read_text())["cases"][3]
    out = realm("tokenize", "--model", "smollm2-135m", case["text"])
    assert json.loads(out.stdout) == case["ids"]


@pytest.mark.slow  # a CLI process loading a model; the same logic is tested in-process elsewhere
def test_tokenize_bos_and_special_flags(gemma3_path):
    plain = json.loads(realm("tokenize", "-m", "gemma3-270m", "<start_of_turn>hi").stdout)
    flagged = json.loads(realm("tokenize", "-m", "gemma3-270m", "--bos", "--special", "<start_of_turn>hi").stdout)
    assert flagged[0] == 2 and len(flagged) < len(plain) + 1


def test_run_streams_a_greedy_continuation(smollm2_path):
    out = realm("run", "--no-sandbox", "The capital of France is", "-n", "3", "--temperature", "0")
    assert out.stdout.startswith(" Paris")


@pytest.mark.slow  # a CLI process loading a model; the same logic is tested in-process elsewhere
def test_run_under_a_constraint_in_the_guest_and_on_the_host(smollm2_path):
    args = ["run", "The year the war ended was", "-n", "8", "--temperature", "0"]
    regex = ["--constraint", '{"type": "regex", "pattern": " [0-9]{4}"}']
    guest, host = realm(*args, *regex).stdout, realm(*args, *regex, "--no-sandbox").stdout
    assert guest == host and len(guest.strip()) == 4 and guest.strip().isdigit()
    bad = realm(*args, "--constraint", '{"type": "regex", "pattern": "(("}', check=False)
    assert bad.returncode != 0 and "regex" in bad.stderr


@pytest.mark.slow  # a CLI process loading a model; the same logic is tested in-process elsewhere
def test_perplexity_json(smollm2_path):
    result = json.loads(realm("perplexity", "-m", "smollm2-135m", str(REFERENCE / "ppl_text.txt"), "--json").stdout)
    assert result["tokens"] == 302 and result["scored"] == 301
    assert abs(result["ppl"] / 15.6997 - 1) < 0.02


@pytest.mark.slow  # a CLI process loading a model; the same logic is tested in-process elsewhere
def test_bench_json(smollm2_path):
    result = json.loads(
        realm(
            "bench", "-m", "smollm2-135m", "--prompt-tokens", "16", "--gen-tokens", "4", "--repeats", "1", "--json"
        ).stdout
    )
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0


def test_models_lists_the_cache(smollm2_path):
    rows = json.loads(realm("models", "--json").stdout)
    smol = next(r for r in rows if r["name"] == "smollm2-135m")
    assert smol["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert smol["architecture"] == "llama" and smol["quantization"]["Q4_1"] == 210


def test_inspect_json(gemma3_path):
    info = json.loads(realm("inspect", "gemma3-270m", "--json").stdout)
    assert info["config"]["sliding_window"] == 512 and len(info["tensors"]) == 236


def test_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    done = realm("inspect", str(bad), check=False)
    assert done.returncode == 1 and "error:" in done.stderr and "Traceback" not in done.stderr
    done = realm("run", "--no-sandbox", "-m", "no-such-model", "hi", check=False)
    assert done.returncode == 1 and "no-such-model" in done.stderr


@pytest.mark.slow  # a CLI process loading a model; the same logic is tested in-process elsewhere
def test_a_model_that_cannot_chat_fails_at_once(gemma3_path):
    """gemma3's file has a template Realm cannot use: `--chat` says so, on both paths."""
    for path in (["--no-sandbox"], []):
        done = realm("run", *path, "-m", "gemma3-270m", "--chat", "hi", check=False)
        assert done.returncode == 1 and "chat template" in done.stderr, done.stderr


def test_backends_json():
    info = json.loads(realm("backends", "--json").stdout)
    assert info["active"] in ("gpu", "cpu") and any(b["name"] == "cpu" for b in info["available"])


def test_a_first_run_starts_at_once_and_builds_the_compiled_step_in_the_background(smollm2_path, tmp_path):
    """On a machine with no compiled step, `realm run` answers on the eager step and leaves
    a build running: at idle priority, in its own process group (Ctrl-C on the run leaves it
    alone) but in the run's session (Linux schedules sessions as groups; a session of its
    own would take half the CPU from whatever the user runs next)."""
    import re
    import signal

    (tmp_path / "models").symlink_to(smollm2_path.parent)
    done = realm(
        "run",
        "--no-sandbox",
        "The capital of France is",
        "-n",
        "3",
        "--temperature",
        "0",
        env={"REALM_HOME": str(tmp_path), "REALM_COMPILE": "auto"},
    )
    assert done.stdout.startswith(" Paris")
    found = re.search(r"decoding eagerly while process (\d+) builds it", done.stderr)
    assert found, done.stderr
    pid = int(found.group(1))
    try:
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(0)
        # the build takes its lock once it has imported torch, at idle priority: on a busy
        # machine that can take a while, so another process may first see no build at all
        deadline = time.monotonic() + 120
        while True:
            step = json.loads(realm("models", "--json", env={"REALM_HOME": str(tmp_path)}).stdout)[0]["decode_step"]
            if step != "none" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert step == "building"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_models_shows_whether_the_packed_weights_are_kept(smollm2_path, tmp_path, monkeypatch, cpu_backend):
    from realm.engine.model import load_model

    (tmp_path / "models").symlink_to(smollm2_path.parent)
    env = {"REALM_HOME": str(tmp_path)}

    def kept() -> bool:
        rows = json.loads(realm("models", "--json", env=env).stdout)
        return next(r for r in rows if r["name"] == "smollm2-135m")["packed_weights"]

    assert kept() is False
    monkeypatch.setenv("REALM_HOME", str(tmp_path))
    load_model(smollm2_path, cpu_backend, compile_mode="off")
    assert kept() is True


def test_compile_and_models_show_the_compiled_step(smollm2_compiled):
    """`realm models` says which models have a compiled step; `realm compile` on one that
    has it builds nothing."""
    rows = json.loads(realm("models", "--json").stdout)
    assert next(r for r in rows if r["name"] == "smollm2-135m")["decode_step"] == "compiled"
    done = realm("compile", "smollm2-135m")
    assert "already compiled" in done.stderr
