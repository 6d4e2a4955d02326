"""The GGUF fuzz of tests/test_gguf_fuzz.py at scale: mutated real headers by the hundred thousand.

    PYTHONPATH=. .venv/bin/python benchmarks/gguf_fuzz.py --cases 100000 --minutes 60

Cases are drawn by hypothesis in rounds of --round, alternating between the two real
models (--models to choose), until --cases have run or --minutes have passed (checked
between rounds). It prints
the outcome counts (the stage that refused a case, or "loaded"), cases per second, the
slowest case, and every case that ended in anything but a ModelFormatError: its exception,
where it was raised and the mutated file kept for replay under --keep. Two things a case
did not change are not rebuilt: a string array whose bytes are a real file's (the
vocabulary, the merges) is parsed once, and tokenizer fields that are a real file's reuse
its tokenizer. Parsing them took 60% of a case's time.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm.backends.devices import BackendRegistry  # noqa: E402
from realm.engine.model import load_model  # noqa: E402
from realm.models.catalogue import pull  # noqa: E402
from realm.models.gguf_file import GGUFFile, _Reader  # noqa: E402
from realm.models.tokenizer import Tokenizer  # noqa: E402
from tests.test_gguf_fuzz import baseline, cases, open_and_build, real_header  # noqa: E402

MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--round", type=int, default=100, help="cases per hypothesis run")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--keep", type=Path, default=Path("fuzz-failures"), help="where failing files are kept")
    args = parser.parse_args()

    backend = BackendRegistry("cpu").active
    headers = {name: real_header(pull(MODELS[name], progress=False)) for name in args.models}
    reuse_real_string_arrays([h.path for h in headers.values()])
    reuse_real_tokenizers([h.path for h in headers.values()])
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[dict[str, str]] = []
    slowest = (0.0, "")
    deadline = time.monotonic() + 60 * args.minutes
    workdir = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))
    started = time.perf_counter()

    def run_round(model: str, n: int) -> None:
        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def one(data: st.DataObject) -> None:
            nonlocal slowest
            case = data.draw(cases(headers[model]))
            path = workdir / "case.gguf"
            t0 = time.perf_counter()
            try:
                outcome = open_and_build(
                    case, path, lambda p: load_model(p, backend, sha256="0" * 64, compile_mode="off")
                )
            except Exception as exc:  # the fuzz's finding: anything but a ModelFormatError
                where = traceback.extract_tb(exc.__traceback__)[-1]
                outcome = f"FAILED {type(exc).__name__}"
                args.keep.mkdir(exist_ok=True)
                kept = args.keep / f"{model}-{len(failures)}.gguf"
                if path.exists():  # not when writing the case was what failed
                    path.replace(kept)
                failures.append({"error": repr(exc)[:300], "at": f"{where.filename}:{where.lineno}", "file": str(kept)})
            seconds = time.perf_counter() - t0
            slowest = max(slowest, (seconds, f"{model}: {outcome}"))
            outcomes[f"{model}: {outcome}"] += 1

        one()

    for i in itertools.count():  # the limits are checked between rounds, so a round may overrun them
        left = args.cases - sum(outcomes.values())
        if left <= 0 or time.monotonic() > deadline:
            break
        run_round(args.models[i % len(args.models)], min(args.round, left))
        print(f"{sum(outcomes.values())} cases, {len(failures)} failures", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    total = sum(outcomes.values())
    print(
        json.dumps(
            {
                "cpu": _cpu_model(),
                "cases": total,
                "seconds": round(elapsed, 1),
                "cases_per_second": round(total / elapsed, 2),
                "slowest_case": {"seconds": round(slowest[0], 2), "outcome": slowest[1]},
                "outcomes": dict(sorted(outcomes.items())),
                "failures": failures,
            },
            indent=2,
        )
    )


def reuse_real_string_arrays(paths: list[Path]) -> None:
    """A string array whose bytes are those of one of the real files' arrays of as many
    items is that array: it is parsed once here, and a case's copy is only compared with it
    (3 ms for gemma3's vocabulary, where parsing takes 150 ms). Any other array is parsed."""
    parse = _Reader._strings
    known: dict[int, list[tuple[bytes, list[str]]]] = collections.defaultdict(list)

    def record(reader: _Reader, count: int) -> list[str]:
        start = reader.pos
        strings = parse(reader, count)
        known[count].append((bytes(reader.data[start : reader.pos]), strings))
        return strings

    def reuse(reader: _Reader, count: int) -> list[str]:
        for raw, strings in known.get(count, ()):
            if bytes(reader.data[reader.pos : reader.pos + len(raw)]) == raw:
                reader.pos += len(raw)
                return list(strings)
        return parse(reader, count)

    _Reader._strings = record  # type: ignore[method-assign]
    for path in paths:
        GGUFFile(path)
    _Reader._strings = reuse  # type: ignore[method-assign]


def reuse_real_tokenizers(paths: list[Path]) -> None:
    """Loading a case whose tokenizer fields are a real file's builds the real file's
    tokenizer: it is built once here and given back (gemma3's takes 2.4 s, and a case whose
    tensors or config changed loads the whole model). Any other fields are built afresh."""
    build = Tokenizer.from_gguf_fields
    known = [(fields, build(fields)) for fields in (baseline(path).tokenizer_fields for path in paths)]

    def from_gguf_fields(fields: dict) -> Tokenizer:
        mine = {k: v for k, v in fields.items() if k.startswith("tokenizer.")}
        return next((tokenizer for real, tokenizer in known if mine == real), None) or build(fields)

    Tokenizer.from_gguf_fields = staticmethod(from_gguf_fields)  # type: ignore[method-assign,assignment]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
