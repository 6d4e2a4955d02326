"""The `realm` command, run as a user runs it (a subprocess), on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REFERENCE


def realm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "realm.cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_tokenize_matches_llama_cpp(smollm2_path):
    case = json.loads((REFERENCE / "smollm2-135m-instruct-q4_1.tokenizer.json").read_text())["cases"][3]
    out = realm("tokenize", "--model", "smollm2-135m", case["text"])
    assert json.loads(out.stdout) == case["ids"]


def test_tokenize_bos_and_special_flags(gemma3_path):
    plain = json.loads(realm("tokenize", "-m", "gemma3-270m", "<start_of_turn>hi").stdout)
    flagged = json.loads(realm("tokenize", "-m", "gemma3-270m", "--bos", "--special", "<start_of_turn>hi").stdout)
    assert flagged[0] == 2 and len(flagged) < len(plain) + 1


def test_run_streams_a_greedy_continuation(smollm2_path):
    out = realm("run", "--no-sandbox", "The capital of France is", "-n", "3", "--temperature", "0")
    assert out.stdout.startswith(" Paris")


def test_perplexity_json(smollm2_path):
    result = json.loads(realm("perplexity", "-m", "smollm2-135m", str(REFERENCE / "ppl_text.txt"), "--json").stdout)
    assert result["tokens"] == 302 and result["scored"] == 301
    assert abs(result["ppl"] / 15.6997 - 1) < 0.02


def test_bench_json(smollm2_path):
    result = json.loads(realm("bench", "-m", "smollm2-135m", "--prompt-tokens", "16", "--gen-tokens", "4",
                              "--repeats", "1", "--json").stdout)
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


def test_a_model_that_cannot_chat_fails_before_compiling(tmp_path):
    """gemma3's file has a template Realm cannot use: `--chat` says so at once, on both
    paths, rather than after the minutes a first compile takes (nothing is compiled)."""
    compiled = tmp_path / "compiled"
    for path in (["--no-sandbox"], []):
        done = realm("run", *path, "-m", "gemma3-270m", "--chat", "hi", check=False,
                     env={"TORCHINDUCTOR_CACHE_DIR": str(compiled)})
        assert done.returncode == 1 and "chat template" in done.stderr, done.stderr
        assert not compiled.exists() or not any(compiled.rglob("*.so")), path


def test_backends_json():
    info = json.loads(realm("backends", "--json").stdout)
    assert info["active"] in ("gpu", "cpu") and any(b["name"] == "cpu" for b in info["available"])


def test_run_on_a_terminal_says_it_is_compiling(smollm2_path):
    """The first `realm run` on a machine compiles for minutes: a terminal is told."""
    import os
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the terminal
        os.execv(sys.executable, [sys.executable, "-m", "realm.cli", "run", "--no-sandbox",
                                  "The capital of France is", "-n", "3", "--temperature", "0"])
    seen, deadline = b"", time.monotonic() + 600
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)  # hung: fail below rather than wait forever
            break
        try:
            data = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        seen += data
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"compiling the decode step" in seen and b" Paris" in seen
