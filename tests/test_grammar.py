"""Constrained decoding in the engine and the sandbox: llguidance's masks over the real
vocabularies of both models, the default guest under a constraint token for token equal to
the host's own generation, the per-step controls of ABI 1.2 and the bounded grammar cache."""

from __future__ import annotations

import ctypes
import json
import re
import threading
import time
from types import SimpleNamespace

import llguidance as llg
import numpy as np
import pytest
import torch
from sandbox_helpers import greedy_request, make_runtime
from schema_suite import SCHEMAS

from realm.backends import native
from realm.engine import llguidance_api
from realm.engine.grammar import (
    ACCEPTING,
    DONE,
    SLICES,
    GrammarCache,
    apply_mask,
    compile_grammar,
    grammar_text,
    vocabulary_bytes,
)
from realm.engine.sampling import SamplingParams
from realm.errors import InternalError, InvalidArgument, NotFound
from realm.sandbox import abi, toolchain
from realm.sandbox.memory import GuestMemory
from realm.sandbox.runtime import Runtime
from realm.server.tools import tool_mode

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def runtime(smollm2, gemma3, smollm2_path, gemma3_path, tmp_path_factory) -> Runtime:
    return make_runtime(
        {SMOL: (smollm2_path, smollm2), GEMMA: (gemma3_path, gemma3)}, tmp_path_factory.mktemp("realm_home")
    )


@pytest.fixture(scope="module")
def instance(runtime):
    with runtime.instance(runtime.default_module(), tenant="t1") as inst:
        yield inst


def allowed(mask: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little", count=vocab))


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_a_random_walk_through_the_mask_always_gives_valid_json(name, smollm2, gemma3):
    model = smollm2 if name == SMOL else gemma3
    tok, vocab = model.tokenizer, model.config.vocab_size
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = compile_grammar(tok, vocab, {"type": "json_schema", "schema": PERSON})
        out: list[int] = []
        while True:
            choices = allowed(g.mask(), vocab)
            t = int(rng.choice(choices))
            if t in tok.eot_ids:
                break
            out.append(t)
            if g.consume([t]) & DONE:
                break
        value = json.loads(tok.decode(out))
        assert set(value) == {"name", "age"} and len(value["name"]) <= 12 and 0 <= value["age"] <= 120


class _PythonBindingsVocabulary:
    """What llguidance's own Python bindings read (TokenizerWrapper): the reference."""

    def __init__(self, tok) -> None:
        self.eos_token_id, self.bos_token_id = tok.eos_id, tok.bos_id
        self.special_token_ids = [i for i in range(tok.vocab_size) if tok.is_control(i)]
        self.tokens = [tok.token_bytes(i, special=i in self.special_token_ids) for i in range(tok.vocab_size)]
        self._tok = tok

    def __call__(self, text: str) -> list[int]:
        return self._tok.encode(text)


def test_masks_agree_with_llguidances_python_bindings_and_default_slices(smollm2):
    """Realm calls llguidance's C API (llguidance_api.py) with its own finer string slices
    (grammar.SLICES); the reference is llguidance's Python bindings with its default
    slices. Along random walks through every schema of the suite (strings filled to their
    maxLength, where slices matter), every mask, forced run and status is the same."""
    tok, vocab = smollm2.tokenizer, smollm2.config.vocab_size
    assert tok.vocab_size == vocab
    theirs = llg.LLTokenizer(
        llg.TokenizerWrapper(_PythonBindingsVocabulary(tok)),
        eos_token=sorted(tok.eot_ids),
        slices=llg.LLTokenizer.general_slices(),
    )
    rng = np.random.default_rng(1)
    cache = GrammarCache()
    steps = 0
    for _, schema in [*SCHEMAS.values()] * 3:  # after the first round, on matchers used before (reset)
        text = grammar_text({"type": "json_schema", "schema": schema})
        a = cache.compile("t", tok, vocab, {"type": "json_schema", "schema": schema})
        b = llg.LLMatcher(theirs, text, log_level=0)
        reference = np.zeros(a.words, dtype=np.uint32)
        for _ in range(60):
            mask = a.mask().copy()
            b.unsafe_compute_mask_ptr(reference.ctypes.data, reference.nbytes)
            assert np.array_equal(mask, reference)
            assert a.forced() == list(b.compute_ff_tokens())
            steps += 1
            t = int(rng.choice(allowed(mask, vocab)))
            status = a.consume([t])
            assert b.consume_token(t)
            assert status == (ACCEPTING if b.is_accepting() else 0) | (DONE if b.is_stopped() else 0)
            if t in tok.eot_ids or status & DONE:
                break
        del a  # its matcher goes back to the cache, for the next round
    assert steps > 300 and cache.compiles == len(SCHEMAS)
    assert all(len(c.spare) == 1 for c in cache._cached["t"].values())  # each round took the last one's


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_llguidance_reads_each_token_with_control_tokens_marked_and_rows_past_the_vocabulary_empty(
    name, smollm2, gemma3
):
    tok = {SMOL: smollm2, GEMMA: gemma3}[name].tokenizer
    lengths, data = vocabulary_bytes(tok, tok.vocab_size + 3)
    expected = [
        b"\xff" + tok.token_bytes(i, special=True) if tok.is_control(i) else tok.token_bytes(i)
        for i in range(tok.vocab_size)
    ] + [b""] * 3
    ends = np.cumsum(lengths)
    assert [data[e - n : e] for e, n in zip(ends.tolist(), lengths.tolist())] == expected
    assert sum(t.startswith(b"\xff") for t in expected) > 0


def test_building_a_vocabularys_view_leaves_other_threads_running(smollm2):
    """llguidance's Python bindings hold the GIL while they build a view (gemma3: another
    thread waited 1.5 s; smollm2: 0.2 s); through its C API the build runs without it, and
    another thread goes on waking every millisecond."""
    worst, stop = 0.0, threading.Event()

    def tick() -> None:
        nonlocal worst
        while not stop.is_set():
            start = time.perf_counter()
            time.sleep(0.001)
            worst = max(worst, time.perf_counter() - start)

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    worst = 0.0
    tok = smollm2.tokenizer
    tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]  # built afresh, not the cached one
    lengths = np.array([len(t) for t in tokens], dtype=np.uint32)
    try:
        view = llguidance_api.VocabularyView(lengths, b"".join(tokens), sorted(tok.eot_ids), SLICES, tok.encode)
    finally:
        stop.set()
        ticker.join()
    assert view.vocab_size == tok.vocab_size
    assert worst < 0.05, f"another thread waited {worst * 1000:.0f} ms"


