"""Structured output's costs, side by side in one run.

    .venv/bin/python benchmarks/structured_output.py [--rounds 2] [--skip-server]

1. Mask cost per sequence-step on both models (smollm2-135m: 49k tokens, gemma3-270m:
   262k), for 1 and for 8 sequences at once (8 threads, as 8 guests would be): the
   grammar's mask for the state, applied to a row of logits, the chosen token taken and
   the tokens the grammar then forces taken too (fast-forward: they run in the same step),
   which is all the host adds to a constrained step (engine/grammar.py). The schemas are
   tests/schema_suite.py's; a sequence whose grammar is complete starts again. Two kinds
   of tokens: the model's own greedy output under each schema, and the best of random
   logits (the worst case: strings of random tokens filled to their maxLength). Then the
   same for a greedy guest's step through `realm_forward_top`, which checks the grammar
   lazily (engine/best_tokens.py), over the model's own output with its real logits, and
   how often it still computed the whole mask.
2. Compiling each schema of the suite (a cache miss), and a cache hit.
3. Through a real `realm serve` of smollm2-135m: time to first token with no schema, with a
   schema never seen (compiled for this request) and with the same schema again (cached):
   the difference of the last two is the first-token latency a compile adds (with a
   schema, the first text is the forced `{"name": "`, sent before the prompt's step).
   Then 8 clients at once, unconstrained against
   response_format json_schema, in alternating rounds, each request 64 tokens (the schema
   asks for more, so none ends early): aggregate completion tokens/s and the ratio. Then
   schema validity: every schema of the suite, greedy and 3 seeds at temperature 0.8,
   checked with `jsonschema`.
4. Through a real `realm serve` of both models: one client streams smollm2 while gemma3's
   first constrained request builds llguidance's view of its vocabulary; the stream's
   longest gap between tokens meanwhile, against its median before (a build that held the
   GIL showed there as a gap as long as the build).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import numpy as np
from anchor import REPO, cpu_model, start_realm_server, stop, wait_healthy

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from schema_suite import SCHEMAS  # noqa: E402

from realm.backends.devices import cpu_backend  # noqa: E402
from realm.engine.best_tokens import best_allowed, exact_logits  # noqa: E402
from realm.engine.grammar import DONE, GrammarCache, lltokenizer  # noqa: E402
from realm.engine.model import Model, load  # noqa: E402
from realm.engine.sampling import SamplingParams  # noqa: E402
from realm.models.catalogue import pull  # noqa: E402
from realm.models.gguf_file import GGUFFile  # noqa: E402
from realm.models.tokenizer import Tokenizer  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
STEPS = 200  # sequence-steps per thread


def own_outputs(model: Model) -> list[tuple[dict, list[int], list[int]]]:
    """Each schema of the suite with the prompt and the tokens the model itself writes under
    it (greedy, its question, fast-forwarded as the default guest does): the steps of a real
    request."""
    out = []
    for question, schema in SCHEMAS.values():
        constraint = {"type": "json_schema", "schema": schema}
        chat = model.chat_template is not None  # gemma3-270m is a base model
        g = model.generate(question, 120, SamplingParams.greedy(), chat=chat, constraint=constraint)
        list(g)
        out.append((constraint, g.prompt, g.tokens))
    return out


def lazy_cost(model: Model, written: list[tuple[dict, list[int], list[int]]]) -> tuple[float, float, int]:
    """What a greedy guest's constrained step costs the host through `realm_forward_top`, the
    grammar checked lazily (engine/best_tokens.py): the row's best tokens asked of the
    grammar in order, its mask only when none of them is allowed, exact logits for the one
    taken, then the token and the forced tokens taken. Over the model's own outputs, with the
    model's real rows of logits, made first and replayed (so that, as in `mask_cost`, no model
    step's threads share the cores with the clock). (CPU ms per sequence-step, the share of
    steps that computed the mask, steps)."""
    vocab = model.config.vocab_size
    replays = []
    for constraint, prompt, tokens in written:
        grammar = GrammarCache().compile("bench", model.tokenizer, vocab, constraint)
        session, rows, taken = model.new_session(), [], []
        fed = [*prompt, *grammar.forced()]
        grammar.consume(fed[len(prompt) :])
        at = len(fed) - len(prompt)
        while at < len(tokens):
            row = session.feed(fed)[-1].numpy().copy()
            rows.append(
                (
                    row,
                    SimpleNamespace(transformer=model.transformer, normed=session.normed, exact_ids=session.exact_ids),
                )
            )
            token = tokens[at]
            taken.append(token)
            if token in model.tokenizer.eot_ids or grammar.consume([token]) & DONE:
                break
            forced = grammar.forced()
            grammar.consume(forced)
            fed, at = [token, *forced], at + 1 + len(forced)
        replays.append((constraint, rows, taken))
    cpu, steps, masks = 0.0, 0, 0
    for constraint, rows, taken in replays:
        grammar = GrammarCache().compile("bench", model.tokenizer, vocab, constraint)

        def counted(whole_mask: Callable[[], np.ndarray] = grammar.mask) -> np.ndarray:
            nonlocal masks
            masks += 1
            return whole_mask()

        grammar.mask = counted  # type: ignore[method-assign]
        grammar.consume(grammar.forced())
        for (row, step), token in zip(rows, taken, strict=True):
            started = time.thread_time()
            ids, _ = best_allowed(row, 1, grammar, exact_logits(step, row))
            if int(ids[0]) != token:
                raise SystemExit(f"the lazy check took token {int(ids[0])} where the model wrote {token}")
            if token not in model.tokenizer.eot_ids and not grammar.consume([token]) & DONE:
                grammar.consume(grammar.forced())
            cpu += time.thread_time() - started
            steps += 1
    return cpu / steps * 1000, masks / steps, steps


def mask_cost(
    tokenizer: Tokenizer, sequences: int, written: list[tuple[dict, list[int]]] | None
) -> tuple[float, float]:
    """(CPU ms, wall ms) per sequence-step, means, with `sequences` threads each stepping
    its own grammar through what the host adds to a constrained step: the mask, applied to
    a row of logits, the token taken, then the tokens the grammar forces taken too (they
    run in the same step). The tokens are the model's own (`written`) or, with None, the
    best of random logits under the mask: strings of random tokens of the whole vocabulary,
    filled to their maxLength, where a mask costs the most. CPU time is the thread's own
    (time.thread_time); wall time adds the waits for a core, which 8 threads on few cores
    have."""
    cache, vocab = GrammarCache(), tokenizer.vocab_size
    work = written or [({"type": "json_schema", "schema": s}, None) for _, s in SCHEMAS.values()]
    for c, _ in work:
        cache.compile("bench", tokenizer, vocab, c)  # compiled once, before the clock
    times: list[tuple[float, float]] = []
    lock = threading.Lock()

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        rows = rng.standard_normal((4, vocab)).astype(np.float32)
        mine: list[tuple[float, float]] = []
        for i in range(seed, seed + 10_000):
            constraint, tokens = work[i % len(work)]
            grammar = cache.compile("bench", tokenizer, vocab, constraint)
            done = grammar.consume(forced := grammar.forced()) & DONE
            at = len(forced)  # tokens of `tokens` taken so far
            while not done and (tokens is None or at < len(tokens)) and len(mine) < STEPS:
                logits = rows[len(mine) % 4].copy()
                cpu, wall = time.thread_time(), time.perf_counter()
                grammar.apply(logits)
                token = int(np.argmax(logits)) if tokens is None else tokens[at]
                done = token in tokenizer.eot_ids or grammar.consume([token]) & DONE
                if not done:
                    done = grammar.consume(forced := grammar.forced()) & DONE
                    at += 1 + len(forced)
                mine.append((time.thread_time() - cpu, time.perf_counter() - wall))
            if len(mine) >= STEPS:
                break
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(sequences)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statistics.fmean(c for c, _ in times) * 1000, statistics.fmean(w for _, w in times) * 1000


def compile_times(tokenizer: Tokenizer) -> tuple[dict[str, float], float]:
    """ms to compile each schema of the suite, and to take one from the cache."""
    cache, vocab, out = GrammarCache(), tokenizer.vocab_size, {}
    for name, (_, schema) in SCHEMAS.items():
        started = time.perf_counter()
        cache.compile("bench", tokenizer, vocab, {"type": "json_schema", "schema": schema})
        out[name] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    cache.compile("bench", tokenizer, vocab, {"type": "json_schema", "schema": SCHEMAS["nested"][1]})
    return out, (time.perf_counter() - started) * 1000


# ---------------------------------------------------------------------------- through the server


def body(question: str, max_tokens: int, schema: dict | None, **kw: object) -> dict:
    b = {
        "model": MODELS[0],
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    } | kw
    if schema is not None:
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    return b


async def first_token(http: httpx.AsyncClient, schema: dict | None) -> float:
    started = time.perf_counter()
    async with http.stream(
        "POST", "/v1/chat/completions", json=body("Give a person as JSON.", 4, schema, stream=True)
    ) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                return time.perf_counter() - started
    raise SystemExit("a stream ended without text")


async def ttft(http: httpx.AsyncClient, repeats: int = 5) -> dict[str, float]:
    base = SCHEMAS["nested"][1]
    out: dict[str, list[float]] = {"no schema": [], "schema, compiled now": [], "schema, cached": []}
    for i in range(repeats):
        fresh = json.loads(json.dumps(base))
        fresh["properties"][f"note_{i}_{time.time_ns()}"] = {"type": "string", "maxLength": 5}  # never seen
        out["no schema"].append(await first_token(http, None))
        out["schema, compiled now"].append(await first_token(http, fresh))
        out["schema, cached"].append(await first_token(http, fresh))
    return {k: statistics.median(v) * 1000 for k, v in out.items()}


LONG_LIST = {
    "type": "object",
    "properties": {
        "animals": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "note": {"type": "string", "maxLength": 40},
                },
                "required": ["name", "note"],
                "additionalProperties": False,
            },
            "minItems": 10,
        }
    },
    "required": ["animals"],
    "additionalProperties": False,
}
"""Longer than the 64 tokens asked for: every constrained request runs its full 64 steps."""


async def throughput(http: httpx.AsyncClient, constrained: bool, clients: int = 8) -> tuple[float, float]:
    """(aggregate completion tokens/s, mean tokens per request) of `clients` requests at
    once, each asking for 64 tokens: a list of animals as JSON under LONG_LIST, or a story."""

    async def one(i: int) -> int:
        question = (
            "List ten animals with a note on each, as JSON." if constrained else "Tell a long story about a dragon."
        )
        r = await http.post("/v1/chat/completions", json=body(question, 64, LONG_LIST if constrained else None, seed=i))
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(clients)))
    return sum(tokens) / (time.perf_counter() - started), statistics.fmean(tokens)


async def validity(http: httpx.AsyncClient) -> dict[str, int]:
    counts = {"valid": 0, "invalid": 0, "cut by max_tokens": 0}

    async def one(question: str, schema: dict, seed: int | None) -> None:
        kw = {} if seed is None else {"temperature": 0.8, "seed": seed}
        r = await http.post("/v1/chat/completions", json=body(question, 120, schema, **kw))
        r.raise_for_status()
        choice = r.json()["choices"][0]
        if choice["finish_reason"] != "stop":
            counts["cut by max_tokens"] += 1
            return
        try:
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
            counts["valid"] += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            counts["invalid"] += 1

    await asyncio.gather(*(one(q, s, seed) for q, s in SCHEMAS.values() for seed in (None, 1, 2, 3)))
    return counts


async def while_a_view_builds(http: httpx.AsyncClient) -> tuple[float, float, float, float]:
    """One client streams smollm2 while gemma3's first constrained request builds llguidance's
    view of its 262k-token vocabulary: (the stream's median gap between tokens before, its
    median and longest gaps while the build runs, the constrained request's time), in
    seconds."""
    arrivals: list[float] = []

    async def stream() -> None:
        story = body("Tell a long story about a dragon.", 400, None, stream=True)
        async with http.stream("POST", "/v1/chat/completions", json=story) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line:
                    arrivals.append(time.perf_counter())

    streaming = asyncio.create_task(stream())
    await asyncio.sleep(1.5)
    started = time.perf_counter()
    constrained = {"model": MODELS[1], "prompt": "A person as JSON:", "max_tokens": 4, "temperature": 0}
    r = await http.post("/v1/completions", json=constrained | {"response_format": {"type": "json_object"}})
    r.raise_for_status()
    took = time.perf_counter() - started
    await streaming
    gaps = [(t, t - prev) for prev, t in zip(arrivals, arrivals[1:])]
    before = [g for t, g in gaps if t < started]
    during = [g for t, g in gaps if started < t <= started + took + 0.5]
    return statistics.median(before), statistics.median(during), max(during), took


async def server_figures(rounds: int) -> None:
    # measure the compiled step: a server without it decodes eagerly while it builds
    subprocess.run([sys.executable, "-m", "realm.cli", "compile", MODELS[0]], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        server, base, keys = start_realm_server(f'["{MODELS[0]}"]', {"bench": {"max_concurrent": 32}}, Path(tmp))
        try:
            wait_healthy([base], [server], timeout=600)
            auth = {"Authorization": f"Bearer {keys['bench']}"}
            async with httpx.AsyncClient(base_url=base, timeout=600, headers=auth) as http:
                await throughput(http, True, 2)  # warm up
                print("\ntime to first token, median of 5 (smollm2-135m, streamed chat):")
                for k, v in (await ttft(http)).items():
                    print(f"  {k:22s} {v:8.1f} ms")
                plain, structured = [], []
                for _ in range(rounds):
                    plain.append(await throughput(http, False))
                    structured.append(await throughput(http, True))
                p, s = statistics.median(r for r, _ in plain), statistics.median(r for r, _ in structured)
                print(f"\n8 clients at once, median of {rounds} alternating rounds (completion tokens/s):")
                print(
                    f"  unconstrained {p:7.1f} ({statistics.fmean(n for _, n in plain):.0f} tokens a request)   "
                    f"json_schema {s:7.1f} ({statistics.fmean(n for _, n in structured):.0f})   ratio {s / p:.2f}"
                )
                counts = await validity(http)
                total = sum(counts.values())
                print(f"\nschema validity over the suite ({len(SCHEMAS)} schemas x greedy + 3 seeds = {total}):")
                print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        finally:
            stop([server])
        # a server of both models (loaded at start), where gemma3's view is not built yet
        (Path(tmp) / "both").mkdir()
        server, base, keys = start_realm_server(
            json.dumps(list(MODELS)), {"bench": {"max_concurrent": 32}}, Path(tmp) / "both"
        )
        try:
            wait_healthy([base], [server], timeout=600)
            auth = {"Authorization": f"Bearer {keys['bench']}"}
            async with httpx.AsyncClient(base_url=base, timeout=600, headers=auth) as http:
                typical, median, longest, took = await while_a_view_builds(http)
            print(
                f"\na stream of {MODELS[0]} while {MODELS[1]}'s first constrained request ({took:.2f} s) "
                f"builds llguidance's view:\n  gap between tokens: median before {typical * 1000:.1f} ms; "
                f"during, median {median * 1000:.1f} ms and longest {longest * 1000:.1f} ms"
            )
        finally:
            stop([server])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-server", action="store_true", help="only the in-process figures")
    parser.add_argument("--skip-masks", action="store_true", help="only the figures through the server")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    for name in () if args.skip_masks else MODELS:
        tokenizer = Tokenizer.from_gguf_fields(GGUFFile(pull(name, progress=False)).metadata)
        started = time.perf_counter()
        lltokenizer(tokenizer, tokenizer.vocab_size)
        built = time.perf_counter() - started
        per_schema, hit = compile_times(tokenizer)
        print(f"\n{name} ({tokenizer.vocab_size} tokens; llguidance's tokenizer built once per model: {built:.2f} s)")
        print(
            "  compile per schema (ms): "
            + ", ".join(f"{k} {v:.1f}" for k, v in per_schema.items())
            + f"; cached {hit:.2f}"
        )
        model = load(name, cpu_backend(), progress=False)
        written = own_outputs(model)
        for what, tokens in (("the model's own output", [(c, t) for c, _, t in written]), ("random tokens", None)):
            for n in (1, 8):
                cpu, wall = mask_cost(tokenizer, n, tokens)
                print(f"  {what}, {n} at once: {cpu:.3f} ms CPU per sequence-step ({wall:.3f} ms wall)")
        cpu, masked, steps = lazy_cost(model, written)
        print(
            f"  realm_forward_top, greedy, the model's own output: {cpu:.3f} ms CPU per sequence-step "
            f"(the whole mask at {masked:.0%} of {steps} steps)"
        )
    if not args.skip_server:
        asyncio.run(server_figures(args.rounds))


if __name__ == "__main__":
    main()
