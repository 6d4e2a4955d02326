"""`realm serve --ray`: the same server over N replicas on a Ray cluster (Ray Serve).

Two deployments. `RealmReplica` is a whole Realm host per replica: its own models,
schedulers and guests, and the very app `realm serve` runs (`create_app`), which it runs
in-process for each request it is given (asgi_call.py), so routes, keys, errors and SSE
are the single server's. It loads models on demand: `@serve.multiplexed` by model name, so
Ray routes a request to a replica that already holds its model and a replica past
`max_loaded_models` drops its least recently used one (the host's own budget,
max_loaded_mb, holds as well; a model with requests running is never dropped). `RealmIngress`
takes every HTTP request on Ray's proxy, reads the body's `model` and hands the request to
a replica through a DeploymentHandle with that model as the multiplexed id (the `openai`
client sends the model in the body, where Ray's proxy does not look), then streams the
replica's answer back.

Tenants' limits hold across the cluster: one actor keeps them (cluster_limits.py, which
also says what happens when it is unreachable). Guest and model paths in the config must
exist at the same place on every node; catalogue models are fetched on each node.

A replica that dies mid-stream ends that stream with an error event (503); Ray restarts
it, and other streams and new requests go on on the other replicas. /metrics on the
ingress merges every replica's metrics, each sample labelled with its `replica`.

Not `from __future__ import annotations` here: Ray's class-based FastAPI view reads the
routes' parameter annotations as objects (a string `Request` would be a query parameter).
"""

import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from realm.errors import InternalError, PayloadTooLarge, RealmError, ServiceUnavailable
from realm.models.gguf_file import few_heap_arenas
from realm.server.app import create_app, error_response
from realm.server.asgi_call import HttpRequest, ResponseHead, call
from realm.server.cluster_limits import RemoteQuota, start_limits_actor
from realm.server.host import Host
from realm.server.metrics import Metrics, merge_expositions
from realm.server.off_loop import off_loop
from realm.server.openai_format import Reply
from realm.server.process import GIL_SWITCH_S
from realm.server.routes import bearer_key
from realm.server.settings import ServerSettings

log = logging.getLogger("realm.server")

APP_NAME = "realm"
REPLICA_HEADER = b"x-realm-replica"  # on every answer: the replica that gave it
START_ATTEMPTS = 3  # on a machine too busy for Ray's health checks, its first HTTP proxy may be replaced
MAX_MODEL_NAME = 256  # a longer `model` is no served name: the replica answers it (404)


def replica_settings(settings: ServerSettings) -> ServerSettings:
    """A replica's settings: models load on demand (where requests for them are routed),
    compute threads as many as the CPUs Ray reserves for it unless set."""
    threads = settings.threads or max(1, int(settings.ray.cpus_per_replica))
    return settings.model_copy(update={"preload": [], "threads": threads})


