"""Structured output end to end: a real server on smollm2-135m, the official `openai` client,
the default guest in Wasmtime, llguidance's masks. `response_format` (json_object and
json_schema), llama.cpp's `json_schema` and `grammar` fields and a `regex` field; every
schema of tests/schema_suite.py validates with `jsonschema`; bad constraints are 400s
before admission; the grammar cache is bounded per tenant."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from schema_suite import SCHEMAS
from test_server import Server, serving, smollm2_settings, streamed_text

from realm.engine import grammar

MODEL = "smollm2-135m"
KEYS = {t: f"realm-structured-{t}" for t in ("alpha", "beta")}


@pytest.fixture(scope="module")
def server(smollm2_path):
    with serving(smollm2_settings(KEYS, dict.fromkeys(KEYS, {"limits": {"max_concurrent": 8}}))) as s:
        yield s


def client(server: Server, tenant: str = "alpha") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEYS[tenant], max_retries=0)


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(server: Server, question: str, max_tokens: int = 80, tenant: str = "alpha", **kw):
    return client(server, tenant).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0, **kw
    )


def test_every_schema_of_the_suite_validates(server):
    def run(name: str):
        question, schema = SCHEMAS[name]
        return ask(server, question, response_format=json_schema_format(name, schema))

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # at once: one batched step for all of them
        replies = dict(zip(SCHEMAS, pool.map(run, SCHEMAS)))
    for name, reply in replies.items():
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name][1])


def test_json_object_parses_and_streams_the_same_text(server):
    fmt = {"type": "json_object"}
    question = 'Reply with a JSON object with one key, "answer", for: what is 2+2?'
    whole = ask(server, question, 30, response_format=fmt)
    assert whole.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(whole.choices[0].message.content), dict)
    chunks = ask(server, question, 30, response_format=fmt, stream=True)
    text, finish, _ = streamed_text(chunks)
    assert text == whole.choices[0].message.content and finish == "stop"


def test_llama_cpp_fields_regex_and_gbnf_constrain_completions(server):
    c = client(server)
    schema = SCHEMAS["enums"][1]
    out = ask(server, SCHEMAS["enums"][0], 30, extra_body={"json_schema": schema}).choices[0].message.content
    jsonschema.validate(json.loads(out), schema)
    phone = c.completions.create(
        model=MODEL, prompt="Call me at", max_tokens=12, temperature=0, extra_body={"regex": r" \d{3}-\d{4}"}
    )
    assert re.fullmatch(r" \d{3}-\d{4}", phone.choices[0].text) and phone.choices[0].finish_reason == "stop"
    gbnf = 'root ::= " " ("yes" | "no") "!"'
    answer = c.completions.create(
        model=MODEL, prompt="Is water wet?", max_tokens=8, temperature=0, extra_body={"grammar": gbnf}
    )
    assert answer.choices[0].text in (" yes!", " no!")


@pytest.mark.parametrize(
    "extra,param,message",
    [
        ({"response_format": json_schema_format("x", {"type": "strin"})}, "response_format", "does not compile"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            "JSON Schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
        ({"regex": "a(b"}, "regex", "unclosed group"),
        ({"grammar": "root ::= nowhere"}, "grammar", "not found"),
        ({"json_schema": {"enum": ["x" * 70_000]}}, "json_schema", "the most is"),
        ({"regex": "a+", "grammar": 'root ::= "a"'}, "regex", "at most one"),
        ({"tool_choice": "required"}, "tool_choice", "the request has no tools"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(server, extra, param, message):
    with pytest.raises(openai.BadRequestError, match=message) as caught:
        ask(server, "Hi", 4, extra_body=extra)
    if param is not None:
        assert caught.value.body["param"] == param


def test_the_grammar_cache_is_bounded_per_tenant(server):
    grammars = server.app.state.host.runtime.grammars
    before = grammars.size("beta")
    grammars.per_tenant = 3  # a small bound, to see it hold without many requests
    try:
        for i in range(5):  # five unique patterns: the tenant keeps only the last three
            ask(server, "Count:", 2, tenant="beta", extra_body={"regex": f"[0-9]{{{i + 1}}}"})
        assert grammars.size("beta") == 3
        assert grammars.size("alpha") >= 1  # another tenant's grammars are its own
    finally:
        grammars.per_tenant = max(before, 32)


# ---------------------------------------------------------------------------- tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def tool_chat(server: Server, messages: list, max_tokens: int = 40, **kw):
    return client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, tools=[WEATHER, TIME], **kw
    )


def test_a_required_tool_call_follows_the_functions_schema_whole_and_streamed(server):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = tool_chat(server, WEATHER_QUESTION, tool_choice=choice).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    (call,) = reply.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed: dict = {"name": "", "arguments": ""}
    finish = None
    for chunk in tool_chat(server, WEATHER_QUESTION, tool_choice=choice, stream=True):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for delta in c.delta.tool_calls or ():
                streamed["name"] += delta.function.name or ""
                streamed["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and streamed == {"name": "get_weather", "arguments": call.function.arguments}

    # the tool's result continues the conversation; "none" lets the model answer in text
    history = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    answer = tool_chat(server, history, 12, tool_choice="none").choices[0]
    assert answer.message.content and not answer.message.tool_calls


def test_required_picks_one_of_the_tools_and_bad_tool_requests_are_400(server):
    reply = tool_chat(server, [{"role": "user", "content": "What time is it?"}], tool_choice="required").choices[0]
    (call,) = reply.message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        tool_chat(server, WEATHER_QUESTION, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="cannot be used together"):
        tool_chat(server, WEATHER_QUESTION, response_format={"type": "json_object"})


def test_a_constraint_with_logprobs_and_n_choices_whole_and_streamed(server):
    """Every choice is constrained, carries its tokens' log-probabilities, and streams the
    same text, tool calls included, each under its own index."""
    sampled = {"extra_body": {"temperature": 0.9}}  # over ask()'s greedy default: the choices differ
    short = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    short |= {"additionalProperties": False}
    form = json_schema_format("cat", short)
    args = dict(response_format=form, logprobs=True, top_logprobs=2, n=2, seed=7, **sampled)
    whole = ask(server, "Name a cat, as JSON.", 60, **args)
    assert [c.index for c in whole.choices] == [0, 1]
    for c in whole.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), short)
        assert b"".join(bytes(e.bytes) for e in c.logprobs.content).decode() == c.message.content
    texts = {0: "", 1: ""}
    for chunk in ask(server, "Name a cat, as JSON.", 60, stream=True, **args):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == {c.index: c.message.content for c in whole.choices}

    choice = {"type": "function", "function": {"name": "get_weather"}}
    calls: dict[int, dict] = {0: {}, 1: {}}
    for chunk in tool_chat(server, WEATHER_QUESTION, tool_choice=choice, stream=True, n=2, seed=3, **sampled):
        for c in chunk.choices:
            for delta in c.delta.tool_calls or ():
                calls[c.index]["name"] = calls[c.index].get("name") or delta.function.name
                calls[c.index]["arguments"] = calls[c.index].get("arguments", "") + (delta.function.arguments or "")
    for call in calls.values():
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_the_vocabulary_for_masks_is_built_by_the_first_constrained_request(smollm2_path):
    """A server that serves no structured output spends nothing on llguidance's view of the
    vocabulary (27 MiB on smollm2, 130 MiB on gemma3); the first constrained request builds it."""
    with serving(smollm2_settings(KEYS, dict.fromkeys(KEYS, {}))) as s:
        ask(s, "Hi", max_tokens=2)
        tokenizer = s.app.state.host.models[MODEL].model.tokenizer
        assert tokenizer not in grammar._tokenizers
        ask(s, "Hi", max_tokens=2, response_format={"type": "json_object"})
        assert tokenizer in grammar._tokenizers


def test_grammars_at_load_builds_the_vocabulary_with_the_model(smollm2_path):
    """An operator who serves structured output can have that build happen at load, where
    the first constrained request would wait for it."""
    with serving(smollm2_settings(KEYS, dict.fromkeys(KEYS, {}), grammars_at_load=True)) as s:
        assert s.app.state.host.models[MODEL].model.tokenizer in grammar._tokenizers
        reply = ask(s, "Hi", max_tokens=8, response_format={"type": "json_object"})
        assert reply.choices[0].message.content.startswith("{")
