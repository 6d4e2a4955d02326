"""A hostile client costs the server nothing: label floods, deep JSON, huge prompts, lax
or non-JSON bodies, floods of streams that leave mid-way. A real uvicorn server on
loopback with the real smollm2-135m, as in test_server.py.

Tenants: alpha (default limits), flood (32 requests at once, max_tokens 8), fuzz
(max_tokens 2). /metrics needs the metrics key or any tenant's key.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_server import MODEL, error_of, metric, serving, smollm2_settings

from realm.server.keys import hash_key
from realm.server.metrics import UNKNOWN_MODEL
from realm.server.openapi import REQUESTS

KEYS = {t: f"realm-robust-{t}" for t in ("alpha", "flood", "fuzz")}
METRICS_KEY = "realm-robust-metrics"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def server(smollm2_path):
    tenants = {"flood": {"limits": {"max_concurrent": 32, "max_tokens": 8}}, "fuzz": {"limits": {"max_tokens": 2}}}
    with serving(smollm2_settings(KEYS, tenants, metrics_keys=[hash_key(METRICS_KEY), "*"])) as s:
        yield s


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def post(server, path: str, body: bytes | str, content_type: str | None = "application/json") -> httpx.Response:
    headers = auth("alpha") | ({"Content-Type": content_type} if content_type else {})
    return httpx.post(server.base + path, content=body, headers=headers, timeout=60)


def metrics(server) -> str:
    r = httpx.get(server.base + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})
    assert r.status_code == 200, r.text
    return r.text


# ---------------------------------------------------------------------------- metrics


def test_no_model_name_a_client_sends_becomes_a_label(server):
    r = post(server, "/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    for i in range(20):
        r = post(server, "/v1/completions", f'{{"model": "no-such-model-{i}", "prompt": "hi"}}')
        assert r.status_code == 404
    text = metrics(server)  # was a 500 (UnicodeEncodeError) from here on
    labels = {line.split('model="')[1].split('"')[0] for line in text.splitlines() if 'model="' in line}
    assert labels <= {MODEL, UNKNOWN_MODEL}
    assert metric(text, "realm_requests_total", tenant="alpha", model=UNKNOWN_MODEL, status="404") >= 21


def test_metrics_keys(server):
    assert httpx.get(server.base + "/metrics").status_code == 401
    r = httpx.get(server.base + "/metrics", headers={"Authorization": "Bearer realm-not-a-key"})
    assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    assert httpx.get(server.base + "/metrics", headers=auth("flood")).status_code == 200  # "*": any tenant's key
    assert "realm_kv_blocks_in_use" in metrics(server)


# ---------------------------------------------------------------------------- bodies


def test_json_nested_beyond_the_parsers_depth_is_400(server):
    for body in ("[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000):
        r = post(server, "/v1/completions", body)
        assert r.status_code == 400 and "nests too deeply" in error_of(r)["message"]
    assert post(server, "/tokenize", f'{{"model": "{MODEL}", "content": "hi"}}').status_code == 200


def test_a_prompt_far_over_the_context_is_refused_before_tokenizing(server):
    prompt = "hello " * 500_000  # 3 MB, about 500,000 tokens: 1.8 s to tokenize
    started = time.perf_counter()
    r = post(server, "/v1/completions", f'{{"model": "{MODEL}", "prompt": "{prompt}", "max_tokens": 4}}')
    took = time.perf_counter() - started
    error = error_of(r)
    assert r.status_code == 400 and error["code"] == "context_overflow"
    assert "3000000 characters" in error["message"] and "8192" in error["message"]
    assert took < 0.5, f"{took:.2f} s"
    messages = f'[{{"role": "user", "content": "{prompt}"}}]'
    r = post(server, "/v1/chat/completions", f'{{"model": "{MODEL}", "messages": {messages}}}')
    assert r.status_code == 400 and error_of(r)["code"] == "context_overflow"
    r = post(server, "/tokenize", f'{{"model": "{MODEL}", "content": "{prompt}"}}')
    assert r.status_code == 400 and "the content has 3000000 characters" in error_of(r)["message"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", "1e999"),  # infinity
        ("temperature", "NaN"),
        ("top_p", '"0.5"'),
        ("max_tokens", "true"),
        ("max_tokens", "2.0"),
        ("top_k", str(2**40)),
        ("seed", str(2**70)),
        ("stream", "1"),
    ],
)
def test_fields_are_strict_finite_and_bounded(server, field, value):
    r = post(server, "/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "{field}": {value}}}')
    assert r.status_code == 400 and error_of(r)["param"] == field


def test_a_body_not_declared_json_is_415(server):
    body = f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": 1}}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        r = post(server, "/v1/completions", body, content_type)
        assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"
    tokenize = f'{{"model": "{MODEL}", "content": "hi"}}'
    assert post(server, "/tokenize", tokenize, "text/plain").status_code == 415
    assert post(server, "/tokenize", tokenize, "application/json; charset=utf-8").status_code == 200


def test_405_names_the_allowed_methods(server):
    r = httpx.post(server.base + "/health")
    assert r.status_code == 405 and r.headers["Allow"] == "GET" and error_of(r)["code"] == "method_not_allowed"
    r = httpx.get(server.base + "/v1/completions", headers=auth("alpha"))
    assert r.status_code == 405 and r.headers["Allow"] == "POST"


# ---------------------------------------------------------------------------- the schema


def test_openapi_declares_every_body_and_answer(server):
    doc = httpx.get(server.base + "/openapi.json").json()
    components = doc["components"]["schemas"]

    def refs(node) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    assert refs(doc) and all(r.removeprefix("#/components/schemas/") in components for r in refs(doc))
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            assert op["responses"]["200"]["content"], (method, path)
            if method == "post":
                body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert body.rsplit("/", 1)[1] in {m.__name__ for m in REQUESTS}
                assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "prompt" in components["CompletionRequest"]["required"]


def test_fuzzing_the_schema_finds_no_5xx(server):
    """A deterministic slice of benchmarks/api_fuzz.py: a few schemathesis cases per operation."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("api_fuzz", BENCHMARKS / "api_fuzz.py")
    assert spec is not None and spec.loader is not None
    api_fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(api_fuzz)
    counts, failures = api_fuzz.fuzz(server.base, auth("fuzz"), examples=3, seed=1)
    assert not failures, failures
    assert sum(counts.values()) >= 25 and {mode for _, mode, _ in counts} == {"positive", "negative"}
    assert any(status == 200 for _, _, status in counts) and any(400 <= status < 500 for _, _, status in counts)


