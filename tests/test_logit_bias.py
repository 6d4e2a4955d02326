"""OpenAI's logit_bias: first in the sampling chain, one float32 addition per biased token,
the same in the default guest and on the host, token for token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sandbox_helpers import greedy_request, make_runtime

from realm.engine.sampling import Sampler, SamplingParams
from realm.errors import InvalidArgument

SMOL = "smollm2-135m"
PROMPT, TOKENS = "Once upon a time", 4


def test_bias_is_one_float32_addition_before_the_penalties():
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0, logit_bias=((1, 0.1), (0, -3))))
    x = np.array([3.0, 2.0, -1.0], np.float32)
    biased = sampler._bias(x.copy())
    assert biased.tolist() == [np.float32(3.0) + np.float32(-3), np.float32(2.0) + np.float32(0.1), -1.0]
    # biased first: token 0 goes to 0 and its penalty leaves it 0; token 1, 2.1, wins
    assert sampler.sample(torch.from_numpy(x), [0]) == 1


@pytest.mark.parametrize("bias", [((0, 100.5),), ((0, float("nan")),), ((-1, 1.0),), ((3, 1.0), (3, 2.0))], ids=str)
def test_bad_biases_are_refused(bias):
    with pytest.raises(InvalidArgument):
        SamplingParams(logit_bias=bias)


def test_a_token_outside_the_vocabulary_is_refused_when_sampling():
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        Sampler(SamplingParams(logit_bias=((5, 1.0),))).sample(torch.zeros(3), [])


@pytest.fixture(scope="module")
def runtime(smollm2, smollm2_path, tmp_path_factory):
    return make_runtime({SMOL: (smollm2_path, smollm2)}, tmp_path_factory.mktemp("realm_home"))


def test_guest_and_host_agree_and_the_bias_moves_the_tokens(runtime, smollm2):
    plain = smollm2.generate(PROMPT, TOKENS, SamplingParams.greedy())
    list(plain)
    first = plain.tokens[0]
    other = smollm2.tokenizer.encode(" dragon")[0]
    banned = SamplingParams(temperature=0.0, logit_bias=((first, -100.0),))
    drawn = SamplingParams(seed=5, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias=((first, -2.5),))
    forced = SamplingParams(temperature=0.0, logit_bias=((other, 100.0),))
    with runtime.instance(runtime.default_module(), tenant="bias") as guest:
        for params in (banned, drawn):
            host = smollm2.generate(PROMPT, TOKENS, params)
            list(host)
            got = guest.generate(greedy_request(runtime, SMOL, PROMPT, TOKENS, params=params))
            assert got.tokens == host.tokens and got.text == host.text
            if params is banned:
                assert first not in got.tokens
        assert guest.generate(greedy_request(runtime, SMOL, PROMPT, TOKENS, params=forced)).tokens == [other] * TOKENS
        outside = SamplingParams(temperature=0.0, logit_bias=((smollm2.config.vocab_size, 1.0),))
        with pytest.raises(InvalidArgument, match="outside the vocabulary"):
            guest.generate(greedy_request(runtime, SMOL, PROMPT, TOKENS, params=outside))
