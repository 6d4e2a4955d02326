"""Time to a working tokenizer, Realm against llama.cpp, side by side in one run.

    .venv/bin/python benchmarks/tokenizer_load.py --llama-python /path/to/python-with-llama_cpp

Realm: read the GGUF's metadata and build the tokenizer (`Tokenizer.from_gguf_fields`).
llama.cpp: `Llama(path, vocab_only=True)`, which reads the same metadata and builds its
vocabulary. Each round times both once, in fresh processes, alternating; the figure is
the best round of each and the ratio Realm / llama.cpp (below 1: Realm is faster).
Without --llama-python only Realm's times are printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

REALM = """
import json, sys, time
from realm.models.gguf_file import GGUFFile
from realm.models.tokenizer import Tokenizer
started = time.perf_counter()
Tokenizer.from_gguf_fields(GGUFFile(sys.argv[1]).metadata)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
started = time.perf_counter()
Llama(sys.argv[1], vocab_only=True, verbose=False)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def seconds(python: str, script: str, path: str) -> float:
    done = subprocess.run([python, "-c", script, path], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{python} failed on {path}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--llama-python", default="", help="a Python that can import llama_cpp")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from realm.models.catalogue import pull

    for name in args.models:
        path = str(pull(name, progress=False))
        realm, llama = [], []
        for _ in range(args.rounds):
            realm.append(seconds(sys.executable, REALM, path))
            if args.llama_python:
                llama.append(seconds(args.llama_python, LLAMA_CPP, path))
        line = f"{name}: Realm {min(realm) * 1000:.0f} ms"
        if llama:
            line += f", llama.cpp {min(llama) * 1000:.0f} ms, ratio {min(realm) / min(llama):.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
