"""`realm serve --ray`: the same server over N replicas on a Ray cluster (Ray Serve).

`RealmReplica` is a whole Realm host per replica: its own models, schedulers and guests,
and the very app `realm serve` runs (`create_app`), so routes, keys, errors and SSE are
the single server's. Ray Serve's HAProxy ingress sends each HTTP request straight to a
replica's own HTTP server and streams the answer straight back: no Ray object per token,
no Python process in between. For each POST, HAProxy first asks `RealmRouter` which
replica to use, with the request's body: one that already holds the body's `model` (Ray's
multiplexing, `@serve.multiplexed` by model name), else the least busy, which then loads
it; a replica past `max_loaded_models` drops its least recently used model (the host's
own budget, max_loaded_mb, holds as well; a model with requests running is never
dropped). Other requests go to any replica.

Tenants' limits hold across the cluster: one actor keeps them (cluster_limits.py, which
also says what happens when it is unreachable). Guest and model paths in the config must
exist at the same place on every node; catalogue models are fetched on each node.

A replica that dies mid-stream cuts that stream's connection (the client sees an
incomplete answer, an error in the `openai` client); Ray restarts it, and other streams
and new requests go on on the other replicas. /metrics on any replica merges every
replica's metrics, each sample labelled with its `replica`.

HAProxy's ingress is an option of Ray Serve's, read from the environment
(settings.RAY_SERVE_ENVIRONMENT) by each of the cluster's processes and by this one when
they import Ray Serve: this module sets it before it imports Ray Serve, `connect` passes
it to a cluster it starts, and docs/SCALING.md says how for a cluster an operator starts.

Not `from __future__ import annotations` here: Ray's class-based FastAPI view reads the
routes' parameter annotations as objects (a string `Request` would be a query parameter).
"""

import json
import logging
import os
import sys
from collections import deque
from typing import Any

from realm.server.settings import RAY_SERVE_ENVIRONMENT, ServerSettings

for _name, _value in RAY_SERVE_ENVIRONMENT.items():  # read by Ray Serve when it is imported
    os.environ.setdefault(_name, _value)

import ray  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import Response  # noqa: E402
from ray import serve  # noqa: E402
from ray.exceptions import RayError  # noqa: E402
from ray.serve._private import constants as serve_constants  # noqa: E402
from ray.serve.handle import DeploymentHandle  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from realm.errors import RealmError, ServiceUnavailable  # noqa: E402
from realm.models.gguf_file import few_heap_arenas  # noqa: E402
from realm.server.app import create_app, error_response  # noqa: E402
from realm.server.cluster_limits import RemoteQuota, start_limits_actor  # noqa: E402
from realm.server.host import Host  # noqa: E402
from realm.server.metrics import Metrics, merge_expositions  # noqa: E402
from realm.server.off_loop import off_loop  # noqa: E402
from realm.server.process import GIL_SWITCH_S  # noqa: E402
from realm.server.routes import bearer_key  # noqa: E402

log = logging.getLogger("realm.server")

APP_NAME = "realm"
REPLICAS = "RealmReplica"  # the replicas' deployment
REPLICA_HEADER = b"x-realm-replica"  # on every answer: the replica that gave it
MODEL_HEADER = serve_constants.SERVE_MULTIPLEXED_MODEL_ID  # set by RealmRouter: the model it chose the replica for
START_ATTEMPTS = 3  # on a machine too busy for Ray's health checks, its first HTTP proxy may be replaced
MAX_MODEL_NAME = 256  # a longer `model` is no served name: the replica answers it (404)


def replica_settings(settings: ServerSettings) -> ServerSettings:
    """A replica's settings: models load on demand (where requests for them are routed),
    compute threads as many as the CPUs Ray reserves for it unless set."""
    threads = settings.threads or max(1, int(settings.ray.cpus_per_replica))
    return settings.model_copy(update={"preload": [], "threads": threads})


