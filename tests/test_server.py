"""The HTTP server end to end: a real uvicorn server on loopback, the official `openai`
client, real guests in real Wasmtime sandboxes, the real smollm2-135m model.

One server for the module, with these tenants:
  alpha  default guest                      beta   guest/examples/upper.c (upper case)
  gamma  default guest                      delta  may use no model (403)
  tiny   1 request at a time, max_tokens 8  rate   30 tokens per minute
  trap   a guest that traps (502)        slow   a guest that loops, 0.2 s time limit
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from realm.errors import PermissionDenied
from realm.sandbox import toolchain
from realm.server import create_app
from realm.server.host import Host
from realm.server.keys import hash_key
from realm.server.metrics import Metrics
from realm.server.schemas import ChatRequest
from realm.server.settings import ServerSettings

MODEL = "smollm2-135m"
KEYS = {t: f"realm-test-key-{t}" for t in ("alpha", "beta", "gamma", "delta", "tiny", "rate", "trap", "slow")}
MAX_BODY = 256 * 1024
TRAP_WAT = """(module
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) i32.const 65536)
  (func (export "generate") (result i32) unreachable))
"""
LOOP_WAT = """(module
  (memory (export "memory") 1)
  (func (export "realm_guest_abi") (result i32) i32.const 65536)
  (func (export "generate") (result i32) (loop (br 0)) i32.const 0))
"""
QUESTION = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


class Server:
    def __init__(self, app, port: int, thread: threading.Thread, uv: uvicorn.Server) -> None:
        self.app, self.port, self.thread, self.uv = app, port, thread, uv
        self.base = f"http://127.0.0.1:{port}"

    def client(self, tenant: str | None, **kw) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base + "/v1", api_key=KEYS.get(tenant, tenant or "none"), max_retries=0, **kw
        )

    def headers(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[tenant]}"}

    def metrics(self) -> str:
        return httpx.get(self.base + "/metrics").text


def start(app) -> Server:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return Server(app, port, thread, uv)


def stop(server: Server) -> None:
    server.uv.should_exit = True
    server.thread.join(timeout=30)


def wait_ready(server: Server, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.base + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready in {timeout} s: {server.app.state.host.load_error}")


def smollm2_settings(keys: dict[str, str], tenants: dict[str, dict] | None = None, **top: object) -> ServerSettings:
    """A server of smollm2-135m on the CPU and a free port, one tenant per key (its name ->
    its plain key), each with `tenants[name]`'s settings besides; `top`: server settings."""
    return ServerSettings.model_validate({
        "port": 0,
        "backend": "cpu",
        "models": [MODEL],
        **top,
        "tenants": [{"name": t, "keys": [hash_key(k)], **(tenants or {}).get(t, {})} for t, k in keys.items()],
    })  # fmt: skip