def test_a_library_whose_structures_differ_is_refused():
    """The C structures are checked against the library's own defaults when it loads: a
    field moved, or a structure grown, is an error, never fields passed wrong."""
    lib = llguidance_api.library()

    def writes(offset: int, value: int) -> object:
        def set_defaults(address: int, tokenizer: object) -> None:
            lib.set_defaults(address, tokenizer)
            ctypes.c_uint8.from_address(address + offset).value = value

        return SimpleNamespace(set_defaults=set_defaults, version="test")

    llguidance_api._check_layout(writes(0, 0))  # the tokenizer field: no default to compare
    size = ctypes.sizeof(llguidance_api._ConstraintInit)
    with pytest.raises(InternalError, match="not the ones Realm was written for"):
        llguidance_api._check_layout(writes(size, 1))  # written past the structure
    with pytest.raises(InternalError, match="not the ones Realm was written for"):
        llguidance_api._check_layout(writes(size - 8, 0))  # a field elsewhere: its default read wrong


@pytest.mark.parametrize("native_kernel", [True, False], ids=["native", "numpy"])
@pytest.mark.parametrize("allowed_share", [0.001, 0.05, 0.5, 0.999])
@pytest.mark.parametrize("vocab", [49152, 262144, 1000, 33])
def test_a_mask_forbids_exactly_the_tokens_whose_bit_is_clear(
    vocab: int, allowed_share: float, native_kernel: bool, monkeypatch
) -> None:
    if not native_kernel:  # as without the native library
        monkeypatch.setattr(native, "mask_logits", lambda logits, mask: False)
    rng = np.random.default_rng(vocab)
    allowed = rng.random(vocab) < allowed_share
    mask = np.packbits(np.pad(allowed, (0, -vocab % 32)), bitorder="little").view(np.uint32)
    mask[-1] |= (
        np.uint32(0xFFFFFFFF) << np.uint32(32 - (-vocab % 32)) if vocab % 32 else 0
    )  # stray bits past the vocabulary
    logits = rng.standard_normal(vocab).astype(np.float32)
    want = np.where(allowed, logits, -np.inf)
    apply_mask(mask, logits)
    assert np.array_equal(logits, want)