@serve.ingress()
class RealmReplica:
    """One Realm host and its app, in one Ray replica, serving HTTP itself."""

    def __init__(self, settings: dict[str, Any], config_dir: str | None, limits: Any) -> None:
        sys.setswitchinterval(GIL_SWITCH_S)  # as `realm serve` does: see process.py
        few_heap_arenas()
        loaded = ServerSettings.model_validate(settings | {"config_dir": config_dir})
        self.settings = replica_settings(loaded)
        self.metrics = Metrics()
        self.host = Host(self.settings, self.metrics, progress=False)
        self.host.load()  # compute threads, tenants and guests; no model yet
        if limits is not None:
            for tenant in self.host.tenants.values():
                tenant.quota = RemoteQuota(
                    limits,
                    tenant.settings,
                    self.settings.ray.limits_timeout_s,
                    on_fallback=self.metrics.limits_fallbacks.labels(tenant.name).inc,
                )
        self.api = create_app(self.settings, host=self.host)
        per_replica = self.settings.max_loaded_models or len(self.host.slots.slots)

        async def load(model_id: str) -> LoadedModel:  # a function: Ray keeps its model cache on it
            return await self._load(model_id)

        self.load_model = serve.multiplexed(max_num_models_per_replica=per_replica)(load)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:  # uvicorn takes a bound method for ASGI 2
            await self.serve_http(scope, receive, send)

        return app

    async def serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An HTTP request HAProxy sent here: /metrics over every replica; anything else to
        the app, once the model RealmRouter chose this replica for (or, where HAProxy chose
        itself, the one the body names) is loaded."""
        if scope["type"] != "http":
            return await self.api(scope, receive, send)
        request = Request(scope)
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            return await (await self._all_metrics(request))(scope, receive, send)
        model_id = request.headers.get(MODEL_HEADER)
        if model_id is None and scope["method"] == "POST":
            # HAProxy chose this replica itself (its configuration had no RealmRouter yet, in
            # the second after a deploy, or the router failed): the model is read from the
            # body, so that it too loads through Ray's multiplexing and Ray's routing learns
            # where it is (a model the app loaded on its own would stay unknown to it)
            body, receive = await read_body(receive, self.settings.max_body_bytes)
            model_id = _model_of(body)
        if model_id and self._may_load(request, model_id):
            try:
                await self.load_model(model_id)
            except RealmError:
                pass  # the app answers the request with the same error, in its format
        replica = self.replica_id.encode()

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, replica)]}
            await send(message)

        await self.api(scope, receive, tagged)

    async def _load(self, model_id: str) -> "LoadedModel":
        name = self._slot_name(model_id)
        if name is None:
            raise ServiceUnavailable(f"no served model is {model_id!r}")
        await off_loop(self.host.slots.load, name)
        return LoadedModel(self.host, name)

    def _slot_name(self, model_id: str) -> str | None:
        names = self.host.slots.names_for(model_id)
        return names[0] if names else None

    def _may_load(self, request: Request, model_id: str) -> bool:
        """Load the request's model before the app runs it only for a tenant that may use
        it: a refused request must not make a replica load (or drop) anything."""
        name = self._slot_name(model_id)
        if name is None:
            return False
        try:
            tenant = self.host.tenant_for_key(bearer_key(request))
        except RealmError:
            return False
        return tenant.allowed(name)

    async def _all_metrics(self, request: Request) -> Response:
        """Every replica's metrics in one exposition, each sample labelled `replica`."""
        try:
            key = bearer_key(request)
            self.host.check_metrics_key(key)
            replicas = serve.get_deployment_handle(REPLICAS, APP_NAME)
            results = await replicas.broadcast("metrics_text", key).results_async(timeout_s=10)
        except RealmError as e:
            return error_response(e)
        except RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RealmError):
                return error_response(cause)
            return error_response(ServiceUnavailable(f"the replicas' metrics could not be read: {type(e).__name__}"))
        return Response(merge_expositions(dict(results)), media_type=Metrics.content_type)

    async def metrics_text(self, key: str | None) -> tuple[str, bytes]:
        """This replica's Prometheus text, if `key` may read /metrics here."""
        self.host.check_metrics_key(key)
        return self.replica_id, await off_loop(self.metrics.render)

    def __del__(self) -> None:
        host = getattr(self, "host", None)
        if host is not None:
            host.close()


class LoadedModel:
    """What Ray's multiplexing holds for a model on a replica: when Ray drops it (its
    least recently used, past max_num_models_per_replica), the host unloads it unless
    requests are running on it (then the host's own budget decides later)."""

    def __init__(self, host: Host, name: str) -> None:
        self.host = host
        self.name = name
        self._dropped = False

    def __del__(self) -> None:
        if self._dropped:
            return
        self._dropped = True
        try:
            self.host.slots.unload(self.name)
        except RealmError as e:
            log.info("model %s stays loaded: %s", self.name, e)


