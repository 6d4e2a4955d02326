"""Sampling in llama.cpp's order: greedy, filters, penalties, seeds."""

from __future__ import annotations

import pytest
import torch

from realm.engine.sampling import Sampler, SamplingParams
from realm.errors import InvalidArgument


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def draws(params: SamplingParams, x: torch.Tensor, n: int = 300, history=()) -> set[int]:
    sampler = Sampler(params)
    return {sampler.sample(x, list(history)) for _ in range(n)}


def test_greedy_is_argmax_and_takes_the_lowest_index_on_ties():
    assert Sampler(SamplingParams.greedy()).sample(logits(1, 5, 5, 2), []) == 1


def test_top_k_keeps_only_the_k_largest():
    x = logits(0, 0.1, 0.2, 0.3, 0.4)
    assert draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0), x) == {3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0), x) == {0, 1}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    x = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2), x) == {0, 1}


def test_same_seed_same_tokens_and_other_seeds_differ():
    x = torch.zeros(1000)
    a = [Sampler(SamplingParams(temperature=1.0, top_k=0, min_p=0.0, seed=7)) for _ in range(2)]
    assert [a[0].sample(x, []) for _ in range(20)] == [a[1].sample(x, []) for _ in range(20)]
    firsts = {Sampler(SamplingParams(temperature=1.0, top_k=0, min_p=0.0, seed=s)).sample(x, []) for s in range(20)}
    assert len(firsts) > 1


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0))
    # token 0 (logit 3) was used: 3 / 2 = 1.5 < 2, so greedy picks token 1
    assert sampler.sample(logits(3.0, 2.0, -1.0), [0]) == 1
    out = sampler._penalise(logits(3.0, 2.0, -1.0), [0, 2])
    assert out.tolist() == [1.5, 2.0, -2.0]


def test_frequency_and_presence_penalties_count_occurrences():
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25))
    out = sampler._penalise(logits(1.0, 1.0), [0, 0, 0])
    assert out.tolist() == [1.0 - 1.5 - 0.25, 1.0]


def test_penalty_window_is_repeat_last_n():
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=10.0, repeat_last_n=2))
    assert sampler._penalise(logits(1.0, 1.0, 1.0), [0, 1, 2]).tolist() == pytest.approx([1.0, 0.1, 0.1])


@pytest.mark.parametrize(
    "bad", [dict(temperature=-1), dict(top_p=0.0), dict(min_p=1.5), dict(top_k=-1), dict(repeat_penalty=0)]
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(InvalidArgument):
        SamplingParams(**bad)