def test_consume_is_all_or_nothing_and_forced_tokens_fast_forward(smollm2):
    tok, vocab = smollm2.tokenizer, smollm2.config.vocab_size
    g = compile_grammar(tok, vocab, {"type": "regex", "pattern": "[0-9]{3}-[0-9]{4}"})
    assert g.consume([]) == 0
    with pytest.raises(InvalidArgument, match="does not allow token"):
        g.consume(tok.encode("12") + tok.encode("x"))
    assert g.consume(tok.encode("123")) == 0  # the bad tail left no trace
    assert tok.decode(g.forced()) == "-"
    assert g.consume(tok.encode("-4567")) == ACCEPTING | DONE
    g.rollback(1)
    assert g.status() == 0
    # an end token is allowed exactly when the text is complete
    end = sorted(tok.eot_ids)[0]
    assert end not in allowed(g.mask(), vocab)
    g.consume(tok.encode("7"))
    assert end in allowed(g.mask(), vocab)


@pytest.mark.parametrize(
    "constraint,message",
    [
        ({"type": "json_schema", "schema": {"type": "strin"}}, "does not compile"),
        ({"type": "json_schema", "schema": [1]}, 'needs "schema"'),
        ({"type": "regex", "pattern": "a(b"}, "unclosed group"),
        ({"type": "grammar", "gbnf": "root ::= missing"}, "not found"),
        ({"type": "lark", "lark": "start: ("}, "does not compile"),
        ({"type": "xml"}, "unknown constraint type"),
        ({"type": "json_schema", "schema": {"enum": ["x" * 70_000]}}, "the most is"),
    ],
)
def test_bad_constraints_are_refused_with_the_reason(smollm2, constraint, message):
    with pytest.raises(InvalidArgument, match=message):
        GrammarCache().compile("t", smollm2.tokenizer, smollm2.config.vocab_size, constraint)


def test_the_cache_is_bounded_per_tenant_and_reuses_compiled_grammars(smollm2):
    cache = GrammarCache(per_tenant=4, tenants=2)
    tok, vocab = smollm2.tokenizer, smollm2.config.vocab_size
    for i in range(10):  # a flood of unique schemas from one tenant
        cache.compile("flood", tok, vocab, {"type": "regex", "pattern": f"a{{{i + 1}}}"})
    cache.compile("quiet", tok, vocab, {"type": "regex", "pattern": "b+"})
    assert cache.size("flood") == 4 and cache.size("quiet") == 1 and cache.compiles == 11
    cache.compile("quiet", tok, vocab, {"type": "regex", "pattern": "b+"})
    assert cache.compiles == 11  # a hit
    cache.compile("third", tok, vocab, {"type": "regex", "pattern": "c+"})
    assert cache.size("flood") == 0 and cache.size("quiet") == 1  # the least recently active tenant went


@pytest.mark.parametrize(
    "name,params", [(SMOL, SamplingParams.greedy()), (GEMMA, SamplingParams(temperature=0.9, seed=11))]
)
def test_the_guest_under_a_schema_equals_the_host_token_for_token(runtime, instance, smollm2, gemma3, name, params):
    model = smollm2 if name == SMOL else gemma3
    constraint = {"type": "json_schema", "schema": PERSON}
    chat = name == SMOL  # gemma3-270m is a base model: no chat template
    text = "Describe a person as JSON." if chat else "A person, described as JSON:"
    host = model.generate(text, 30, params, chat=chat, constraint=constraint)
    list(host)
    prompt = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
    request = greedy_request(runtime, name, max_tokens=30, params=params, constraint=constraint, **prompt)
    got = instance.generate(request)
    assert got.tokens == host.tokens and got.text == host.text
    assert got.finish_reason == host.finish_reason == "stop"
    assert set(json.loads(got.text)) == {"name", "age"}
    assert instance.state.grammars == {}  # freed with the request