def _model_of(body: bytes) -> str | None:
    """The `model` of a JSON request body, if it names one (the replica validates the rest)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_NAME else None


async def read_body(receive: Receive, limit: int) -> tuple[bytes, Receive]:
    """The request's body, or nothing once it is longer than `limit` (a replica refuses
    such a request, 413, wherever it goes, so the rest is not read here), and a `receive`
    that gives what was read again, then the rest. (HAProxy sends RealmRouter at most
    RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE of a body, 8 MiB by default.)"""
    read: list[Message] = []
    size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            break
        size += len(message.get("body", b""))
        if size > limit or not message.get("more_body", False):
            break
    body = b"" if size > limit else b"".join(m.get("body", b"") for m in read if m["type"] == "http.request")
    pending = deque(read)

    async def again() -> Message:
        return pending.popleft() if pending else await receive()

    return body, again


# Above the class: Ray pickles the router class when it is decorated, with the module's
# globals as they are then.
router_api = FastAPI(title="Realm's replica router", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(router_api)
class RealmRouter:
    """What HAProxy asks, with each POST's body, for the replica to send it to."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int) -> None:
        self.replicas = replicas
        self.max_body_bytes = max_body_bytes

    @router_api.post("/internal/route")
    async def route(self, request: Request) -> dict[str, Any]:
        """The replica (Ray's request router, by the body's model) and where it listens;
        any answer but 200 and HAProxy picks a replica itself."""
        body, _ = await read_body(request.receive, self.max_body_bytes)
        model = _model_of(body) or ""
        # _reserve=False: only pick a replica (the request itself goes through HAProxy);
        # the pick is Ray's own, ordered by its multiplexing
        async with self.replicas.options(multiplexed_model_id=model).choose_replica(_reserve=False) as chosen:
            endpoint = chosen._replica.backend_http_endpoint
            if endpoint is None:
                raise ServiceUnavailable(f"replica {chosen.replica_id} has no HTTP server")
            answer: dict[str, Any] = {
                "host": endpoint[0],
                "port": endpoint[1],
                "replica_id": chosen._replica.replica_id.to_full_id_str(),
            }
        if model:
            answer["request_headers"] = {MODEL_HEADER: model}
        return answer


# ---------------------------------------------------------------------------- deploying


def deploy(settings: ServerSettings) -> DeploymentHandle:
    """Deploy Realm on the Ray cluster this process is connected to (ray.init first), with
    HAProxy on settings.host:settings.port. Returns the replicas' handle."""
    if not serve_constants.RAY_SERVE_ENABLE_HA_PROXY:
        raise ServiceUnavailable(
            "Ray Serve was imported before realm.server.ray_serve, without RAY_SERVE_ENABLE_HA_PROXY=1: "
            "set it (and RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1) in the environment"
        )
    r = settings.ray
    limits = start_limits_actor(settings.effective_tenants())
    replica_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": r.cpus_per_replica},
        "max_ongoing_requests": r.max_ongoing_requests,
    }
    if r.min_replicas is not None:
        replica_options["autoscaling_config"] = {
            "min_replicas": r.min_replicas,
            "max_replicas": r.max_replicas,
            "target_ongoing_requests": r.target_ongoing_requests,
        }
    else:
        replica_options["num_replicas"] = r.replicas
    dumped = settings.model_dump(mode="json")
    config_dir = str(settings.config_dir) if settings.config_dir is not None else None
    replicas = serve.deployment(name=REPLICAS, **replica_options)(RealmReplica).bind(dumped, config_dir, limits)
    router_deployment = serve.deployment(name="RealmRouter", ray_actor_options={"num_cpus": 0})(RealmRouter)
    router = router_deployment.bind(replicas, settings.max_body_bytes)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            break
        except (RayError, TimeoutError) as e:  # a proxy that failed its health checks is replaced: wait for it
            if attempt == START_ATTEMPTS:
                raise
            log.warning("Ray Serve's HTTP proxy did not come up (%s); waiting for the next one", type(e).__name__)
    # a hook of Ray Serve's own direct streaming (ray.serve.llm's, by the same name)
    return serve.run(replicas._with_ingress_request_router(router), name=APP_NAME, route_prefix="/")


def connect(settings: ServerSettings, *, num_cpus: int | None = None) -> None:
    """Join the cluster at settings.ray.address, or start a local one (`num_cpus` of this
    machine, default all). Replicas get this process's environment's Realm variables."""
    env = {k: v for k, v in os.environ.items() if k.startswith("REALM_") or k in ("GOMP_SPINCOUNT", "PYTHONPATH")}
    env |= RAY_SERVE_ENVIRONMENT
    ray.init(
        address=settings.ray.address,
        num_cpus=None if settings.ray.address else num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        namespace=APP_NAME,
        log_to_driver=True,
    )


def shutdown() -> None:
    """Take Realm's deployments down and leave the cluster (a local one stops)."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
