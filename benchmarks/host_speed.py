"""Realm against llama.cpp on both models, side by side in one run: prefill and decode
tokens/s at batch 1 with 2 threads, as ratios Realm / llama.cpp, and resident memory.

    .venv/bin/python benchmarks/host_speed.py [--llama-bin DIR]

llama.cpp is its own `llama-bench` (`-p 128 -n 64 -d 0,128 -t 2`) for speed and `llama-server`
(one slot) for memory: its resident bytes after loading and after one short completion
(the weights' pages are in by then; llama.cpp maps the GGUF and reads it lazily). Realm
is `realm bench` on the compiled decode step, built first. Each engine runs in its own
fresh process, the two alternate round by round so that machine noise hits both alike,
and each figure is the best of its rounds. Both decode after the prompt: `realm bench`
feeds it first, and llama-bench's decode is the one at depth 128 (`-d`); from an empty
context, as plain `-n 64` measures it, smollm2's attention has less to read and decodes
about 15% faster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from anchor import cpu_model, llama_bin, rss, start_llama_server, stop, wait_healthy


def run_json(cmd: list[str]) -> object:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    out = done.stdout.strip()
    return json.loads(out if out.startswith("[") else out.splitlines()[-1])


def llama_bench(bin_dir: Path, model: Path, prompt_tokens: int, gen_tokens: int, threads: int) -> dict:
    """llama-bench's best sample of prefill (from an empty context) and of decode (after
    `prompt_tokens` of context, as Realm's), tokens/s."""
    runs = run_json(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(prompt_tokens),
            "-n",
            str(gen_tokens),
            "-d",
            f"0,{prompt_tokens}",
            "-r",
            "3",
            "-o",
            "json",
        ]
    )
    prefill = next(r for r in runs if r["n_prompt"] and not r["n_gen"] and not r["n_depth"])
    decode = next(r for r in runs if r["n_gen"] and not r["n_prompt"] and r["n_depth"] == prompt_tokens)
    return {"prefill_tok_s": max(prefill["samples_ts"]), "decode_tok_s": max(decode["samples_ts"])}


def llama_memory(bin_dir: Path, model: Path, threads: int, work: Path) -> dict:
    proc, base = start_llama_server(bin_dir, model, 1, 512, threads, work / "llama-server.log")
    try:
        wait_healthy([base], [proc], 300)
        time.sleep(0.5)
        loaded = rss([proc.pid])
        httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=120)
        return {"rss_after_load": loaded, "rss_after_run": rss([proc.pid])}
    finally:
        stop([proc])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--llama-bin", help="folder with llama-bench and llama-server (default: build them)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()

    from realm.models.catalogue import pull

    bin_dir = llama_bin(args.llama_bin)
    print(cpu_model(), flush=True)
    results = []
    for name in args.models:
        path = pull(name, progress=False)
        subprocess.run([sys.executable, "-m", "realm.cli", "compile", name], check=True)  # measure the compiled step
        realm_runs, llama_runs = [], []
        for _ in range(args.rounds):
            realm_runs.append(
                run_json(
                    [
                        sys.executable,
                        "-m",
                        "realm.cli",
                        "bench",
                        "--model",
                        str(path),
                        "--json",
                        "--backend",
                        "cpu",
                        "--prompt-tokens",
                        str(args.prompt_tokens),
                        "--gen-tokens",
                        str(args.gen_tokens),
                        "--repeats",
                        "2",
                    ]
                )
            )
            llama_runs.append(llama_bench(bin_dir, path, args.prompt_tokens, args.gen_tokens, args.threads))
        with tempfile.TemporaryDirectory() as tmp:
            memory = llama_memory(bin_dir, path, args.threads, Path(tmp))
        best = lambda runs, key: max(r[key] for r in runs)  # noqa: E731
        row = {
            "model": name,
            "cpu": cpu_model(),
            "realm_prefill_tok_s": best(realm_runs, "prefill_tok_s"),
            "llama_cpp_prefill_tok_s": best(llama_runs, "prefill_tok_s"),
            "realm_decode_tok_s": best(realm_runs, "decode_tok_s"),
            "llama_cpp_decode_tok_s": best(llama_runs, "decode_tok_s"),
            "realm_decode_step": realm_runs[0]["decode_step"],
            "realm_rss_after_load": min(r["rss_after_load"] for r in realm_runs),
            "realm_rss_after_run": min(r["rss_after_run"] for r in realm_runs),
            "llama_cpp_rss_after_load": memory["rss_after_load"],
            "llama_cpp_rss_after_run": memory["rss_after_run"],
            "gguf_bytes": realm_runs[0]["file_bytes"],
        }
        row["prefill_ratio"] = row["realm_prefill_tok_s"] / row["llama_cpp_prefill_tok_s"]
        row["decode_ratio"] = row["realm_decode_tok_s"] / row["llama_cpp_decode_tok_s"]
        row["rss_ratio"] = row["realm_rss_after_run"] / row["llama_cpp_rss_after_run"]
        results.append(row)
        mib = lambda key, row=row: row[key] / 2**20  # noqa: E731
        print(
            f"{name}: prefill {row['realm_prefill_tok_s']:.0f} vs {row['llama_cpp_prefill_tok_s']:.0f} tok/s "
            f"(x{row['prefill_ratio']:.2f}); decode {row['realm_decode_tok_s']:.1f} vs "
            f"{row['llama_cpp_decode_tok_s']:.1f} tok/s (x{row['decode_ratio']:.2f}, {row['realm_decode_step']} step); "
            f"RSS after load {mib('realm_rss_after_load'):.0f} vs {mib('llama_cpp_rss_after_load'):.0f} MiB, "
            f"after a run {mib('realm_rss_after_run'):.0f} vs {mib('llama_cpp_rss_after_run'):.0f} MiB "
            f"(x{row['rss_ratio']:.2f}; GGUF {mib('gguf_bytes'):.0f} MiB)",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
