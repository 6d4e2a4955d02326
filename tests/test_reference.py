"""Agreement with llama.cpp on the two real models, inside shared/reference/README.md's bounds."""

from __future__ import annotations

import pytest
from conftest import REFERENCE, load_reference

from realm.engine.agreement import perplexity, prompt_agreement

MODELS = ["smollm2", "gemma3"]
LLAMA_CPP_PPL = {"smollm2": 15.6997, "gemma3": 15.9336}


PATHS = {"prefill": None, "steps": 1, "batched steps": 2}


def _path_params() -> list:
    """Every model by every path; the decode steps run through the compiled step (the one
    users get), the eager step's own agreement is bounded by tests/test_decode_graph.py."""
    return [
        pytest.param((m, path), marks=[] if PATHS[path] is None else [pytest.mark.compiled])
        for m in MODELS
        for path in PATHS
    ]


@pytest.fixture(scope="module", params=_path_params(), ids=lambda p: f"{p[0]}-{p[1].replace(' ', '-')}")
def agreements(request):
    """Each model's logits on every reference prompt, by every path a token's logits take:
    one prefill pass, a lone sequence's decode steps (its own compiled graph) and decode
    steps batched with another sequence."""
    name, path = request.param
    model = request.getfixturevalue(name if PATHS[path] is None else f"{name}_compiled")
    reference, meta = load_reference(name)
    return f"{name} ({path})", [prompt_agreement(model, reference, i, PATHS[path]) for i in range(len(meta["prompts"]))]


def test_last_position_top1_is_identical_on_every_prompt(agreements):
    name, results = agreements
    assert [r.index for r in results if not r.last_top1_same] == [], name


def test_per_position_argmax_agreement(agreements):
    name, results = agreements
    for r in results:
        assert r.argmax_agreement >= 0.88, (name, r)


def test_mean_top20_logit_difference(agreements):
    name, results = agreements
    for r in results:
        assert r.mean_top20_abs_diff <= 0.35, (name, r)


def test_teacher_forced_greedy_agreement(agreements):
    name, results = agreements
    for r in results:
        assert r.teacher_forced_agreement >= 0.85, (name, r)
    overall = sum(r.teacher_forced_matches for r in results) / sum(r.teacher_forced_total for r in results)
    assert overall >= 0.93, (name, overall)


def test_long_prompt_crosses_gemma3_sliding_window(gemma3):
    reference, _ = load_reference("gemma3")
    assert len(reference["p6_tokens"]) > gemma3.config.sliding_window


@pytest.mark.parametrize("name", MODELS)
def test_perplexity_within_two_percent_of_llama_cpp(request, name):
    model = request.getfixturevalue(name)
    text = (REFERENCE / "ppl_text.txt").read_text(encoding="utf-8")
    tokens = model.tokenizer.encode(text, add_bos=model.tokenizer.add_bos)
    ppl, scored = perplexity(model, tokens, 512)
    assert scored == len(tokens) - 1  # one window: the text is shorter than 512 tokens
    assert abs(ppl / LLAMA_CPP_PPL[name] - 1) <= 0.02, (name, ppl)
