"""The default guest and the ABI end to end: real Wasmtime, real models, real guests built
with zig. Greedy output through the default guest must be the host's own, token for token
and byte for byte."""

from __future__ import annotations

import json
import os
import struct
import weakref
from pathlib import Path

import pytest
import wasmtime
from sandbox_helpers import GUESTS, greedy_request, host_direct, make_runtime

from realm.engine import grammar
from realm.engine.model_store import ModelStore
from realm.engine.sampling import SamplingParams
from realm.errors import ContextOverflow, HashMismatch, InvalidArgument, NotFound, UnknownModel
from realm.sandbox import abi, toolchain
from realm.sandbox.guest_module import check_module
from realm.sandbox.host_models import TOKEN_END
from realm.sandbox.memory import HELD_COPY
from realm.sandbox.runtime import ModuleCache, Runtime
from realm.sandbox.wasmtime_bridge import VERSION as WASMTIME_VERSION

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


@pytest.fixture(scope="module")
def runtime(smollm2, gemma3, smollm2_path, gemma3_path, tmp_path_factory) -> Runtime:
    return make_runtime(
        {SMOL: (smollm2_path, smollm2), GEMMA: (gemma3_path, gemma3)}, tmp_path_factory.mktemp("realm_home")
    )


@pytest.fixture(scope="module")
def default_guest(runtime):
    return runtime.default_module()


@pytest.fixture(scope="module")
def instance(runtime, default_guest):
    with runtime.instance(default_guest, tenant="t1") as inst:
        yield inst


CASES = [
    (SMOL, "The capital of France is", False),
    (SMOL, "def fibonacci(n):", False),
    (SMOL, "Write a haiku about the sea.", True),
    (GEMMA, "Once upon a time", False),
    (GEMMA, "The three primary colors are", False),
]


