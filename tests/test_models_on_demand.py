"""Models loaded on their first request, unloaded past the budget, and the operator's
/admin endpoints: a real server, the real models, the official `openai` client.

The server serves smollm2-135m and gemma3-270m, loads neither at startup and holds one at
a time (max_loaded_models = 1)."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from test_server import KEYS, MODEL, error_of, serving

from realm.errors import InvalidArgument, ServiceUnavailable
from realm.server.host import Host
from realm.server.keys import hash_key
from realm.server.metrics import Metrics
from realm.server.settings import ServerSettings, load_settings

GEMMA = "gemma3-270m"
OPERATOR = "realm-test-operator-key"


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings.model_validate({
        "port": 0,
        "backend": "cpu",
        "models": [MODEL, GEMMA],
        "preload": [],
        "max_loaded_models": 1,
        "admin_keys": [hash_key(OPERATOR)],
        "tenants": [
            {"name": "alpha", "keys": [hash_key(KEYS["alpha"])]},
            {"name": "beta", "keys": [hash_key(KEYS["beta"])], "models": [MODEL]},
        ],
    })  # fmt: skip
    with serving(settings) as s:
        yield s


def admin(server, method: str, path: str, key: str | None = OPERATOR) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.base + "/admin" + path, headers=headers, timeout=120)


def loaded(server) -> set[str]:
    r = admin(server, "GET", "/models")
    assert r.status_code == 200
    return {m["name"] for m in r.json()["data"] if m["loaded"]}


def say(server, tenant: str, model: str, **kw):
    return server.client(tenant).completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0, **kw)


def test_nothing_is_loaded_at_startup_and_every_model_is_listed(server):
    admin(server, "POST", f"/models/{MODEL}/unload")
    admin(server, "POST", f"/models/{GEMMA}/unload")
    health = httpx.get(server.base + "/health")
    assert health.status_code == 200 and health.json()["models"] == []
    cards = {m.id: m for m in server.client("alpha").models.list().data}
    assert set(cards) == {MODEL, GEMMA}
    assert all(c.model_extra["info"] == {"loaded": False} for c in cards.values())
    assert [m.id for m in server.client("beta").models.list().data] == [MODEL]


def test_the_first_request_loads_its_model_and_health_stays_up(server):
    admin(server, "POST", f"/models/{GEMMA}/unload")
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(say(server, "alpha", GEMMA).choices[0].text))
    worker.start()
    polls = []
    while worker.is_alive():
        started = time.perf_counter()
        polls.append((httpx.get(server.base + "/health").status_code, time.perf_counter() - started))
        time.sleep(0.05)
    worker.join()
    assert done and done[0], "the request for a model not loaded got no text"
    assert polls and all(status == 200 and took < 2 for status, took in polls), polls
    assert loaded(server) == {GEMMA}
    card = server.client("alpha").models.retrieve(GEMMA)
    assert card.model_extra["info"]["loaded"] is True and card.model_extra["info"]["architecture"] == "gemma3"


def test_past_max_loaded_models_the_least_recently_used_goes(server):
    say(server, "alpha", GEMMA)
    assert say(server, "alpha", MODEL).choices[0].text
    assert loaded(server) == {MODEL}
    assert say(server, "alpha", GEMMA).choices[0].text
    assert loaded(server) == {GEMMA}


def test_a_tenant_never_loads_a_model_it_may_not_use(server):
    admin(server, "POST", f"/models/{GEMMA}/unload")
    with pytest.raises(openai.PermissionDeniedError):
        say(server, "beta", GEMMA)
    with pytest.raises(openai.PermissionDeniedError):
        server.client("beta").models.retrieve(GEMMA)
    assert GEMMA not in loaded(server)


def test_a_busy_model_is_never_unloaded(server):
    admin(server, "POST", f"/models/{MODEL}/load")
    stream = server.client("alpha").completions.create(
        model=MODEL, prompt="Count: one, two,", max_tokens=40, temperature=0, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].text is not None
    r = admin(server, "POST", f"/models/{MODEL}/unload")
    assert r.status_code == 503 and "running 1 requests" in error_of(r)["message"]
    with pytest.raises(openai.InternalServerError) as refused:  # 503: no room, the one loaded is busy
        say(server, "alpha", GEMMA)
    assert "every loaded model is running requests" in str(refused.value)
    rest = "".join(c.choices[0].text for c in stream)
    assert rest
    assert say(server, "alpha", GEMMA).choices[0].text  # the stream is over: room now
    assert loaded(server) == {GEMMA}


def test_the_operator_endpoint_needs_an_operator_key(server):
    assert admin(server, "GET", "/models", key=None).status_code == 401
    assert admin(server, "GET", "/models", key="realm-wrong").status_code == 401
    assert admin(server, "GET", "/models", key=KEYS["alpha"]).status_code == 401
    r = admin(server, "POST", "/models/no-such-model/load")
    assert r.status_code == 404 and "no-such-model" in error_of(r)["message"]
    listed = admin(server, "GET", "/models").json()["data"]
    assert [m["name"] for m in listed] == [MODEL, GEMMA]
    assert all(len(m["sha256"]) == 64 for m in listed)
    r = admin(server, "POST", f"/models/{MODEL}/load")
    assert r.status_code == 200 and r.json()["loaded"] and r.json()["bytes_held"] > 0
    r = admin(server, "POST", f"/models/{MODEL}/unload")
    assert r.status_code == 200 and not r.json()["loaded"] and r.json()["bytes_held"] == 0
    assert MODEL not in httpx.get(server.base + "/health").json()["models"]


def test_admin_is_closed_without_admin_keys(smollm2_path):
    settings = ServerSettings(port=0, backend="cpu", models=[MODEL], preload=[])
    with serving(settings) as s:
        r = httpx.get(s.base + "/admin/models", headers={"Authorization": f"Bearer {OPERATOR}"})
        assert r.status_code == 403 and "admin_keys" in error_of(r)["message"]


def test_a_model_over_the_memory_budget_is_refused_clearly(smollm2_path):
    host = Host(ServerSettings(backend="cpu", models=[MODEL], preload=[], max_loaded_mb=1), Metrics(), progress=False)
    host.load()
    try:
        with pytest.raises(ServiceUnavailable, match="larger than this server's max_loaded_mb"):
            host.slots.get(MODEL)
    finally:
        host.close()


def test_preloading_more_than_max_loaded_models_is_a_settings_error():
    with pytest.raises(InvalidArgument, match="max_loaded_models is 1"):
        load_settings(env={}, overrides={"models": f"{MODEL},{GEMMA}", "max_loaded_models": 1})
    with pytest.raises(InvalidArgument, match="preload names"):
        load_settings(env={}, overrides={"models": MODEL, "preload": [GEMMA]})
