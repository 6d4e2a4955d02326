"""Realm against llama.cpp on both models, side by side in one run: prefill and decode
tokens/s at batch 1 with 2 threads, as ratios Realm / llama.cpp, and resident memory.

    .venv/bin/python benchmarks/host_speed.py --llama-python /path/to/python-with-llama_cpp

Each engine runs in its own fresh process (so resident memory is its own), and the two
alternate round by round so that machine noise hits both alike; each figure is the best
of its rounds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_json(cmd: list[str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--llama-python", default=sys.executable, help="a Python that can import llama_cpp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()

    from realm.models.catalogue import pull

    results = []
    for name in args.models:
        path = pull(name, progress=False)
        subprocess.run([sys.executable, "-m", "realm.cli", "compile", name], check=True)  # measure the compiled step
        realm_runs, llama_runs = [], []
        for _ in range(args.rounds):
            realm_runs.append(run_json([
                sys.executable, "-m", "realm.cli", "bench", "--model", str(path), "--json", "--backend", "cpu",
                "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeats", "2",
            ]))
            llama_runs.append(run_json([
                args.llama_python, str(HERE / "llama_cpp_worker.py"), str(path),
                str(args.prompt_tokens), str(args.gen_tokens), "2",
            ]))
        best = lambda runs, key: max(r[key] for r in runs)  # noqa: E731
        row = {
            "model": name,
            "realm_prefill_tok_s": best(realm_runs, "prefill_tok_s"),
            "llama_cpp_prefill_tok_s": best(llama_runs, "prefill_tok_s"),
            "realm_decode_tok_s": best(realm_runs, "decode_tok_s"),
            "llama_cpp_decode_tok_s": best(llama_runs, "decode_tok_s"),
            "realm_rss_after_load": min(r["rss_after_load"] for r in realm_runs),
            "llama_cpp_rss_after_load": min(r["rss_after_load"] for r in llama_runs),
            "gguf_bytes": realm_runs[0]["file_bytes"],
        }
        row["prefill_ratio"] = row["realm_prefill_tok_s"] / row["llama_cpp_prefill_tok_s"]
        row["decode_ratio"] = row["realm_decode_tok_s"] / row["llama_cpp_decode_tok_s"]
        results.append(row)
        print(
            f"{name}: prefill {row['realm_prefill_tok_s']:.0f} vs {row['llama_cpp_prefill_tok_s']:.0f} tok/s "
            f"(x{row['prefill_ratio']:.2f}); decode {row['realm_decode_tok_s']:.1f} vs "
            f"{row['llama_cpp_decode_tok_s']:.1f} tok/s (x{row['decode_ratio']:.2f}); RSS after load "
            f"{row['realm_rss_after_load'] / 2**20:.0f} MiB vs {row['llama_cpp_rss_after_load'] / 2**20:.0f} MiB "
            f"(GGUF {row['gguf_bytes'] / 2**20:.0f} MiB)",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