class RealmReplica:
    """One Realm host and its app, in one Ray replica."""

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
        self.app = create_app(self.settings, host=self.host)
        per_replica = self.settings.max_loaded_models or len(self.host.slots.slots)

        async def load(model_id: str) -> LoadedModel:  # a function: Ray keeps its model cache on it
            return await self._load(model_id)

        self.load_model = serve.multiplexed(max_num_models_per_replica=per_replica)(load)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def _load(self, model_id: str) -> "LoadedModel":
        name = self._slot_name(model_id)
        if name is None:
            raise ServiceUnavailable(f"no served model is {model_id!r}")
        await off_loop(self.host.slots.load, name)
        return LoadedModel(self.host, name)

    def _slot_name(self, model_id: str) -> str | None:
        names = self.host.slots.names_for(model_id)
        return names[0] if names else None

    def _may_load(self, request: HttpRequest, model_id: str) -> bool:
        """Load the request's model before the app runs it only for a tenant that may use
        it: a refused request must not make a replica load (or drop) anything."""
        name = self._slot_name(model_id)
        if name is None:
            return False
        try:
            tenant = self.host.tenant_for_key(bearer_key(Request({"type": "http", "headers": request.headers})))
        except RealmError:
            return False
        return tenant.allowed(name)

    async def handle(self, request: HttpRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Run `request` through this replica's app: the response's head, then its body."""
        model_id = serve.get_multiplexed_model_id()
        if model_id and self._may_load(request, model_id):
            try:
                await self.load_model(model_id)
            except RealmError:
                pass  # the app answers the request with the same error, in its format
        async for part in call(self.app, request):
            if isinstance(part, ResponseHead):
                part.headers.append((REPLICA_HEADER, self.replica_id.encode()))
            yield part

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


async def _rest(stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The rest of a streamed answer; a replica that dies mid-stream ends it with an error event."""
    try:
        async for chunk in stream:
            if isinstance(chunk, bytes):
                yield chunk
    except RayError as e:
        log.warning("a replica stopped mid-stream: %s", e)
        for event in Reply.failure(ServiceUnavailable("the replica serving this stream stopped; retry the request")):
            yield event
    finally:
        stream.cancel()  # a no-op once it has ended; stops the replica's generation if the client left


def _model_of(body: bytes) -> str | None:
    """The `model` of a JSON request body, if it names one (the replica validates the rest)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, str) and 0 < len(model) <= MAX_MODEL_NAME else None


# Above the class: Ray pickles the ingress class when it is decorated, with the module's
# globals as they are then.
ingress_app = FastAPI(title="Realm on Ray", docs_url=None, redoc_url=None, openapi_url=None)


@serve.ingress(ingress_app)
class RealmIngress:
    """Every HTTP request of the cluster: routed to a replica that holds its model."""

    def __init__(self, replicas: DeploymentHandle, max_body_bytes: int) -> None:
        self.replicas = replicas
        self.max_body_bytes = max_body_bytes

    @ingress_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics in one exposition, each sample labelled `replica`."""
        try:
            key = bearer_key(request)
            results = await self.replicas.broadcast("metrics_text", key).results_async(timeout_s=10)
        except RealmError as e:
            return error_response(e)
        except RayError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RealmError):
                return error_response(cause)
            return error_response(ServiceUnavailable(f"the replicas' metrics could not be read: {type(e).__name__}"))
        merged = merge_expositions(dict(results))
        return Response(merged, media_type=Metrics.content_type)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def forward(self, path: str, request: Request) -> Response:
        too_large = PayloadTooLarge(
            f"the request body is larger than this server's limit of {self.max_body_bytes} bytes"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return error_response(too_large)
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return error_response(too_large)
        model = _model_of(body) if request.method == "POST" else None
        handle = self.replicas.options(stream=True, multiplexed_model_id=model or "")
        forwarded = HttpRequest(request.method, "/" + path, request.url.query.encode(), request.headers.raw, body)
        stream = handle.handle.remote(forwarded)
        assert isinstance(stream, DeploymentResponseGenerator)  # stream=True
        try:
            head = await anext(stream)
        except (RayError, StopAsyncIteration) as e:
            stream.cancel()
            log.warning("no replica answered %s /%s: %s", request.method, path, e)
            return error_response(ServiceUnavailable("no Realm replica could take this request now; retry shortly"))
        if not isinstance(head, ResponseHead):
            stream.cancel()
            return error_response(InternalError("a replica's answer did not start with its status"))
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() != b"content-length"}
        if (head.header("content-type") or "").startswith("text/event-stream"):
            return StreamingResponse(_rest(stream), status_code=head.status, headers=headers)
        try:
            content = b"".join([chunk async for chunk in stream if isinstance(chunk, bytes)])
        except RayError:
            return error_response(ServiceUnavailable("the replica answering this request stopped; retry"))
        return Response(content, status_code=head.status, headers=headers)


# ---------------------------------------------------------------------------- deploying


def deploy(settings: ServerSettings) -> DeploymentHandle:
    """Deploy Realm on the Ray cluster this process is connected to (ray.init first), with
    Ray's HTTP proxy on settings.host:settings.port. Returns the ingress's handle."""
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
    replicas = serve.deployment(name="RealmReplica", **replica_options)(RealmReplica).bind(dumped, config_dir, limits)
    ingress = serve.deployment(
        name="RealmIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=r.max_ongoing_requests * 64
    )(RealmIngress).bind(replicas, settings.max_body_bytes)
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            serve.start(http_options={"host": settings.host, "port": settings.port})
            break
        except (RayError, TimeoutError) as e:  # a proxy that failed its health checks is replaced: wait for it
            if attempt == START_ATTEMPTS:
                raise
            log.warning("Ray Serve's HTTP proxy did not come up (%s); waiting for the next one", type(e).__name__)
    return serve.run(ingress, name=APP_NAME, route_prefix="/")


def connect(settings: ServerSettings, *, num_cpus: int | None = None) -> None:
    """Join the cluster at settings.ray.address, or start a local one (`num_cpus` of this
    machine, default all). Replicas get this process's environment's Realm variables."""
    env = {k: v for k, v in os.environ.items() if k.startswith("REALM_") or k in ("GOMP_SPINCOUNT", "PYTHONPATH")}
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