@contextmanager
def serving(settings: ServerSettings) -> Iterator[Server]:
    """A server for `settings`, ready; stopped after. The server sets torch's thread count
    for itself; other test modules get theirs back."""
    threads = torch.get_num_threads()
    s = start(create_app(settings))
    try:
        wait_ready(s)
        yield s
    finally:
        stop(s)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def guests(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("guests")
    trap = out / "trap.wat"
    trap.write_text(TRAP_WAT)
    loop = out / "loop.wat"
    loop.write_text(LOOP_WAT)
    upper = toolchain.build(toolchain.EXAMPLES_DIR / "upper.c", out / "upper.wasm", force=True)
    return {"upper": upper, "trap": trap, "loop": loop}


@pytest.fixture(scope="module")
def server(smollm2_path, guests):
    tenants = {
        "beta": {"guest": str(guests["upper"])},
        "gamma": {"limits": {"max_concurrent": 4}},
        "delta": {"models": []},
        "tiny": {"limits": {"max_concurrent": 1, "max_tokens": 8}},
        "rate": {"limits": {"tokens_per_minute": 30}},
        "trap": {"guest": str(guests["trap"])},
        "slow": {"guest": str(guests["loop"]), "limits": {"guest_seconds": 0.2, "guest_memory_mb": 16}},
    }
    with serving(smollm2_settings(KEYS, tenants, max_body_bytes=MAX_BODY)) as s:
        yield s


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            found = dict(re.findall(r'(\w+)="([^"]*)"', head))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(value)
    return 0.0


def chat(client: openai.OpenAI, stream: bool = False, **kw):
    args = dict(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, seed=7)
    args.update(kw)
    return client.chat.completions.create(stream=stream, **args)


def streamed_text(chunks) -> tuple[str, str | None, object]:
    text, finish, usage = [], None, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for choice in c.choices:
            delta = getattr(choice, "delta", None)
            piece = delta.content if delta is not None else choice.text
            text.append(piece or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


# ---------------------------------------------------------------------------- the openai client


def test_chat_streamed_equals_plain(server):
    client = server.client("alpha")
    plain = chat(client)
    assert plain.object == "chat.completion" and plain.model == MODEL
    message = plain.choices[0].message
    assert message.role == "assistant" and message.content
    assert plain.choices[0].finish_reason in ("stop", "length")
    text, finish, usage = streamed_text(chat(client, stream=True, stream_options={"include_usage": True}))
    assert text == message.content
    assert finish == plain.choices[0].finish_reason
    assert usage == plain.usage
    assert plain.usage.completion_tokens <= 12
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens


def test_completion_streamed_equals_plain_and_usage_is_real(server):
    client = server.client("alpha")
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, seed=3)
    assert plain.object == "text_completion"
    choice = plain.choices[0]
    assert choice.text and choice.finish_reason == "length"
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text, finish, usage = streamed_text(chunks)
    assert text == choice.text and finish == "length"
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 2  # token by token, not at once
    # usage: the prompt's tokens as the model tokenizes it; one completion token per step
    tokens = httpx.post(
        server.base + "/tokenize", json={"model": MODEL, "content": PROMPT}, headers=server.headers("alpha")
    ).json()["tokens"]
    assert plain.usage.prompt_tokens == len(tokens)
    assert plain.usage.completion_tokens == 8
    assert usage == plain.usage
    back = httpx.post(
        server.base + "/detokenize", json={"model": MODEL, "tokens": tokens}, headers=server.headers("alpha")
    ).json()["content"]
    assert back.strip() == PROMPT


def test_sampling_parameters_and_seed(server):
    client = server.client("alpha")
    args = dict(
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0.9,
        top_p=0.9,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        stop=["\n\n"],
        extra_body={"top_k": 30, "min_p": 0.02, "repeat_penalty": 1.1},
    )
    a = client.completions.create(model=MODEL, **args).choices[0].text
    b = client.completions.create(model=MODEL, **args).choices[0].text
    assert a == b  # same seed, same text
    stop = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, stop=["."])
    assert "." not in stop.choices[0].text and stop.choices[0].finish_reason == "stop"


def test_models_listing_is_per_tenant(server):
    models = server.client("alpha").models.list().data
    assert [m.id for m in models] == [MODEL]
    extra = models[0].model_extra
    assert re.fullmatch(r"[0-9a-f]{64}", extra["sha256"])
    assert extra["info"]["architecture"] == "llama" and extra["info"]["context_length"] == 8192
    assert server.client("delta").models.list().data == []
    assert server.client("alpha").models.retrieve(MODEL).id == MODEL


def test_a_model_named_by_its_sha256(server):
    client = server.client("alpha")
    sha = client.models.retrieve(MODEL).model_extra["sha256"]
    pinned = "sha256:" + sha.upper()  # the hex in either case
    by_hash = chat(client, model=pinned)
    assert by_hash.model == MODEL  # the reply names the model it was served under
    assert by_hash.choices[0].message.content == chat(client).choices[0].message.content
    args = dict(prompt=PROMPT, max_tokens=4, temperature=0)
    text, finish, _ = streamed_text(client.completions.create(model=pinned, stream=True, **args))
    assert text == client.completions.create(model=MODEL, **args).choices[0].text and finish == "length"
    card = client.models.retrieve(pinned)
    assert card.id == MODEL and card.model_extra["sha256"] == sha
    # the guest's realm_validate_model_id gets the hash the client pinned
    host = server.app.state.host
    job = host.plan(host.tenants["alpha"], pinned, ChatRequest(messages=QUESTION))
    assert (job.request["model"], job.request["model_sha256"]) == (MODEL, sha)

    wrong = "sha256:" + ("1" if sha[0] == "0" else "0") + sha[1:]
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, model=wrong)
    assert e.value.body["type"] == "not_found_error" and wrong[7:] in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(wrong)
    with pytest.raises(openai.PermissionDeniedError) as e:  # delta may use no model
        chat(server.client("delta"), model=pinned)
    assert e.value.body["type"] == "permission_error"
    with pytest.raises(openai.PermissionDeniedError):
        server.client("delta").models.retrieve(pinned)
    with pytest.raises(openai.NotFoundError):  # not 64 hex digits: a name no model has
        chat(client, model="sha256:" + sha[:63])


# ---------------------------------------------------------------------------- tenants and guests


