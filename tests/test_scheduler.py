"""Continuous batching: the pure planning policy, then real concurrent sessions on smollm2."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from largest_logits import assert_largest_close

from realm.engine import scheduler as scheduler_module
from realm.engine.scheduler import BatchScheduler, StepRequest, _host_rows, plan_round
from realm.engine.step_router import SchedulerRouter
from realm.errors import InternalError


class FakeSession:  # planning never touches the session
    pass


def req(tenant: str, n: int) -> StepRequest:
    return StepRequest(FakeSession(), list(range(n)), tenant)  # type: ignore[arg-type]


def test_decode_steps_all_run_before_prompt_pieces():
    waiting = [req("a", 100), req("b", 1), req("c", 1)]
    plan = plan_round(waiting, budget=20)
    assert [(r.tenant, n) for r, n in plan] == [("b", 1), ("c", 1), ("a", 8)]


def test_prompts_share_the_budget_round_robin_by_tenant():
    flood = [req("flood", 50) for _ in range(5)]
    polite = req("polite", 50)
    plan = plan_round(flood + [polite], budget=240)
    assert [(r.tenant, n) for r, n in plan] == [("flood", 50), ("polite", 50), ("flood", 20)]


def test_long_prompt_is_split_across_rounds():
    long = req("a", 600)
    assert plan_round([long], budget=256) == [(long, 256)]


def test_a_prompt_with_company_gets_half_the_budget():
    """Others waiting keep rounds short; a prompt alone runs at the whole budget."""
    long, step = req("a", 600), req("b", 1)
    assert plan_round([long, step], budget=256) == [(step, 1), (long, 127)]


def test_a_rounds_rows_reach_the_host_without_a_copy():
    """On the CPU each finished request gets a view of the round's float32 logits; anything
    else is converted to float32 rows once for the round."""
    logits = torch.randn(3, 10)
    rows = _host_rows([logits[i : i + 1] for i in range(3)])
    assert all(np.shares_memory(row, logits.numpy()) for row in rows)
    assert all(np.array_equal(row, logits[i].numpy()) for i, row in enumerate(rows))
    half = logits.half()
    rows = _host_rows([half[i : i + 1] for i in range(3)])
    assert all(row.dtype == np.float32 and np.array_equal(row, half[i].float().numpy()) for i, row in enumerate(rows))


def test_concurrent_sessions_are_batched_and_match_sequential(smollm2):
    """Four sessions on four threads, fed the tokens each gets greedily alone: every step's
    logits match the lone run's. (Batches of one and of several run different compiled
    graphs, which round differently in the last bits; through bf16 that grows to ~0.3 in the
    logits, as far as the int4 path itself is from float32 (~0.2-0.5, test_decode_graph).
    So this compares logits on the same tokens, not free-running greedy text, where a near
    tie may go either way; a sequence reading another's keys would be off by far more.)"""
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at"]
    encoded = [smollm2.encode_prompt(p) for p in prompts]

    def run(step, ids, forced=None, n=8):
        session, tokens = smollm2.new_session(), []
        logits = [torch.as_tensor(step(session, ids))]
        for i in range(n):
            tokens.append(forced[i] if forced else int(torch.argmax(logits[-1])))
            logits.append(torch.as_tensor(step(session, [tokens[-1]])))
        return tokens, torch.stack(logits)

    sequential = [run(lambda s, t: s.feed(t)[-1], ids) for ids in encoded]
    batch_sizes = []
    scheduler = BatchScheduler(smollm2.transformer, observer=lambda seqs, toks, waiting: batch_sizes.append(seqs))
    results: list = [None] * len(prompts)

    def worker(i):
        results[i] = run(lambda s, t: scheduler.step(s, t, tenant=f"t{i % 2}"), encoded[i], sequential[i][0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    scheduler.close()
    for (_, alone), (_, batched) in zip(sequential, results):
        assert_largest_close(batched, alone, atol=0.5)
    assert max(batch_sizes) > 1


def test_an_idle_runner_thread_ends_and_the_next_step_starts_another(smollm2, monkeypatch):
    """An idle model's runner must not live on: its OpenMP team would slow every other
    model's steps (RUNNER_IDLE_S)."""
    monkeypatch.setattr(scheduler_module, "RUNNER_IDLE_S", 0.05)
    scheduler = BatchScheduler(smollm2.transformer)
    ids = smollm2.encode_prompt("Once upon a time")
    assert scheduler._thread is None
    first = scheduler.step(smollm2.new_session(), ids)
    runner = scheduler._thread
    assert runner is not None
    runner.join(timeout=5)
    assert not runner.is_alive() and scheduler._thread is None
    again = scheduler.step(smollm2.new_session(), ids)
    second = scheduler._thread
    assert second is not None and second is not runner
    scheduler.close()
    assert not second.is_alive()
    np.testing.assert_array_equal(first, again)


def test_a_round_does_not_wait_for_a_session_that_has_ended(smollm2):
    """The previous round's sessions are waited for (gather_s), but not once they are gone:
    a finished request's session never sends another step."""
    scheduler = BatchScheduler(smollm2.transformer, gather_s=2.0)
    ids = smollm2.encode_prompt("Once upon a time")
    try:
        ended = smollm2.new_session()
        scheduler.step(ended, ids)
        del ended
        started = time.perf_counter()
        scheduler.step(smollm2.new_session(), ids)
        assert time.perf_counter() - started < 1.0
    finally:
        scheduler.close()


def test_other_model_work_runs_on_the_runner_thread(smollm2):
    """A guest's per-layer work runs where the model's steps run (no OpenMP team of its own);
    its error reaches its caller, and the runner goes on."""
    scheduler = BatchScheduler(smollm2.transformer)
    router = SchedulerRouter()
    router.add(scheduler)
    ran_on: list[int] = []
    forward = smollm2.transformer.forward

    def recorded(chunks):
        ran_on.append(threading.get_native_id())
        return forward(chunks)

    smollm2.transformer.forward = recorded
    try:
        scheduler.step(smollm2.new_session(), smollm2.encode_prompt("Once upon a time"))
        assert router.call(smollm2.transformer, threading.get_native_id) == ran_on[0] != threading.get_native_id()
        with pytest.raises(ZeroDivisionError):
            router.call(smollm2.transformer, lambda: 1 / 0)
        assert scheduler.call(lambda: 2) == 2
    finally:
        del smollm2.transformer.forward
        scheduler.close()
    with pytest.raises(InternalError, match="shut down"):
        scheduler.call(lambda: 3)
    assert SchedulerRouter().call(smollm2.transformer, threading.get_native_id) == threading.get_native_id()


def test_batched_decode_across_a_sliding_window_matches_one_at_a_time(tmp_path, cpu_backend):
    """Sequences of different lengths, some past the window, decoded in one step."""
    from tiny_model import write_tiny_gemma3

    from realm.engine.model import load_model

    model = load_model(write_tiny_gemma3(tmp_path / "g.gguf"), cpu_backend)
    window = model.config.sliding_window
    prompts = [list(range(3, 3 + n)) for n in (2, window - 1, window + 5, 3 * window)]
    alone = []
    for p in prompts:
        s = model.new_session()
        s.feed(p)
        alone.append(s.feed([7])[0])
    sessions = [model.new_session() for _ in prompts]
    for s, p in zip(sessions, prompts):
        s.feed(p)
    chunks = [s.chunk([7]) for s in sessions]
    model.transformer.forward(chunks)
    for chunk, expected in zip(chunks, alone):
        assert_largest_close(chunk.logits[0], expected, atol=1e-4)