# ---------------------------------------------------------------------------- floods


def test_a_flood_with_clients_leaving_gives_everything_back(server):
    n, aborting = 12, set(range(0, 12, 3))
    outcomes: dict[int, str] = {}
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        body = {"model": MODEL, "prompt": f"Number {i} is", "max_tokens": 4, "temperature": 0, "stream": True}
        barrier.wait()
        with httpx.Client(timeout=120) as http:
            with http.stream("POST", server.base + "/v1/completions", json=body, headers=auth("flood")) as r:
                if r.status_code != 200:
                    outcomes[i] = f"status {r.status_code}"
                    return
                for line in r.iter_lines():
                    if i in aborting and line.startswith("data: {"):
                        outcomes[i] = "left"
                        return
                    if line == "data: [DONE]":
                        outcomes[i] = "done"
                        return

    workers = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert outcomes == {i: "left" if i in aborting else "done" for i in range(n)}
    deadline = time.monotonic() + 30
    while True:
        text = metrics(server)
        held = [
            metric(text, "realm_kv_blocks_in_use", model=MODEL),
            metric(text, "realm_queue_depth", model=MODEL),
            metric(text, "realm_active_requests", tenant="flood"),
        ]
        if not any(held) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert held == [0, 0, 0], "KV blocks, queued steps, active requests"
    assert "realm_kv_blocks_in_use{" in text and "realm_queue_depth{" in text