def test_two_tenants_two_guests(server):
    plain = chat(server.client("alpha"))
    upper = chat(server.client("beta"))
    assert plain.choices[0].message.content.upper() == upper.choices[0].message.content
    assert any(c.islower() for c in plain.choices[0].message.content)
    assert upper.usage == plain.usage
    text, _, _ = streamed_text(chat(server.client("beta"), stream=True))
    assert text == upper.choices[0].message.content


def test_eight_concurrent_streams_across_three_tenants_are_batched(server):
    before = server.metrics()
    batches_before = metric(before, "realm_batch_size_count", model=MODEL)
    singles_before = metric(before, "realm_batch_size_bucket", model=MODEL, le="1.0")
    tenants = ["alpha", "beta", "gamma"] * 3
    tenants = tenants[:8]
    prompts = [f"Write a sentence about the number {i}." for i in range(8)]
    barrier = threading.Barrier(8)

    def one(i: int):
        client = server.client(tenants[i])
        barrier.wait()
        chunks = chat(
            client,
            stream=True,
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=16,
            stream_options={"include_usage": True},
        )
        return streamed_text(chunks)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for tenant, (text, finish, usage) in zip(tenants, results):
        assert finish in ("stop", "length") and text
        assert usage.completion_tokens == 16 if finish == "length" else 0 < usage.completion_tokens <= 16
        if tenant == "beta":
            assert text == text.upper()
    after = server.metrics()
    batches = metric(after, "realm_batch_size_count", model=MODEL) - batches_before
    singles = metric(after, "realm_batch_size_bucket", model=MODEL, le="1.0") - singles_before
    assert batches > 0 and batches - singles > 0, "no forward call batched more than one sequence"
    assert metric(after, "realm_batch_size_sum", model=MODEL) > metric(before, "realm_batch_size_sum", model=MODEL)
    for tenant in ("alpha", "beta", "gamma"):
        assert metric(after, "realm_active_requests", tenant=tenant) == 0


def test_disconnect_stops_generation(server):
    before = server.metrics()
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST",
            server.base + "/v1/completions",
            headers=server.headers("gamma"),
            json={
                "model": MODEL,
                "prompt": "Count: one, two, three,",
                "max_tokens": 1000,
                "temperature": 0,
                "stream": True,
            },
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = server.metrics()
        if metric(now, "realm_active_requests", tenant="gamma") == 0:
            break
        time.sleep(0.1)
    assert metric(now, "realm_active_requests", tenant="gamma") == 0, "the guest kept running"
    gone = metric(now, "realm_requests_total", tenant="gamma", status="499") - metric(
        before, "realm_requests_total", tenant="gamma", status="499"
    )
    assert gone == 1
    generated = metric(now, "realm_completion_tokens_total", tenant="gamma") - metric(
        before, "realm_completion_tokens_total", tenant="gamma"
    )
    assert generated == 0  # an abandoned request is not counted as completed
    assert chat(server.client("gamma")).choices[0].message.content  # the tenant keeps working


# ---------------------------------------------------------------------------- errors


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_401_without_or_with_a_bad_key(server):
    r = httpx.post(server.base + "/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        chat(server.client("not-a-key"))
    r = httpx.get(server.base + "/v1/models", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_403_model_not_allowed_and_404_unknown_model(server):
    with pytest.raises(openai.PermissionDeniedError) as e:
        chat(server.client("delta"))
    assert e.value.status_code == 403 and e.value.body["type"] == "permission_error"
    with pytest.raises(openai.NotFoundError) as e:
        chat(server.client("alpha"), model="no-such-model")
    assert e.value.status_code == 404 and "no-such-model" in e.value.message


def test_400_malformed_requests(server):
    h = server.headers("alpha")
    url = server.base + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
    r = httpx.post(url, json={"model": MODEL}, headers=h)
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, headers=h)
    assert r.status_code == 400 and error_of(r)["param"].startswith("messages[0].role")
    with pytest.raises(openai.BadRequestError):
        chat(server.client("alpha"), temperature=-1)
    with pytest.raises(openai.BadRequestError):
        chat(server.client("alpha"), n=5)  # over the tenant's max_n (4)
    with pytest.raises(openai.BadRequestError) as e:  # over the tenant's max_tokens per request
        chat(server.client("tiny"), max_tokens=9)
    assert "max_tokens" in e.value.message


def test_400_prompt_longer_than_the_context(server):
    long_prompt = "hello " * 9000  # > 8192 tokens, < the body limit
    with pytest.raises(openai.BadRequestError) as e:
        server.client("alpha").completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_overflow" and "8192" in e.value.message


def test_413_body_too_large(server):
    body = {"model": MODEL, "prompt": "x" * (MAX_BODY + 1)}
    r = httpx.post(server.base + "/v1/completions", json=body, headers=server.headers("alpha"))
    assert r.status_code == 413 and error_of(r)["type"] == "invalid_request_error"


def test_429_concurrency_limit(server):
    client = server.client("tiny")
    with httpx.Client(timeout=60) as http:
        with http.stream(
            "POST",
            server.base + "/v1/completions",
            headers=server.headers("tiny"),
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "stream": True},
        ) as first:
            assert first.status_code == 200
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
            assert int(e.value.response.headers["Retry-After"]) >= 1
            assert e.value.body["type"] == "rate_limit_error"
            for _ in first.iter_lines():
                pass
    deadline = time.monotonic() + 30
    while metric(server.metrics(), "realm_active_requests", tenant="tiny") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4).choices[0].text


