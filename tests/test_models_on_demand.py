"""Models loaded on their first request, unloaded past the budget, and the operator's
/admin endpoints: a real server, real guests, the official `openai` client.

The server serves two tiny models (a llama and a gemma3, real GGUF files that load in
milliseconds; tests/test_ray.py loads the real ones on demand), loads neither at startup
and holds one at a time (max_loaded_models = 1)."""

from __future__ import annotations

import gc
import threading
import time

import httpx
import openai
import pytest
from test_server import KEYS, LOOP_WAT, MODEL, error_of, serving
from tiny_model import write_tiny_gemma3, write_tiny_llama

from realm.errors import InvalidArgument, ServiceUnavailable
from realm.server.host import Host
from realm.server.keys import hash_key
from realm.server.metrics import Metrics
from realm.server.settings import ServerSettings, load_settings

LLAMA, GEMMA = "tiny-llama", "tiny-gemma3"
OPERATOR = "realm-test-operator-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = tmp_path_factory.mktemp("models")
    loop = files / "loop.wat"
    loop.write_text(LOOP_WAT)
    settings = ServerSettings.model_validate({
        "port": 0,
        "backend": "cpu",
        "models": [
            {"name": LLAMA, "path": str(write_tiny_llama(files / "llama.gguf"))},
            {"name": GEMMA, "path": str(write_tiny_gemma3(files / "gemma3.gguf"))},
        ],
        "preload": [],
        "max_loaded_models": 1,
        "admin_keys": [hash_key(OPERATOR)],
        "tenants": [
            {"name": "alpha", "keys": [hash_key(KEYS["alpha"])]},
            {"name": "beta", "keys": [hash_key(KEYS["beta"])], "models": [LLAMA]},
            {"name": "slow", "keys": [hash_key(KEYS["slow"])], "guest": str(loop), "limits": {"guest_seconds": 3}},
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
    admin(server, "POST", f"/models/{LLAMA}/unload")
    admin(server, "POST", f"/models/{GEMMA}/unload")
    health = httpx.get(server.base + "/health")
    assert health.status_code == 200 and health.json()["models"] == []
    cards = {m.id: m for m in server.client("alpha").models.list().data}
    assert set(cards) == {LLAMA, GEMMA}
    assert all(c.model_extra["info"] == {"loaded": False} for c in cards.values())
    assert [m.id for m in server.client("beta").models.list().data] == [LLAMA]


def test_the_first_request_loads_its_model_and_health_stays_up(server):
    admin(server, "POST", f"/models/{GEMMA}/unload")
    done: list[str] = []
    worker = threading.Thread(target=lambda: done.append(say(server, "alpha", GEMMA).choices[0].text))
    worker.start()
    polls = []
    while not polls or worker.is_alive():
        started = time.perf_counter()
        polls.append((httpx.get(server.base + "/health").status_code, time.perf_counter() - started))
        time.sleep(0.02)
    worker.join()
    assert done and done[0], "the request for a model not loaded got no text"
    assert polls and all(status == 200 and took < 2 for status, took in polls), polls
    assert loaded(server) == {GEMMA}
    card = server.client("alpha").models.retrieve(GEMMA)
    assert card.model_extra["info"]["loaded"] is True and card.model_extra["info"]["architecture"] == "gemma3"


def test_past_max_loaded_models_the_least_recently_used_goes(server):
    say(server, "alpha", GEMMA)
    assert say(server, "alpha", LLAMA).choices[0].text
    assert loaded(server) == {LLAMA}
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
    """A request holds its model (here a guest that spins for 3 s, then is stopped)."""
    admin(server, "POST", f"/models/{LLAMA}/load")
    spinning = threading.Thread(target=lambda: pytest.raises(openai.APIStatusError, say, server, "slow", LLAMA))
    spinning.start()
    deadline = time.monotonic() + 2
    while not any(m["busy"] for m in admin(server, "GET", "/models").json()["data"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    r = admin(server, "POST", f"/models/{LLAMA}/unload")
    assert r.status_code == 503 and "running 1 requests" in error_of(r)["message"]
    with pytest.raises(openai.InternalServerError) as refused:  # 503: no room, the one loaded is busy
        say(server, "alpha", GEMMA)
    assert "every loaded model is running requests" in str(refused.value)
    spinning.join()
    assert say(server, "alpha", GEMMA).choices[0].text  # the request is over: room now
    assert loaded(server) == {GEMMA}


def test_the_operator_endpoint_needs_an_operator_key(server):
    assert admin(server, "GET", "/models", key=None).status_code == 401
    assert admin(server, "GET", "/models", key="realm-wrong").status_code == 401
    assert admin(server, "GET", "/models", key=KEYS["alpha"]).status_code == 401
    r = admin(server, "POST", "/models/no-such-model/load")
    assert r.status_code == 404 and "no-such-model" in error_of(r)["message"]
    listed = admin(server, "GET", "/models").json()["data"]
    assert [m["name"] for m in listed] == [LLAMA, GEMMA]
    assert all(len(m["sha256"]) == 64 for m in listed)
    r = admin(server, "POST", f"/models/{LLAMA}/load")
    assert r.status_code == 200 and r.json()["loaded"] and r.json()["bytes_held"] > 0
    r = admin(server, "POST", f"/models/{LLAMA}/unload")
    assert r.status_code == 200 and not r.json()["loaded"] and r.json()["bytes_held"] == 0
    assert LLAMA not in httpx.get(server.base + "/health").json()["models"]


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


def test_a_loaded_model_is_left_out_of_the_garbage_collectors_full_scans(smollm2_path):
    """A full collection over a loaded model's long-lived objects held the GIL ~110 ms
    (gemma3); they are frozen once the load ends, and a freed model's are collected."""
    host = Host(ServerSettings(backend="cpu", models=[MODEL], preload=[]), Metrics(), progress=False)
    host.load()
    try:
        gc.unfreeze()
        host.slots.load(MODEL)
        assert gc.get_freeze_count() > 10 * len(gc.get_objects())
        host.slots.unload(MODEL)
        assert gc.get_freeze_count() > 10 * len(gc.get_objects())
    finally:
        host.close()
        gc.unfreeze()


def test_preload_is_checked_against_max_loaded_models():
    with pytest.raises(InvalidArgument, match="max_loaded_models is 1"):
        load_settings(env={}, overrides={"models": f"{MODEL},x.gguf", "preload": [MODEL, "x"], "max_loaded_models": 1})
    assert load_settings(env={}, overrides={"models": f"{MODEL},x.gguf", "max_loaded_models": 1}).preloaded() == [MODEL]
    with pytest.raises(InvalidArgument, match="preload names"):
        load_settings(env={}, overrides={"models": LLAMA, "preload": [GEMMA]})
