"""`realm serve --ray` end to end: a local Ray cluster (2 CPUs), Realm deployed on it with
2 replicas of one thread each, the official `openai` client through Ray Serve's HAProxy
ingress, the real models loaded on demand where Ray's multiplexing routes them.

One cluster for the module (starting it is most of the time this file takes); the last
test kills a replica mid-stream. Marked `ray`: `pytest -m "not ray"` leaves it out.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from test_server import KEYS, MODEL, QUESTION, TRAP_WAT, metric, streamed_text
from typer.testing import CliRunner

from realm.cli import app
from realm.errors import LimitExceeded
from realm.server import ray_serve
from realm.server.cluster_limits import ClusterLimits, RemoteQuota
from realm.server.keys import hash_key
from realm.server.settings import ServerSettings, TenantSettings

pytestmark = pytest.mark.ray

GEMMA = "gemma3-270m"
MAX_BODY = 64 * 1024
REPLICA = ray_serve.REPLICA_HEADER.decode()


class Cluster:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=KEYS[tenant], max_retries=0, timeout=120)

    def complete(self, tenant: str, model: str, **kw) -> tuple[str, str]:
        """(text, replica) of one completion."""
        raw = self.client(tenant).completions.with_raw_response.create(
            model=model, prompt="The capital of France is", max_tokens=kw.pop("max_tokens", 4), temperature=0, **kw
        )
        return raw.parse().choices[0].text, raw.headers[REPLICA]


CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGILL, signal.SIGFPE, signal.SIGBUS)


def _native_handlers() -> dict[int, ctypes.Array]:
    """This process's C-level handlers of the signals Wasmtime turns into guest traps (each
    `struct sigaction` kept as opaque bytes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    saved = {}
    for sig in CRASH_SIGNALS:
        action = ctypes.create_string_buffer(256)  # struct sigaction is 152 bytes on x86-64 glibc
        if libc.sigaction(sig, None, action) != 0:
            raise OSError(ctypes.get_errno(), f"sigaction({sig})")
        saved[sig] = action
    return saved


def _restore_native_handlers(saved: dict[int, ctypes.Array]) -> None:
    """ray.init in this process installs Ray's crash handlers over Wasmtime's, and a later
    guest trap in this process (other test modules) would then kill it: put them back. (A
    replica is not affected: Ray is there first, and Wasmtime chains to Ray's handlers.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    for sig, action in saved.items():
        if libc.sigaction(sig, action, None) != 0:
            raise OSError(ctypes.get_errno(), f"sigaction({sig})")


def _ray_processes() -> set[str]:
    """Ray's processes on this machine now (pid and command line)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if "raylet" in line or "gcs_server" in line or "ray::" in line}


@pytest.fixture(scope="module")
def cluster(smollm2_path, gemma3_path, tmp_path_factory) -> Iterator[Cluster]:
    before = _ray_processes()  # another cluster on this machine is not this test's to clean up
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()

    trap = tmp_path_factory.mktemp("guests") / "trap.wat"
    trap.write_text(TRAP_WAT)

    def tenant(name: str, **kw) -> dict:
        return {"name": name, "keys": [hash_key(KEYS[name])], **kw}

    settings = ServerSettings.model_validate({
        "port": port,
        "backend": "cpu",
        "models": [MODEL, GEMMA],
        "threads": 1,
        "max_loaded_models": 1,
        "max_body_bytes": MAX_BODY,
        "tenants": [
            tenant("alpha"),
            tenant("beta", models=[MODEL]),
            tenant("tiny", limits={"max_concurrent": 1}),
            tenant("trap", guest=str(trap)),
        ],
        "ray": {"replicas": 2, "cpus_per_replica": 1},
    })  # fmt: skip
    threads = torch.get_num_threads()
    handlers = _native_handlers()
    ray_serve.connect(settings, num_cpus=2)
    _restore_native_handlers(handlers)
    try:
        ray_serve.deploy(settings)
        _restore_native_handlers(handlers)
        yield Cluster(port)
    finally:
        ray_serve.shutdown()
        _restore_native_handlers(handlers)
        torch.set_num_threads(threads)
        deadline = time.monotonic() + 30
        while _ray_processes() - before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes() - before, _ray_processes() - before


