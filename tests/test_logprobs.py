"""Log-probabilities (OpenAI's `logprobs`): the log-softmax of the step's raw logits,
reported by the host through realm_logprobs for each token the default guest emits, and
checked against llama.cpp's reference logits within the reference bounds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sandbox_helpers import greedy_request, make_runtime

from realm.engine.logprobs import FLOOR, token_logprobs
from realm.engine.sampling import SamplingParams
from realm.errors import InvalidArgument

REFERENCES = {"smollm2-135m": "smollm2-135m-instruct-q4_1", "gemma3-270m": "gemma3-270m-q4_k_m"}
MEAN_TOP20_BOUND = 0.35  # reference/README.md: mean |logit difference| over the 20 largest, all positions


def test_logprobs_are_the_log_softmax_in_order_with_ties_by_id():
    x = np.array([1.0, 3.0, 3.0, -np.inf, 0.5, np.nan], np.float32)
    got = token_logprobs(x, 4, 4)
    want = torch.log_softmax(torch.tensor([1.0, 3.0, 3.0, -math.inf, 0.5, -math.inf], dtype=torch.float64), 0)
    assert got.logprob == pytest.approx(float(want[4]), abs=1e-12)
    assert [t for t, _ in got.top] == [1, 2, 0, 4]
    assert [lp for _, lp in got.top] == pytest.approx([float(want[t]) for t in (1, 2, 0, 4)], abs=1e-12)
    assert token_logprobs(x, 3, 0) == type(got)(3, FLOOR, ())  # impossible: OpenAI's floor, valid JSON
    for bad in ((6, 1), (0, 21), (0, -1)):
        with pytest.raises(InvalidArgument):
            token_logprobs(x, *bad)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One home for both models' runtimes: the default guest is compiled once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module", params=list(REFERENCES))
def checked(request, reference_dir, home):
    """(model, the reference's npz and prompts, a default guest instance of a runtime holding it)."""
    name = request.param
    model = request.getfixturevalue(name.split("-")[0])
    path = request.getfixturevalue(name.split("-")[0] + "_path")
    runtime = make_runtime({name: (path, model)}, home)
    stem = reference_dir / REFERENCES[name]
    prompts = json.loads(stem.with_suffix(".logits.json").read_text())["prompts"]
    with np.load(stem.with_suffix(".logits.npz")) as ref, runtime.instance(runtime.default_module(), "lp") as guest:
        yield name, runtime, guest, ref, prompts


def test_first_tokens_logprobs_agree_with_the_references(checked):
    """The first generated token of every reference prompt: its top 20 against the log-softmax
    of llama.cpp's full last-position logits. The reference bounds the mean over all of a
    prompt's positions; one position varies more (gemma3's prompt 2, eager: 0.45), so the
    bound holds for the mean over the prompts here."""
    name, runtime, guest, ref, prompts = checked
    worst, means = 0.0, []
    for i in range(len(prompts) - 1):  # not the last, 840 tokens long: seconds of prefill
        tokens = ref[f"p{i}_tokens"].astype(np.int64).tolist()
        request = greedy_request(runtime, name, "-", 1, prompt_tokens=tokens, top_logprobs=20)
        result = guest.generate(request)
        expected = torch.log_softmax(torch.from_numpy(ref[f"p{i}_last_logits"]).double(), 0)
        assert len(result.logprobs) == len(result.tokens) == 1
        got = result.logprobs[0]
        ids = [t for t, _ in got.top]
        values = [lp for _, lp in got.top]
        assert got.token == ids[0] == int(expected.argmax())  # greedy: the top-1, identical to llama.cpp's
        assert got.logprob == values[0]
        assert values == sorted(values, reverse=True) and len(ids) == len(set(ids)) == 20
        assert sum(math.exp(v) for v in values) <= 1.0
        diffs = np.abs(np.array(values) - expected[ids].numpy())
        worst, means = max(worst, float(diffs.max())), [*means, float(diffs.mean())]
    print(f"{name}: logprobs vs reference at the top 20, mean |diff| per prompt {np.round(means, 3)}, max {worst:.3f}")
    assert np.mean(means) <= MEAN_TOP20_BOUND


def test_sampled_tokens_report_the_raw_distribution_not_the_sampled_one(checked):
    """Temperature, top-k and a logit bias change what is drawn, not what is reported."""
    name, runtime, guest, _, _ = checked
    plain = guest.generate(greedy_request(runtime, name, "The capital of France is", 4, top_logprobs=2))
    first = plain.tokens[0]
    params = SamplingParams(seed=3, temperature=1.5, top_k=5, logit_bias=((first, -100.0),))
    biased = guest.generate(greedy_request(runtime, name, "The capital of France is", 4, params=params, top_logprobs=2))
    assert biased.tokens[0] != first
    assert len(biased.logprobs) == len(biased.tokens) >= 1
    # the banned token is still the most likely under the model's distribution
    assert biased.logprobs[0].top == plain.logprobs[0].top
    assert biased.logprobs[0].logprob < plain.logprobs[0].logprob
    assert guest.generate(greedy_request(runtime, name, "The capital of France is", 2)).logprobs == []
