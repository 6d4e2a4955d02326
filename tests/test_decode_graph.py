"""The compiled decode step against the same step run eagerly, the switch from one to the
other, and the KV pool under both."""

from __future__ import annotations

import gc
from statistics import mean

import torch
import torch.utils._pytree as pytree
from largest_logits import assert_largest_close

from realm.backends.compiled import CompiledDecode, layers_per_graph, runs_of
from realm.backends.screened import CANDIDATES
from realm.engine.agreement import step_logits
from realm.engine.kv_cache import BLOCK
from realm.models.transformer import GRAPH_PROMPT_TOKENS

PROMPT = [1, 504, 3458, 282, 8197, 314]


def test_compiled_decode_is_as_exact_as_the_eager_step(smollm2_compiled, smollm2, smollm2_path):
    """The same tokens through the compiled step, the eager step and the float32 reference,
    compared on the reference's 32 largest logits, which the screen computes exactly (below
    them its int8 rounding moves logits by up to about 1 either way, and the largest such
    move would decide the comparison). Fused kernels round differently, so compiled and
    eager logits differ by up to about 0.3 in a step; what must hold is that over the steps
    the compiled step is no further from float32 than the eager one is."""
    from realm.backends.devices import BackendRegistry
    from realm.engine.model import load_model

    reference = load_model(smollm2_path, BackendRegistry("naive").active).new_session()
    compiled, eager = smollm2_compiled.new_session(), smollm2.new_session()
    for s in (compiled, eager, reference):  # the prompt layer by layer, so only the steps differ
        lf = s.feed(PROMPT, all_logits=True)[-1:]
    feed = [int(lf.argmax())]
    compiled_off, eager_off, apart = [], [], []
    for _ in range(12):
        lc, le, lf = compiled.feed(feed), eager.feed(feed), reference.feed(feed)
        top = lf.topk(CANDIDATES).indices
        compiled_off.append(float((lc - lf).gather(1, top).abs().max()))
        eager_off.append(float((le - lf).gather(1, top).abs().max()))
        apart.append(float((lc - le).gather(1, top).abs().max()))
        feed = [int(lf.argmax())]
    assert mean(compiled_off) <= 1.25 * mean(eager_off) + 0.02, (compiled_off, eager_off)
    assert mean(apart) <= mean(eager_off) + 0.05, (apart, eager_off)


class _Runner:
    """Stands in for a loaded graph: records which graph ran and the inputs it was given,
    and hands x back."""

    def __init__(self, name: str, calls: list, x_at: int) -> None:
        self.name, self.calls, self.x_at = name, calls, x_at

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls.append((self.name, inputs))
        return [inputs[self.x_at]]


def test_a_lone_row_runs_the_lone_graph_and_every_run_of_layers_gets_its_own_weights(smollm2):
    """The dispatch around the loaded graphs: one row goes to the graph whose activations
    are carried as pairs, several to the batch graph, and the step calls a graph once per
    run of layers with that run's weights and that run's keys and values."""
    layers = smollm2.transformer.weights.layers
    per = layers_per_graph(smollm2.config)
    runs = runs_of(layers, per)
    calls: list = []
    n_weights = len(pytree.tree_leaves(runs[0]))
    graphs = [
        (_Runner(f"lone {i}", calls, n_weights), _Runner(f"batch {i}", calls, n_weights)) for i in range(len(runs))
    ]
    step = CompiledDecode(graphs, runs)
    keys = [torch.full((1,), float(i)) for i in range(len(layers))]
    values = [-k for k in keys]
    for rows, kind in ((1, "lone"), (3, "batch")):
        calls.clear()
        x, idx = torch.zeros(rows, 4), torch.zeros(rows, dtype=torch.long)
        step(x, idx, idx, idx, torch.zeros(rows, 2, dtype=torch.long), [], keys, values)
        assert [name for name, _ in calls] == [f"{kind} {i}" for i in range(len(runs))]
        for g, (_, inputs) in enumerate(calls):
            assert inputs[0] is pytree.tree_leaves(runs[g])[0]
            assert [float(k) for k in inputs[-2 * per : -per]] == list(range(g * per, (g + 1) * per))