def test_429_tokens_per_minute(server):
    client = server.client("rate")  # 30 tokens a minute; this request may use 5 + 16
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert int(e.value.response.headers["Retry-After"]) >= 1
    with pytest.raises(openai.BadRequestError):  # more than a whole minute's worth
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100)


def test_guest_failure_is_reported_and_the_server_keeps_serving(server):
    before = metric(server.metrics(), "realm_guest_traps_total", tenant="trap")
    with pytest.raises(openai.APIStatusError) as e:
        chat(server.client("trap"))
    assert e.value.status_code == 502 and e.value.body["type"] == "guest_error"
    assert "unreachable" in e.value.message and "trap" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:  # streamed: the error comes before any output
        list(chat(server.client("trap"), stream=True))
    assert e.value.status_code == 502
    assert metric(server.metrics(), "realm_guest_traps_total", tenant="trap") == before + 2
    assert chat(server.client("alpha")).choices[0].message.content


def test_tenant_limits_reach_the_guest(server):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        chat(server.client("slow"))
    assert e.value.status_code == 502 and "time limit of 0.2 s" in e.value.message
    assert "16 MiB cap" in e.value.message
    assert time.monotonic() - started < 10


def test_host_functions_refuse_models_the_tenant_may_not_use(server):
    host = server.app.state.host
    store = host.runtime.models
    with pytest.raises(PermissionDenied):  # what realm_store_model_by_name asks on delta's behalf
        store.by_name(MODEL, allowed=host.tenants["delta"].allowed)
    entry = store.by_name(MODEL, allowed=host.tenants["alpha"].allowed)
    with pytest.raises(PermissionDenied):
        store.validate(entry.id, entry.sha256, allowed=host.tenants["delta"].allowed)
    store.release(entry.id)
    assert not host.tenants["alpha"].allowed("gemma3-270m")  # served models only


def test_unknown_endpoint_is_404_in_the_error_shape(server):
    r = httpx.get(server.base + "/v1/nothing", headers=server.headers("alpha"))
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"


# ---------------------------------------------------------------------------- health and metrics


def test_health_and_metrics(server):
    """What /metrics counts, after requests of this test's own (it must pass alone)."""
    r = httpx.get(server.base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["models"] == [MODEL]
    assert r.json()["decode_steps"][MODEL] in ("compiled", "eager", "building")
    chat(server.client("alpha"), max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        chat(server.client("delta"))
    text = server.metrics()
    for name in (
        "realm_requests_total",
        "realm_prompt_tokens_total",
        "realm_completion_tokens_total",
        "realm_time_to_first_token_seconds_bucket",
        "realm_time_per_output_token_seconds_bucket",
        "realm_batch_size_bucket",
        "realm_queue_depth",
        "realm_guest_traps_total",
    ):
        assert name in text, name
    assert metric(text, "realm_requests_total", tenant="alpha", model=MODEL, status="200") > 0
    assert metric(text, "realm_requests_total", tenant="delta", model=MODEL, status="403") > 0


class GatedHost(Host):
    """A host whose loading waits for the test to open the gate (or never loads)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()

    def load(self) -> None:
        self.gate.wait()
        raise RuntimeError("the test stopped loading")


def test_health_is_503_until_loaded():
    settings = ServerSettings(port=0)
    host = GatedHost(settings, Metrics())
    s = start(create_app(settings, host=host))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(s.base + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.status_code == 503 and error_of(r)["type"] == "server_error"
        r = httpx.post(s.base + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert r.status_code == 503
    finally:
        host.gate.set()
        stop(s)


def test_default_settings_serve_one_open_tenant(smollm2_path):
    """What `realm serve` with no arguments serves: the default model, no key needed (the
    openai client always sends one: any key is the open tenant's on a server with no keys)."""
    with serving(ServerSettings(port=0)) as s:
        r = httpx.post(s.base + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="anything", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