def test_chat_streamed_and_whole_through_the_cluster(cluster):
    client = cluster.client("alpha")
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    assert whole.model == MODEL and whole.choices[0].message.content
    text, finish, usage = streamed_text(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
    assert usage == whole.usage


def _chosen_replicas(model: str, times: int = 8) -> set[str]:
    """The replicas Ray's routing, as a router in this process sees it, picks for `model`."""

    async def choose() -> str:
        replicas = serve.get_deployment_handle(ray_serve.REPLICAS, app_name=ray_serve.APP_NAME)
        async with replicas.options(multiplexed_model_id=model).choose_replica(_reserve=False) as chosen:
            return chosen.replica_id

    return {asyncio.run(choose()) for _ in range(times)}


def _wait_for_routing(holder: str, held: str, unheld: str | None = None) -> None:
    """Ray's routers learn which models a replica holds a moment after it loads one (the
    replica pushes its list to Ray's controller every 0.1 s, which passes it on to every
    router): wait until routing sends `held` to `holder` only, and `unheld`, a model no
    replica holds yet, elsewhere. Asked of another router than HAProxy's (RealmRouter's),
    which hears from the same controller at the same time."""
    deadline = time.monotonic() + 30
    while _chosen_replicas(held) != {holder} or (unheld is not None and holder in _chosen_replicas(unheld)):
        assert time.monotonic() < deadline, f"Ray's routing did not learn that replica {holder} holds {held}"
        time.sleep(0.05)


def test_two_models_are_loaded_on_demand_on_different_replicas(cluster):
    _, first = cluster.complete("alpha", MODEL)
    _wait_for_routing(first, MODEL, GEMMA)
    text, other = cluster.complete("alpha", GEMMA)  # loaded now, where no model is yet
    assert text and other != first
    _wait_for_routing(other, GEMMA)
    assert {cluster.complete("alpha", m)[1] for m in (MODEL, MODEL)} == {first}  # routed to the replica holding it
    assert cluster.complete("alpha", GEMMA)[1] == other


def test_tenants_keys_and_permissions_hold_on_the_cluster(cluster):
    assert cluster.complete("beta", MODEL)[0]
    with pytest.raises(openai.PermissionDeniedError):
        cluster.complete("beta", GEMMA)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster.base + "/v1", api_key="realm-wrong", max_retries=0).models.list()
    assert [m.id for m in cluster.client("beta").models.list().data] == [MODEL]
    big = {"model": MODEL, "prompt": "x" * MAX_BODY}
    r = httpx.post(cluster.base + "/v1/completions", json=big, headers={"Authorization": f"Bearer {KEYS['alpha']}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_a_guest_trap_in_a_replica_is_a_502_and_the_replica_serves_on(cluster):
    with pytest.raises(openai.APIStatusError) as trapped:
        cluster.complete("trap", MODEL)
    assert trapped.value.status_code == 502
    assert cluster.complete("alpha", MODEL)[0]


@pytest.mark.parametrize(("size", "read"), [(100, True), (1000, True), (1001, False)])
def test_a_body_is_read_only_up_to_the_servers_limit_and_given_again_whole(size, read):
    body = b'{"model": "m", "prompt": "' + b"x" * (size - 28) + b'"}'
    assert len(body) == size
    parts = [body[i : i + 64] for i in range(0, size, 64)]
    sent = 0

    async def receive() -> dict:
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": parts[sent - 1], "more_body": sent < len(parts)}

    async def read_twice() -> tuple[bytes, int, bytes]:
        got, again = await ray_serve.read_body(receive, 1000)
        stopped_at = sent
        whole = b""
        while True:
            message = await again()
            whole += message["body"]
            if not message["more_body"]:
                return got, stopped_at, whole

    got, stopped_at, whole = asyncio.run(read_twice())
    assert got == (body if read else b"")
    assert stopped_at == (len(parts) if read else 1000 // 64 + 1)  # stopped at the first part past the limit
    assert whole == body  # the app reads every byte, the ones read before included


def test_ray_options_go_with_ray():
    result = CliRunner().invoke(app, ["serve", "--replicas", "2"])
    assert result.exit_code != 0 and "--ray-address and --replicas go with --ray" in result.output


def test_a_tenants_concurrency_limit_holds_across_replicas(cluster):
    """tiny may run 1 request at a time: a second one on the other replica (other model) is 429."""
    stream = cluster.client("tiny").completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=24, temperature=0, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    with pytest.raises(openai.RateLimitError, match="already has 1 requests running"):
        cluster.complete("tiny", GEMMA)
    assert "".join(c.choices[0].text for c in chunks) is not None
    assert cluster.complete("tiny", GEMMA)[0]  # the first one is over: admitted again


def test_metrics_of_every_replica_reach_one_scrape(cluster):
    text = httpx.get(cluster.base + "/metrics").text
    replicas = {
        line.split('replica="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("realm_requests_total{") and 'status="200"' in line
    }
    assert len(replicas) == 2
    assert metric(text, "realm_requests_total", tenant="alpha", model=GEMMA, status="200") > 0
    assert metric(text, "realm_requests_total", tenant="tiny", model=MODEL, status="200") > 0


def test_a_replica_outside_the_limits_actor_keeps_to_its_own_limits(cluster):
    """The actor unreachable (here: killed for good): each replica enforces the tenant's limits itself."""
    tenant = TenantSettings(name="tiny", limits={"max_concurrent": 1})
    actor = ray.remote(num_cpus=0)(ClusterLimits).remote([tenant.model_dump()])
    fallbacks: list[int] = []
    assert ray.get(actor.active.remote(), timeout=60) == {"tiny": 0}  # started
    quota = RemoteQuota(actor, tenant, timeout_s=10, on_fallback=lambda: fallbacks.append(1))
    settle = quota.admit(10)
    assert ray.get(actor.active.remote()) == {"tiny": 1} and not fallbacks
    with pytest.raises(LimitExceeded):
        quota.admit(10)
    settle(5)
    ray.kill(actor, no_restart=True)  # asynchronous: wait until the actor no longer answers
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(actor.active.remote(), timeout=5)
        except RayActorError:
            break
        time.sleep(0.1)
    local = quota.admit(10)  # no answer: this replica's own Quota admits
    assert fallbacks == [1] and quota.local.active == 1
    with pytest.raises(LimitExceeded):
        quota.admit(10)
    local(3)


def test_a_replica_killed_mid_stream(cluster):
    """Its stream's connection is cut (an error, not a short answer); a stream on the other
    replica and new requests go on."""
    victim_client = cluster.client("alpha")
    raw = victim_client.completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0, stream=True
    )
    victim = raw.headers[REPLICA]
    doomed = iter(raw.parse())
    next(doomed)
    other_text: list[str] = []
    survivor = cluster.client("alpha").completions.with_raw_response.create(
        model=GEMMA, prompt="Red, green,", max_tokens=30, temperature=0, stream=True
    )
    assert survivor.headers[REPLICA] != victim
    other = threading.Thread(target=lambda: other_text.append(streamed_text(survivor.parse())[0]))
    other.start()
    assert victim in _replica_ids()
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("#" + victim))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    with pytest.raises((openai.APIError, httpx.TransportError)):
        for _ in doomed:
            pass
    other.join(timeout=120)
    assert other_text and other_text[0]
    text, replica = cluster.complete("alpha", MODEL)  # a new request for the dead replica's model
    assert text and replica != victim
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # Ray starts a new replica in the dead one's place
        replicas = _replica_ids()
        running = serve.status().applications[ray_serve.APP_NAME].deployments["RealmReplica"].replica_states
        if len(replicas) == 2 and victim not in replicas and running.get("RUNNING", 0) == 2:
            break
        time.sleep(1)
    assert len(replicas) == 2 and victim not in replicas and running.get("RUNNING", 0) == 2, (replicas, running)


def _replica_ids() -> set[str]:
    """The unique ids of the live Realm replicas (Ray names each replica's actor ...#RealmReplica#<id>)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1] for n in names if "#RealmReplica#" in n}