@pytest.mark.parametrize("name,prompt,chat", CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_default_guest_greedy_equals_host_direct(runtime, instance, smollm2, gemma3, name, prompt, chat):
    model = smollm2 if name == SMOL else gemma3
    expected, pieces = host_direct(model, prompt, 16, chat=chat)
    messages = [{"role": "user", "content": prompt}] if chat else None
    request = greedy_request(runtime, name, None if chat else prompt, 16, messages=messages)
    streamed = []
    result = instance.generate(request, on_token=lambda t, text: streamed.append((t, text)))
    assert result.tokens == expected.tokens
    assert result.text == expected.text
    assert [(p.token, p.text) for p in pieces] == streamed  # the same stream, piece by piece
    assert result.finish_reason == expected.finish_reason
    assert result.prompt_tokens == len(expected.prompt)
    assert result.completion_tokens == len(expected.tokens)


def test_stop_strings_match_host_direct(runtime, instance, smollm2):
    for stop in (["\n"], [" answer"], ["Paris"], [".\n\nThe q", "xyz"]):
        expected, pieces = host_direct(smollm2, "The capital of France is", 8, stop=stop)
        streamed = []
        result = instance.generate(
            greedy_request(runtime, SMOL, "The capital of France is", 8, stop=stop),
            on_token=lambda t, text, streamed=streamed: streamed.append((t, text)),
        )
        assert (result.text, result.tokens, result.finish_reason) == (
            expected.text,
            expected.tokens,
            expected.finish_reason,
        ), stop
        assert streamed == [(p.token, p.text) for p in pieces], stop  # held back alike


def test_max_tokens_zero_and_the_context_limit(runtime, instance):
    result = instance.generate(greedy_request(runtime, SMOL, "Hello", 0))
    assert (result.tokens, result.text, result.finish_reason) == ([], "", "length")
    with pytest.raises(ContextOverflow, match="context holds 8192"):
        instance.generate(greedy_request(runtime, SMOL, "hello " * 9000, 4))
    assert instance.generate(greedy_request(runtime, SMOL, "Hello", 2)).completion_tokens == 2


def test_the_guest_uses_the_prompt_tokens_the_host_made(runtime, instance, smollm2):
    # prompt_tokens that are not the prompt's: the continuation is of the tokens, so the
    # guest did not render and tokenize the text again
    tokens = smollm2.encode_prompt("The capital of France is")
    expected, _ = host_direct(smollm2, "The capital of France is", 12)
    assert expected.prompt == tokens
    unrelated, _ = host_direct(smollm2, "def fibonacci(n):", 12)
    assert unrelated.tokens != expected.tokens  # the test can tell the two apart
    result = instance.generate(greedy_request(runtime, SMOL, "def fibonacci(n):", 12, prompt_tokens=tokens))
    assert (result.tokens, result.text) == (expected.tokens, expected.text)
    assert result.prompt_tokens == len(tokens)


def test_the_guest_checks_the_prompt_tokens(runtime, instance, smollm2):
    vocab = smollm2.config.vocab_size

    def run(tokens):
        return instance.generate({**greedy_request(runtime, SMOL, "Hi", 2), "prompt_tokens": tokens})

    with pytest.raises(InvalidArgument, match=f"prompt token {vocab} is outside the vocabulary of {vocab}"):
        run([1, vocab])
    for bad in ([1, -3], [1, 2.5], ["1"], "1, 2", [1, [2]]):
        with pytest.raises(InvalidArgument, match="list of token ids"):
            run(bad)
    with pytest.raises(InvalidArgument, match="the prompt is empty"):
        run([])
    with pytest.raises(ContextOverflow, match="context holds 8192"):
        run([1] * 8192)
    assert run(smollm2.encode_prompt("Hi")).completion_tokens == 2


def test_seeded_sampling_is_reproducible_in_the_guest(runtime, instance):
    def run(seed, **params):
        p = SamplingParams(temperature=0.9, seed=seed, **params)
        return instance.generate(greedy_request(runtime, SMOL, "My favourite food is", 6, params=p)).tokens

    assert run(7) == run(7)
    assert len(run(8)) == 6
    # the full-vocabulary path (no top-k), with penalties
    wide = dict(top_k=0, top_p=0.9, min_p=0.0, repeat_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5)
    assert run(3, **wide) == run(3, **wide)


def test_the_default_guest_holds_the_tokens_it_meets_not_the_vocabulary(runtime, default_guest, gemma3):
    """gemma3's whole token table is 3.3 MB and a sampler over every token 5.2 MB more; with
    top-k (40 by default) the guest needs neither: measured 10.3 MiB of linear memory before,
    2.2 after. What it says is the host's, token for token."""
    expected, _ = host_direct(gemma3, "Once upon a time", 24)
    params = SamplingParams(temperature=0.8, seed=5)
    with runtime.instance(default_guest, tenant="memory") as inst:
        greedy = inst.generate(greedy_request(runtime, GEMMA, "Once upon a time", 24))
        sampled = inst.generate(greedy_request(runtime, GEMMA, "Once upon a time", 24, params=params))
        used = inst._memory_bytes()
    assert greedy.tokens == expected.tokens and greedy.text == expected.text
    assert sampled.text == gemma3.tokenizer.decode(sampled.tokens, skip_special=True)
    assert used < 3 * 2**20, f"{used / 2**20:.1f} MiB"


def test_a_sessions_last_logits_are_let_go_before_its_next_step(runtime, default_guest, monkeypatch):
    """A step's row is a view of its whole round's logits (gemma3, 8 sequences: 8 MiB), kept
    for realm_logprobs. Held into the session's next step, every round's buffer outlived the
    next round's allocation: a server with 8 tenants streaming held 1.18 x one tenant's memory."""

    class Recording:
        def __init__(self, inner):
            self.inner, self.rows, self.held = inner, {}, []

        def step(self, session, tokens, tenant="", allowed=None):
            previous = self.rows.get(id(session))
            self.held.append(previous is not None and previous() is not None)
            row = self.inner.step(session, tokens, tenant, allowed)
            self.rows[id(session)] = weakref.ref(row)
            return row

    recording = Recording(runtime.steps)
    monkeypatch.setattr(runtime, "steps", recording)
    with runtime.instance(default_guest, tenant="rows") as inst:
        result = inst.generate(greedy_request(runtime, SMOL, "Once upon a time", 8))
    assert result.tokens and len(recording.held) > 1
    assert not any(recording.held)


def test_the_first_constrained_request_is_not_charged_for_the_shared_grammar_tokenizer(runtime, default_guest, gemma3):
    """llguidance's view of gemma3's vocabulary takes 1.5 s or more to build, once for every tenant:
    the guest that happens to ask first must not be demoted for it (it was)."""
    grammar._tokenizers.pop(gemma3.tokenizer, None)  # built afresh for this request
    constraint = {"type": "json_object"}
    with runtime.instance(default_guest, tenant="first-grammar") as inst:
        result = inst.generate(greedy_request(runtime, GEMMA, "A person as JSON:", 8, constraint=constraint))
        assert inst.state.cpu.demotions == 0
    assert result.text.startswith("{")


def test_the_guest_checks_model_identity(runtime, instance):
    request = greedy_request(runtime, SMOL, "Hi", 2)
    with pytest.raises(HashMismatch, match="SHA-256"):
        instance.generate({**request, "model_sha256": "ab" * 32})
    with pytest.raises(UnknownModel, match="no model named"):
        instance.generate({**request, "model": "no-such-model"})
    with pytest.raises(InvalidArgument, match="names no model"):
        instance.generate({k: v for k, v in request.items() if k != "model"})
    with pytest.raises(InvalidArgument, match="not a well-formed JSON object"):
        instance.generate(b"[1, 2")
    assert instance.generate(request).completion_tokens == 2


def test_sessions_are_closed_when_the_request_ends_and_belong_to_their_guest(runtime, default_guest, instance):
    instance.generate(greedy_request(runtime, SMOL, "Hi", 2))
    assert instance.state.sessions == {}
    # a handle opened by one guest is NOT_FOUND to another
    with runtime.instance(default_guest, tenant="other") as other:
        entry = runtime.models.by_name(SMOL)
        instance.state.hold(entry)
        handle = instance.state.open_session(entry, 16).handle
        close = abi.BY_NAME["realm_session_close"]
        assert abi.invoke(close, other.state, other._store, [handle]) == NotFound.abi_code
        assert handle in instance.state.sessions
        assert abi.invoke(close, instance.state, instance._store, [handle]) == 0
        assert instance.state.sessions == {}


def test_every_shipped_guest_imports_only_the_documented_abi():
    built = toolchain.build_all()
    assert any(p.name == "default.wasm" for p in built)
    engine = wasmtime.Engine(_memory64_config())
    for path in sorted(toolchain.BUILD_DIR.glob("*.wasm")):
        module = wasmtime.Module.from_file(engine, str(path))
        for imp in module.imports:
            assert imp.module == "env" and imp.name in abi.BY_NAME, f"{path.name} imports {imp.module}.{imp.name}"
        check_module(module, path.name, "")  # types too


def test_the_abi_document_covers_every_host_function():
    text = (Path(toolchain.REPO) / "docs" / "ABI.md").read_text()
    header = (toolchain.INCLUDE_DIR / "realm.h").read_text()
    for fn in abi.TABLE:
        assert f"**`int32_t {fn.name}(" in text or f"**`int32_t {fn.name}(...)`**" in text, fn.name
        assert f"REALM_IMPORT({fn.name})" in header, fn.name


def test_a_wasm64_build_of_the_default_guest_gives_the_same_tokens(runtime, smollm2, tmp_path):
    wasm = toolchain.build(toolchain.DEFAULT_SOURCE, tmp_path / "default64.wasm", target="wasm64")
    module = runtime.load_module(wasm)
    assert module.memory64
    expected, _ = host_direct(smollm2, "The capital of France is", 6)
    with runtime.instance(module, tenant="t64") as inst:
        result = inst.generate(greedy_request(runtime, SMOL, "The capital of France is", 6))
    assert result.tokens == expected.tokens and result.text == expected.text


def test_wasm64_pointers_are_i64_and_checked(runtime):
    module = runtime.load_module(GUESTS / "echo64.wat")
    assert module.memory64
    with runtime.instance(module) as inst:
        result = inst.generate({"hello": "wasm64"})
    assert json.loads(result.text) == {"hello": "wasm64"}
    assert result.tokens == [1, 2]  # 2: REALM_E_OUT_OF_BOUNDS for a pointer above 4 GiB


def test_compiled_modules_are_cached_on_disk(runtime, tmp_path):
    cache = ModuleCache(tmp_path)
    wasm = toolchain.default_guest().read_bytes()
    first = cache.load(wasm, "default")
    path = cache.path_for(first.sha256)
    assert path.name == f"{first.sha256}-wasmtime{WASMTIME_VERSION}.cwasm" and path.is_file()
    again = ModuleCache(tmp_path).load(wasm, "default")  # a fresh process would do this
    assert again.sha256 == first.sha256 and again.imports == first.imports


def test_two_tenants_storing_the_same_model_share_one_copy(cpu_backend, smollm2_path, smollm2, tmp_path):
    """Each tenant hands the GGUF bytes from its own memory; the second store adds no
    weights: same id, one load, the same tensors, bytes held unchanged, RSS flat."""
    from realm.backends.devices import BackendRegistry
    from realm.engine.model import load_model

    loads = []

    def loader(*args, **kwargs):
        loads.append(args[0])
        return load_model(*args, **kwargs)

    registry = BackendRegistry("cpu")
    store = ModelStore(registry.active, home=tmp_path, loader=loader)
    runtime = Runtime(store, registry, modules=ModuleCache(tmp_path / "modules"))
    module = runtime.load_module(GUESTS / "store_gguf.wat")
    data = Path(smollm2_path).read_bytes()
    ids, held = [], []
    tenants = [runtime.instance(module, tenant=t) for t in ("a", "b")]
    try:
        for inst in tenants:
            _put_in_guest_memory(inst, data)
            rss_before = _rss_bytes()
            result = inst.generate(b"{}")
            rss_after = _rss_bytes()
            ids.append(result.tokens[0])
            held.append(store.bytes_held)
            info = inst.state.memory.read(inst._store, 64, 128)
            model_id, arch, digest = struct.unpack_from("<II32s", info)
            assert (model_id, arch, digest.hex()) == (ids[-1], 1, smollm2.sha256)
        assert ids[0] == ids[1] == 1 and len(loads) == 1
        assert held[0] == held[1] > 50_000_000
        assert rss_after - rss_before < 16 << 20  # the second store copied no weights
        entry = store.get(1)
        assert entry.refs == 2 and entry.name == SMOL  # the catalogue knows this content
        assert entry.model.path == tmp_path / "blobs" / f"{smollm2.sha256}.gguf"
        info = json.loads(_model_info_json(tenants[0], 1))
        assert info["id"] == 1 and info["sha256"] == smollm2.sha256 and info["refs"] == 2
        assert info["bytes_held"] == held[0] and info["config"]["n_heads"] == 9
        weights = entry.model.transformer.weights
        assert all(t.state.models[1].model.transformer.weights is weights for t in tenants)
    finally:
        for inst in tenants:
            inst.close()
    assert store.models() == []  # both references given back: the model is unloaded
    with pytest.raises(NotFound):
        store.get(1)


def _model_info_json(inst, model_id: int) -> bytes:
    """realm_get_model_info as the guest sees it (called for it, with its memory)."""
    fn = abi.BY_NAME["realm_get_model_info"]
    size = abi.invoke(fn, inst.state, inst._store, [model_id, 0, 0])
    assert abi.invoke(fn, inst.state, inst._store, [model_id, 1 << 20, size]) == size
    return inst.state.memory.read(inst._store, 1 << 20, (1 << 20) + size)


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_realm_vocab_gives_every_tokens_bytes_and_end_flag(runtime, default_guest, name):
    """The table says for every token what realm_token_bytes and realm_token_is_end say;
    a capacity one byte short writes nothing. (gemma3's table is past the size that is
    copied holding the GIL, smollm2's is not: both copy paths.)"""
    with runtime.instance(default_guest, tenant="vocab") as inst:
        entry = runtime.models.by_name(name)
        inst.state.hold(entry)
        fn, at = abi.BY_NAME["realm_vocab"], 1 << 20
        size = abi.invoke(fn, inst.state, inst._store, [entry.id, 0, 0])
        _put_in_guest_memory(inst, bytes(size))
        assert abi.invoke(fn, inst.state, inst._store, [entry.id, at, size - 1]) == size
        assert inst.state.memory.read(inst._store, at, at + size) == bytes(size)
        assert abi.invoke(fn, inst.state, inst._store, [entry.id, at, size]) == size
        table = inst.state.memory.read(inst._store, at, at + size)
        is_end = abi.BY_NAME["realm_token_is_end"]
        ends = {
            t
            for t in range(entry.model.tokenizer.vocab_size)
            if abi.invoke(is_end, inst.state, inst._store, [entry.id, t])
        }
    tok = entry.model.tokenizer
    n = struct.unpack_from("<I", table)[0]
    offsets = struct.unpack_from(f"<{n + 1}I", table, 4)
    flags = table[4 + 4 * (n + 1) : 4 + 4 * (n + 1) + n]
    text = table[4 + 4 * (n + 1) + n :]
    assert n == tok.vocab_size and offsets[-1] == len(text)
    assert [text[offsets[i] : offsets[i + 1]] for i in range(n)] == [tok.token_bytes(i) for i in range(n)]
    assert {i for i in range(n) if flags[i]} == ends and ends and set(flags) == {0, TOKEN_END}
    assert (SMOL == name) == (size <= HELD_COPY)


def _put_in_guest_memory(inst, data: bytes) -> None:
    """Grow the guest's memory and copy `data` at 1 MiB; its address and size go at 0 and 4."""
    memory, store = inst.state.memory, inst._store
    base = 1 << 20
    need = base + len(data) - memory.data_len(store)
    if need > 0:
        memory.grow(store, -(-need // 65536))
    memory.write(store, data, base)
    memory.write(store, struct.pack("<II", base, len(data)), 0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory64_config() -> wasmtime.Config:
    config = wasmtime.Config()
    config.wasm_memory64 = True
    return config


@pytest.mark.slow  # a CLI process; the guest path itself is tested in-process above
def test_realm_run_goes_through_the_default_guest(smollm2):
    """`realm run` (a subprocess, as a user runs it) streams the host-direct greedy text."""
    import subprocess
    import sys

    expected, _ = host_direct(smollm2, "The capital of France is", 6)
    done = subprocess.run(
        [sys.executable, "-m", "realm.cli", "run", "The capital of France is", "-n", "6", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
    done = subprocess.run(
        [sys.executable, "-m", "realm.cli", "run", "--guest", str(GUESTS / "unreachable.wat"), "hi"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "guest unreachable (tenant cli) trapped" in done.stderr


def test_the_default_guests_utf8_stream_decoder_matches_python(runtime, tmp_path):
    """Chunks of bytes (whole, split and invalid UTF-8) decode in the guest exactly as
    Python's incremental decoder with errors="replace" decodes them, chunk by chunk."""
    import codecs
    import random

    wasm = toolchain.build(GUESTS / "utf8_stream.c", tmp_path / "utf8_stream.wasm")
    rng = random.Random(5)
    atoms = [
        b"a", b" ", "é".encode(), "€".encode(), "𝄞".encode(), "日本".encode(), "\uffff".encode(),
        b"\xff", b"\xf8", b"\x80", b"\xbf", b"\xc3", b"\xc0\xaf", b"\xe0\x80", b"\xe2\x82",
        b"\xed", b"\xed\xa0", b"\xed\xa0\x80", b"\xf0\x9f", b"\xf0\x9f\x98", b"\xf4\x90\x80\x80",
    ]  # fmt: skip
    with runtime.instance(runtime.load_module(wasm)) as inst:
        for _ in range(150):
            data = b"".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 5))))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            expected = [(i, decoder.decode(c)) for i, c in enumerate(chunks)] + [(-1, decoder.decode(b"", final=True))]
            request = struct.pack(f"<I{len(chunks)}I", len(chunks), *map(len, chunks)) + b"".join(chunks)
            got = []
            inst.generate(request, on_token=lambda t, text, got=got: got.append((t, text)))
            assert got == expected, data


def test_the_wasmtime_pin_is_the_range_the_bridge_was_tested_with():
    import tomllib

    from realm.sandbox import wasmtime_bridge

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    pin = next(d for d in project["dependencies"] if d.startswith("wasmtime"))
    lo, hi = wasmtime_bridge.SUPPORTED_MAJOR.start, wasmtime_bridge.SUPPORTED_MAJOR.stop
    assert pin.replace(" ", "") == f"wasmtime>={lo},<{hi}"
    assert int(wasmtime_bridge.VERSION.split(".")[0]) in wasmtime_bridge.SUPPORTED_MAJOR