def test_forced_tokens_are_taken_unsampled_and_run_in_one_step_in_the_guest_and_on_the_host(
    runtime, instance, smollm2, monkeypatch
):
    """Fast-forward: what the schema forces (`{"name": "`, `", "age": `) is emitted without
    sampling and runs through the model with the token before it, in one step."""
    steps: list[int] = []  # tokens of each forward call
    forward = smollm2.transformer.forward

    def counted(chunks):
        steps.append(sum(len(c.tokens) for c in chunks))
        return forward(chunks)

    monkeypatch.setattr(smollm2.transformer, "forward", counted)
    constraint = {"type": "json_schema", "schema": PERSON}
    host = smollm2.generate("Describe a person as JSON.", 30, SamplingParams.greedy(), chat=True, constraint=constraint)
    list(host)
    host_steps, steps[:] = steps[:], []
    request = greedy_request(
        runtime,
        SMOL,
        max_tokens=30,
        constraint=constraint,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
    )
    got = instance.generate(request)
    assert got.tokens == host.tokens and steps == host_steps
    forced_runs = [n for n in host_steps[1:] if n > 1]
    assert forced_runs, host_steps  # `", "age": ` ran with the name's last token
    assert len(host_steps) < len(host.tokens) / 2  # a step each sampled token: half of them were forced


def test_a_regex_and_a_gbnf_grammar_constrain_the_guest(runtime, instance):
    out = instance.generate(
        greedy_request(runtime, SMOL, "My phone number is", 20, constraint={"type": "regex", "pattern": r"\d{3}-\d{4}"})
    )
    assert re.fullmatch(r"\d{3}-\d{4}", out.text) and out.finish_reason == "stop"
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    out = instance.generate(
        greedy_request(runtime, SMOL, "Is the sky blue?", 20, constraint={"type": "grammar", "gbnf": gbnf})
    )
    assert out.text in ("The answer is yes.", "The answer is no.")


def test_a_bad_constraint_fails_the_guest_request_with_the_reason(runtime, instance):
    request = greedy_request(runtime, SMOL, "Hi", 4, constraint={"type": "regex", "pattern": "(("})
    with pytest.raises(InvalidArgument, match="realm_grammar_compile.*regex"):
        instance.generate(request)


# ---------------------------------------------------------------------------- per-step control, by host call


