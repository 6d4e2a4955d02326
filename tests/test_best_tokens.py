"""A step's best tokens (engine/best_tokens.py, `realm_forward_top`): the first of the
sampler's order of the whole row, and under a grammar, checked lazily, the tokens a masked
step gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sandbox_helpers import make_runtime
from schema_suite import SCHEMAS
from test_native import best_in_order

from realm.backends import native
from realm.engine import best_tokens as best
from realm.engine.grammar import Grammar, allowed_tokens, apply_mask, compile_grammar
from realm.engine.sampling import SamplingParams
from realm.errors import InvalidArgument, OutOfBounds
from realm.sandbox import abi
from realm.sandbox.memory import GuestMemory
from realm.sandbox.runtime import Runtime

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def runtime(smollm2, smollm2_path, tmp_path_factory) -> Runtime:
    return make_runtime({SMOL: (smollm2_path, smollm2)}, tmp_path_factory.mktemp("realm_home"))


def test_without_the_native_library_the_best_tokens_are_the_same(monkeypatch):
    monkeypatch.setattr(native, "best_logits", lambda row, k: None)
    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(1, 2000))
        row = rng.integers(-3, 3, size=n).astype(np.float32)
        if trial % 3 == 0:
            row[rng.integers(0, n, n // 2 + 1)] = -np.inf
        if trial % 4 == 0:
            row[rng.integers(0, n, 2)] = np.nan
        k = int(rng.integers(1, 70))
        ids, values = best.best_tokens(row, k)
        want_ids, want_values = best_in_order(row, k)
        assert np.array_equal(ids, want_ids) and np.array_equal(values, want_values, equal_nan=True)


def test_a_lazily_checked_grammar_gives_the_masked_steps_tokens_and_rarely_a_mask(smollm2, monkeypatch):
    """Greedy under every schema of the suite: the host's generation asks the grammar about
    the best tokens first (as `realm_forward_top` does for the default guest) and gives the
    tokens of the masked step, computing far fewer masks."""
    masks = 0
    full_mask = Grammar.mask

    def counted(self: Grammar) -> np.ndarray:
        nonlocal masks
        masks += 1
        return full_mask(self)

    monkeypatch.setattr(Grammar, "mask", counted)
    steps = 0
    for question, schema in SCHEMAS.values():
        constraint = {"type": "json_schema", "schema": schema}
        lazy = smollm2.generate(question, 60, SamplingParams.greedy(), chat=True, constraint=constraint)
        list(lazy)
        with monkeypatch.context() as m:
            m.setattr(SamplingParams, "top_candidates", lambda self, vocab, most: 0)  # every step masked
            masked = smollm2.generate(question, 60, SamplingParams.greedy(), chat=True, constraint=constraint)
            before = masks
            list(masked)
            steps += masks - before
        assert lazy.tokens == masked.tokens
    lazy_masks = masks - steps
    assert steps > 50 and lazy_masks < steps / 3


def test_when_too_few_of_the_best_are_allowed_the_mask_makes_them_exact(smollm2):
    """Digits only, after a prompt that wants words: the row's best are refused, so the
    mask is computed and its best tokens are made exact, as a masked step makes them."""
    tok, vocab = smollm2.tokenizer, smollm2.config.vocab_size
    grammar = compile_grammar(tok, vocab, {"type": "regex", "pattern": "[0-9]{4}"})
    prompt = tok.encode("Once upon a time, in a land far away, there lived a")
    session = smollm2.new_session()
    row = session.feed(prompt)[-1].numpy().copy()
    ids, values = best.best_allowed(row, 5, grammar, best.exact_logits(session, row))

    mask = grammar.mask().copy()
    masked_session = smollm2.new_session()
    masked = masked_session.feed(prompt, allowed=allowed_tokens(mask, vocab))[-1].numpy().copy()
    apply_mask(mask, masked)
    want_ids, want_values = best.best_tokens(masked, 5)
    assert all(tok.decode([t]).strip().isdigit() for t in ids)
    assert np.array_equal(ids, want_ids) and np.allclose(values, want_values, atol=1e-4)
    assert not np.array_equal(ids, best.best_tokens(row, 5)[0])  # the unmasked best were refused


def test_forward_top_is_the_head_of_the_rows_order_and_refuses_bad_arguments(runtime, smollm2):
    with runtime.instance(runtime.default_module(), tenant="top") as inst:
        st, store = inst.state, inst._store
        base = st.memory.grow(store, 8) * 65536
        mem = GuestMemory(st.memory, store)
        vocab = smollm2.config.vocab_size
        tokens_at, ids_at, top_at, logits_at = base, base + 4096, base + 8192, base + 16384
        prompt = smollm2.tokenizer.encode("The capital of France is")
        mem.write(tokens_at, np.asarray(prompt, dtype="<i4").tobytes())

        def call(name: str, *args: int) -> int:
            return abi.invoke(abi.BY_NAME[name], st, store, list(args))

        model = runtime.models.by_name(SMOL)
        st.hold(model)
        whole, top = (st.open_session(model, 64).handle for _ in range(2))
        assert call("realm_forward", whole, tokens_at, len(prompt), logits_at, vocab) == vocab
        row = mem.read_floats(logits_at, vocab).numpy()
        for k in (1, 40, 64):
            st.session(top).session.rewind(0)
            assert call("realm_forward_top", top, tokens_at, len(prompt), k, ids_at, top_at) == k
            ids = mem.read_array(ids_at, k, np.int32, "ids")
            want_ids, want_values = best.best_tokens(row, k)
            assert np.array_equal(ids, want_ids)
            assert np.array_equal(mem.read_floats(top_at, k).numpy(), want_values)
        assert call("realm_forward_top", top, tokens_at, 1, 0, ids_at, top_at) == InvalidArgument.abi_code
        assert call("realm_forward_top", top, tokens_at, 1, 65, ids_at, top_at) == InvalidArgument.abi_code
        end = st.memory.data_len(store)
        assert call("realm_forward_top", top, tokens_at, 1, 8, end - 8, top_at) == OutOfBounds.abi_code
        st.close_sessions()


def test_exact_logits_read_the_steps_exact_candidates_and_compute_the_others(smollm2):
    session = smollm2.new_session()
    row = session.feed(smollm2.tokenizer.encode("The capital of France is"))[-1].numpy()
    exact = best.exact_logits(session, row)
    assert exact is not None and session.exact_ids is not None
    known = session.exact_ids.numpy()[:4].astype(np.int64)
    tail = np.setdiff1d(np.arange(200), session.exact_ids.numpy())[:50].astype(np.int64)
    assert np.array_equal(exact(known), row[known])  # the step's own exact logits, as they are
    computed = exact(tail)
    assert not np.array_equal(computed, row[tail])  # the screened tail, recomputed
    output = smollm2.transformer.weights.output
    assert np.array_equal(computed, output.exact_at(session.normed, torch.from_numpy(tail)).numpy())
