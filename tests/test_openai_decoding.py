"""logprobs / top_logprobs, logit_bias and n through the official `openai` client, streamed
and not, against a real server running the default guest on the real smollm2-135m."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from test_server import serving, smollm2_settings

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"
KEYS = {"open": "realm-test-open", "pair": "realm-test-pair"}


@pytest.fixture(scope="module")
def server(smollm2_path):
    with serving(smollm2_settings(KEYS, {"pair": {"limits": {"max_n": 3, "max_concurrent": 2}}})) as s:
        yield s


def client(server, tenant: str = "open") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEYS[tenant], max_retries=0)


def test_chat_logprobs_whole_and_streamed(server):
    args = dict(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True, top_logprobs=5)
    whole = client(server).chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 6
    assert b"".join(bytes(e.bytes) for e in content).decode() == whole.choices[0].message.content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
        assert sum(math.exp(t) for t in tops) <= 1.0 and all(t <= 0 for t in tops)
    streamed = [
        e
        for chunk in client(server).chat.completions.create(**args, stream=True)
        for choice in chunk.choices
        if choice.logprobs is not None
        for e in choice.logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client(server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_whole_and_streamed(server):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    whole = client(server).completions.create(**args)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == logprob == top[token]
    chunks = list(client(server).completions.create(**args, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_n_choices_are_seeded_one_after_another(server):
    sampled = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=1.0, extra_body={"top_k": 0})
    three = client(server).completions.create(**sampled, n=3, seed=11)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.text for c in three.choices]
    assert three.usage.completion_tokens == 15 and len(set(texts)) > 1
    assert [client(server).completions.create(**sampled, seed=s).choices[0].text for s in (11, 12)] == texts[:2]
    by_index: dict[int, str] = {}
    chat = client(server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=1.0, seed=5, n=2, stream=True
    )
    finished = set()
    for chunk in chat:
        for c in chunk.choices:
            by_index[c.index] = by_index.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    whole = client(server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, temperature=1.0, seed=5, n=2
    )
    assert finished == {0, 1} and by_index == {c.index: c.message.content for c in whole.choices}


def test_logit_bias_bans_and_forces_tokens(server):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    greedy = client(server).completions.create(**args, logprobs=0)
    first = greedy.choices[0].logprobs.tokens[0]
    banned = client(server).completions.create(**args, logit_bias={str(token_id(server, first)): -100})
    assert not banned.choices[0].text.startswith(first)
    forced = client(server).completions.create(**args, logit_bias={str(token_id(server, " blue")): 100})
    assert forced.choices[0].text == " blue blue blue"


def token_id(server, text: str) -> int:
    body = {"model": MODEL, "content": text, "add_special": False}
    tokens = httpx.post(server.base + "/tokenize", json=body, headers={"Authorization": f"Bearer {KEYS['open']}"})
    (token,) = tokens.json()["tokens"]
    return token


@pytest.mark.parametrize(
    "bad",
    [
        dict(logprobs=True, top_logprobs=21),
        dict(top_logprobs=2),
        dict(logit_bias={"abc": 1}),
        dict(logit_bias={"5": 101}),
        dict(logit_bias={"49152": 1}),
        dict(n=5),
        dict(n=0),
    ],
    ids=str,
)
def test_bad_decoding_requests_are_a_clear_400(server, bad):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, **bad)
    assert e.value.body["param"] == ("top_logprobs" if "top_logprobs" in bad else next(iter(bad)))


def test_n_over_the_tenants_concurrency_is_a_400(server):
    with pytest.raises(openai.BadRequestError, match="requests at once"):
        client(server, "pair").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=3)
