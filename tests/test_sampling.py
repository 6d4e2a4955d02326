"""Sampling in llama.cpp's order: greedy, filters, penalties, seeds; the one generator; and
the default guest choosing, seed for seed, the very tokens the host chooses."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from sandbox_helpers import greedy_request, make_runtime

from realm.engine.sampling import Sampler, SamplingParams, Xoshiro256, exp64, splitmix64
from realm.errors import InvalidArgument

SMOL = "smollm2-135m"


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def draws(params: SamplingParams, x: torch.Tensor, n: int = 300, history=()) -> set[int]:
    sampler = Sampler(params)
    return {sampler.sample(x, list(history)) for _ in range(n)}


def penalised(sampler: Sampler, values: tuple[float, ...], history: list[int]) -> list[float]:
    return sampler._penalise(np.array(values, dtype=np.float32), history).tolist()


# ---------------------------------------------------------------------------- the generator


def test_xoshiro256_starstar_gives_the_reference_outputs():
    # from the reference xoshiro256starstar.c, state {1, 2, 3, 4}
    expected = [
        11520, 0, 1509978240, 1215971899390074240, 1216172134540287360,
        607988272756665600, 16172922978634559625, 8476171486693032832,
        10595114339597558777, 2904607092377533576,
    ]  # fmt: skip
    rng = Xoshiro256([1, 2, 3, 4])
    assert [rng.next_u64() for _ in expected] == expected


def test_splitmix64_gives_the_reference_outputs_and_seeds_the_state():
    # from the reference splitmix64.c, seeds 1234567 and 0
    state, outputs = 1234567, []
    for _ in range(5):
        state, out = splitmix64(state)
        outputs.append(out)
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                       4593380528125082431, 16408922859458223821]  # fmt: skip
    assert Xoshiro256.seeded(0).s[:3] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert Xoshiro256.seeded(-1).s == Xoshiro256.seeded(2**64 - 1).s  # seeds are taken mod 2^64


def test_a_uniform_is_the_top_53_bits_times_two_to_the_minus_53():
    rng, reference = Xoshiro256([1, 2, 3, 4]), Xoshiro256([1, 2, 3, 4])
    for _ in range(10):
        assert rng.uniform() == (reference.next_u64() >> 11) * 2.0**-53


# ---------------------------------------------------------------------------- exp


def rt_exp(x: float) -> float:
    """rt_exp of guest/include/realm_rt.h, one scalar operation at a time (docs/ABI.md)."""
    if x != x:
        return x
    if x > 709.0:
        return math.inf
    if x < -745.0:
        return 0.0
    k = float(round(x * 1.44269504088896338700))
    r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10
    term = total = 1.0
    for i in range(1, 15):
        term *= r / i
        total += term
    return math.ldexp(total, int(k))


def test_exp64_is_rt_exp_bit_for_bit_and_within_a_few_ulps_of_exp():
    rng = random.Random(5)
    xs = [rng.uniform(-40, 0) for _ in range(5000)] + [rng.uniform(-760, 720) for _ in range(5000)]
    xs += [0.0, -0.0, -math.inf, math.inf, math.nan, -745.0, -744.5, 709.0, -708.5, -0.34657359027997264]
    got = exp64(np.array(xs)).tolist()
    for x, y in zip(xs, got):
        want = rt_exp(x)
        assert y == want or (math.isnan(y) and math.isnan(want)), x
        if -700 < x < 700:
            assert abs(y - math.exp(x)) <= 4 * math.ulp(math.exp(x)), x


# ---------------------------------------------------------------------------- the sampler


def test_greedy_is_argmax_and_takes_the_lowest_index_on_ties():
    assert Sampler(SamplingParams.greedy()).sample(logits(1, 5, 5, 2), []) == 1
    assert Sampler(SamplingParams.greedy()).sample(logits(1, math.nan, 5, math.nan), []) == 1


def test_top_k_keeps_only_the_k_largest():
    x = logits(0, 0.1, 0.2, 0.3, 0.4)
    assert draws(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0), x) == {3, 4}


def test_top_k_breaks_ties_at_the_kth_logit_by_the_lower_id():
    x = logits(1, 3, 1, 1, 3, 1)
    assert draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0), x) == {0, 1, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.7, min_p=0.0), x) == {0, 1}


def test_top_p_over_a_large_vocabulary_looks_past_its_first_sorted_head():
    # 2000 equal tokens: reaching top_p = 0.9 takes 1800 of them, past the first head of 256
    x = torch.zeros(2000)
    drawn = draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0), x, n=2000)
    assert 1024 < max(drawn) < 1800


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    x = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2), x) == {0, 1}


def test_nan_logits_are_never_drawn_and_an_infinite_best_is_taken_without_a_draw():
    free = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    assert draws(SamplingParams(**free), logits(0, math.nan, 0, math.nan)) == {0, 2}
    assert draws(SamplingParams(**free), logits(0, math.inf, 5, math.inf)) == {1}
    assert draws(SamplingParams(**free), logits(-math.inf, -math.inf, -math.inf)) == {0}


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
    assert penalised(sampler, (3.0, 2.0, -1.0), [0, 2]) == [1.5, 2.0, -2.0]


def test_frequency_and_presence_penalties_count_occurrences():
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25))
    assert penalised(sampler, (1.0, 1.0), [0, 0, 0]) == [1.0 - 1.5 - 0.25, 1.0]


def test_penalties_are_computed_in_float64_and_rounded_once_to_float32():
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=3.0, presence_penalty=0.1))
    x = np.float32(1.1)
    assert penalised(sampler, (float(x),), [0]) == [float(np.float32(float(x) / 3.0 - 0.1))]


def test_penalty_window_is_repeat_last_n():
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=10.0, repeat_last_n=2))
    assert penalised(sampler, (1.0, 1.0, 1.0), [0, 1, 2]) == pytest.approx([1.0, 0.1, 0.1])


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-1),
        dict(temperature=math.inf),
        dict(top_p=0.0),
        dict(min_p=1.5),
        dict(top_k=-1),
        dict(repeat_penalty=0),
    ],
)
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(InvalidArgument):
        SamplingParams(**bad)


# ---------------------------------------------------------------------------- guest and host


@pytest.fixture(scope="module")
def runtime(smollm2, smollm2_path, tmp_path_factory):
    return make_runtime({SMOL: (smollm2_path, smollm2)}, tmp_path_factory.mktemp("realm_home"))


@pytest.fixture(scope="module")
def instance(runtime):
    with runtime.instance(runtime.default_module(), tenant="sampling") as inst:
        yield inst


SEEDED = [
    dict(seed=1),  # llama.cpp's defaults: top-k 40, top-p 0.95, min-p 0.05, temperature 0.8
    dict(seed=2, temperature=1.5, top_k=0, top_p=0.9, min_p=0.0),  # top-p over the whole vocabulary
    dict(seed=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),  # one draw over the whole vocabulary
    dict(
        seed=2**64 - 1,
        temperature=0.7,
        top_k=10,
        top_p=0.8,
        min_p=0.1,
        repeat_penalty=1.3,
        presence_penalty=0.3,
        frequency_penalty=0.5,
    ),
]


PROMPT, TOKENS = "Once upon a time", 32


@pytest.fixture(scope="module")
def greedy_tokens(smollm2) -> list[int]:
    greedy = smollm2.generate(PROMPT, TOKENS, SamplingParams.greedy(), [])
    list(greedy)
    return greedy.tokens


@pytest.mark.parametrize("settings", SEEDED, ids=[f"seed{i}" for i in range(len(SEEDED))])
def test_the_default_guest_samples_the_hosts_tokens_seed_for_seed(runtime, instance, smollm2, greedy_tokens, settings):
    params = SamplingParams(**settings)
    host = smollm2.generate(PROMPT, TOKENS, params, [])
    pieces = list(host)
    guest = instance.generate(greedy_request(runtime, SMOL, PROMPT, TOKENS, params=params))
    assert guest.tokens == host.tokens
    assert guest.text == host.text == "".join(p.text for p in pieces)
    assert host.tokens != greedy_tokens  # it did sample