def test_a_sessions_bias_and_mask_apply_to_its_next_step_only_and_backup_rewinds(runtime, instance, smollm2):
    st, store = instance.state, instance._store
    base = st.memory.grow(store, 64) * 65536  # 4 MiB of fresh guest memory for the buffers below
    mem = GuestMemory(st.memory, store)
    vocab = smollm2.config.vocab_size
    tokens_at, ids_at, values_at, mask_at, logits_at = (base + (i << 16) for i in range(5))

    def call(name: str, *args: int) -> int:
        return abi.invoke(abi.BY_NAME[name], st, store, list(args))

    def forward(session: int, ids: list[int]) -> np.ndarray:
        mem.write(tokens_at, np.asarray(ids, dtype="<i4").tobytes())
        assert call("realm_forward", session, tokens_at, len(ids), logits_at, vocab) == vocab
        return mem.read_floats(logits_at, vocab).numpy().copy()

    st.hold(runtime.models.by_name(SMOL))
    session = st.open_session(runtime.models.by_name(SMOL), 64).handle
    prompt = smollm2.tokenizer.encode("The capital of France is")
    plain = forward(session, prompt)
    pick = int(np.argsort(plain)[-50])  # a token far from the top
    mem.write(ids_at, np.asarray([pick], dtype="<i4").tobytes())
    mem.write(values_at, np.asarray([100.0], dtype="<f4").tobytes())
    assert call("realm_session_backup", session, len(prompt)) == 0
    assert call("realm_session_set_bias", session, ids_at, values_at, 1) == 0
    biased = forward(session, prompt)  # the same prompt again, over the rewound cache
    assert int(np.argmax(biased)) == pick and biased[pick] == np.float32(plain[pick] + np.float32(100.0))
    np.testing.assert_array_equal(np.delete(biased, pick), np.delete(plain, pick))  # backup left no trace
    after = forward(session, [pick])
    assert call("realm_session_backup", session, 1) == len(prompt)
    np.testing.assert_array_equal(forward(session, [pick]), after)  # bias gone, cache rewound exactly
    allowed = [3, 77, pick]
    mask = np.zeros((vocab + 31) // 32, dtype="<u4")
    for t in allowed:
        mask[t // 32] |= np.uint32(1 << (t % 32))
    mem.write(mask_at, mask.tobytes())
    assert call("realm_session_set_mask", session, mask_at, mask.size - 1) == InvalidArgument.abi_code
    assert call("realm_session_set_mask", session, mask_at, mask.size) == 0
    masked = forward(session, [5])
    assert np.flatnonzero(np.isfinite(masked)).tolist() == sorted(allowed)
    assert np.isfinite(forward(session, [5])).all()  # one step only
    assert call("realm_session_backup", session, 1000) == InvalidArgument.abi_code
    assert call("realm_session_set_grammar", session, 12345) == NotFound.abi_code
    st.close_sessions()


# ---------------------------------------------------------------------------- the example guests


def test_the_regex_example_guest_masks_each_step_as_a_bound_grammar_does(runtime, instance, tmp_path):
    guest = runtime.load_module(toolchain.build(toolchain.EXAMPLES_DIR / "regex.c", tmp_path / "regex.wasm"))
    pattern = r"(Yes|No), because [a-z ,']{1,80}\."
    with runtime.instance(guest, tenant="t1") as regex:
        out = regex.generate(greedy_request(runtime, SMOL, "Is the sea salty?", 40))
    assert re.fullmatch(pattern, out.text) and out.finish_reason == "stop"
    bound = instance.generate(
        greedy_request(runtime, SMOL, "Is the sea salty?", 40, constraint={"type": "regex", "pattern": pattern})
    )
    assert bound.tokens == out.tokens  # the guest's own masks and the host-bound grammar agree


def test_the_choose_example_guest_picks_the_most_likely_answer(runtime, smollm2, tmp_path):
    guest = runtime.load_module(toolchain.build(toolchain.EXAMPLES_DIR / "choose.c", tmp_path / "choose.wasm"))
    prompt = "Review: I loved every minute of this film.\nSentiment:"
    with runtime.instance(guest, tenant="t1") as choose:
        out = choose.generate(greedy_request(runtime, SMOL, prompt, 8))
    ids = smollm2.prompt_tokens(prompt=prompt)
    scores = {}
    for answer in ("positive", "negative", "neutral"):  # the host's own reckoning, step by step
        session, answer_ids = smollm2.new_session(), smollm2.tokenizer.encode(answer)
        steps = [session.feed(ids)[-1]] + [session.feed([t])[-1] for t in answer_ids[:-1]]
        scores[answer] = sum(float(torch.log_softmax(s.double(), -1)[t]) for s, t in zip(steps, answer_ids))
    assert out.text == max(scores, key=scores.__getitem__) and out.finish_reason == "stop"


def test_the_tool_call_grammar_takes_a_call_that_fits_the_schema_or_plain_text(smollm2):
    tok, vocab = smollm2.tokenizer, smollm2.config.vocab_size
    weather = {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    auto = tool_mode([{"type": "function", "function": weather}], "auto")
    assert auto is not None
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert compile_grammar(tok, vocab, auto.constraint()).consume(tok.encode(call)) & ACCEPTING
    assert compile_grammar(tok, vocab, auto.constraint()).consume(tok.encode("It is sunny.")) & ACCEPTING
    with pytest.raises(InvalidArgument, match="does not allow"):
        compile_grammar(tok, vocab, auto.constraint()).consume(tok.encode(call.replace("city", "town")))
    forced = tool_mode([{"type": "function", "function": weather}], "required")
    assert forced is not None and forced.forced
    with pytest.raises(InvalidArgument, match="does not allow"):
        compile_grammar(tok, vocab, forced.constraint()).consume(tok.encode("It is sunny."))