def test_a_switch_to_the_compiled_step_changes_no_running_sequence(
    smollm2_compiled, smollm2, smollm2_path, cpu_backend
):
    """A model switched to its compiled step between two steps (what a server does when a
    background build ends): a sequence begun before the switch goes on with the eager step,
    bit for bit what it would have got unswitched, even in a batch with a sequence begun
    after it, which gets the compiled step's logits bit for bit."""
    from realm.engine import compiled_step
    from realm.engine.model import load_model

    model = load_model(smollm2_path, cpu_backend, compile_mode="off")
    before, eager_twin = model.new_session(), smollm2.new_session()
    for s in (before, eager_twin):
        s.feed(PROMPT)
    assert compiled_step.attach(model, "cached") == "compiled" and model.transformer.compiled
    after, compiled_twin = model.new_session(), smollm2_compiled.new_session()
    for s in (after, compiled_twin):
        s.feed(PROMPT)
    for token in (42, 43, 44):
        chunks = [before.chunk([token]), after.chunk([token])]
        model.transformer.forward(chunks)
        for s, c in zip((before, after), chunks):
            s.commit(c)
        assert torch.equal(chunks[0].logits, eager_twin.feed([token]))
        assert torch.equal(chunks[1].logits, compiled_twin.feed([token]))


def test_batched_decode_of_unequal_lengths_equals_each_beside_a_stranger(smollm2):
    """Three sequences of different lengths (one only just started) decode in one graph
    call; each gets what it gets in a batch with an unrelated short sequence instead: the
    padding and masks hide every other sequence's keys. (Alone it would take the batch-of-one
    graph, whose activations are carried more precisely: test_reference.py bounds both.)"""
    prompts = [PROMPT, [1, 9690], list(range(100, 140))]
    together = [smollm2.new_session() for _ in prompts]
    for s, p in zip(together, prompts):
        s.feed(p)
    chunks = [s.chunk([42]) for s in together]
    smollm2.transformer.forward(chunks)
    for c, p in zip(chunks, prompts):
        own, stranger = smollm2.new_session(), smollm2.new_session()
        own.feed(p)
        stranger.feed([1, 77, 78])
        pair = [own.chunk([42]), stranger.chunk([42])]
        smollm2.transformer.forward(pair)
        torch.testing.assert_close(c.logits, pair[0].logits, atol=1e-3, rtol=0)


def test_a_short_prompt_runs_as_rows_of_the_graph(smollm2):
    """A short prompt runs as rows of the decode graph, each row seeing the keys up to its
    own position only: its largest logits are those of its tokens fed one batched step at a
    time."""
    assert len(PROMPT) <= GRAPH_PROMPT_TOKENS
    whole = smollm2.new_session().feed(PROMPT)
    assert_largest_close(whole, step_logits(smollm2, PROMPT, batch=2)[-1:], atol=1e-3)


def test_dropped_sessions_give_their_blocks_back_zeroed(smollm2):
    pool = smollm2.kv_pool
    gc.collect()
    free_before = len(pool._free)
    session = smollm2.new_session()
    session.feed(list(range(1, 3 * BLOCK + 2)))  # four blocks
    blocks = list(session.kv.blocks)
    assert len(blocks) == 4 and len(pool._free) == free_before - 4
    assert any(float(pool.keys[0][b].abs().sum()) > 0 for b in blocks)
    del session
    gc.collect()
    assert len(pool._free) == free_before
    assert all(float(t[b].abs().sum()) == 0 for t in pool.keys + pool.values for b in blocks)


def test_pool_growth_keeps_every_sequence_intact(smollm2):
    """A sequence that outgrows the pool makes it reallocate under a sequence that is
    mid-generation; that one's next logits equal what its twin got before the growth, and
    the grown pool takes blocks back as before."""
    session, twin = smollm2.new_session(), smollm2.new_session()
    session.feed(PROMPT)
    twin.feed(PROMPT)
    expected = twin.feed([42])
    blocks_before = smollm2.kv_pool.n_blocks
    big = smollm2.new_session()
    big.feed(list(range(1, (blocks_before + 1) * BLOCK)))
    assert smollm2.kv_pool.n_blocks > blocks_before
    torch.testing.assert_close(session.feed([42]), expected, atol=1e-4, rtol=0)
    free = len(smollm2.kv_pool._free)
    held = len(big.kv.blocks)
    del big
    gc.collect()
    assert len(smollm2.kv_pool._free) == free + held
