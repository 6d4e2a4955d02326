"""The operator's endpoints: which served models are loaded, load one now, unload one now.

GET /admin/models, POST /admin/models/{name}/load, POST /admin/models/{name}/unload. Only
keys whose hashes are in the server's `admin_keys` may call them (401 otherwise; 403 on a
server that lists none). They are not part of the OpenAI API, so not in /openapi.json.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from realm.errors import PermissionDenied, Unauthorized
from realm.server.host import Host
from realm.server.keys import KeyRing
from realm.server.off_loop import off_loop
from realm.server.routes import HostDep, bearer_key

admin_router = APIRouter(prefix="/admin", include_in_schema=False)


async def operator(request: Request, host: HostDep) -> Host:
    """The host, if the request's key is an operator's (401/403 if not)."""
    host.check_ready()
    hashes = host.settings.admin_keys
    if not hashes:
        raise PermissionDenied("/admin is closed on this server: list operators' key hashes in admin_keys")
    key = bearer_key(request)
    if key is None:
        raise Unauthorized("/admin needs an operator's key: send `Authorization: Bearer KEY`")
    if KeyRing(dict.fromkeys(hashes, "operator")).tenant_of(key) is None:
        raise Unauthorized("this key may not use /admin")
    return host


OperatorDep = Annotated[Host, Depends(operator)]


@admin_router.get("/models")
async def models(host: OperatorDep) -> dict[str, Any]:
    return {"object": "list", "data": [dataclasses.asdict(s) for s in host.slots.states()]}


@admin_router.post("/models/{name}/load")
async def load(name: str, host: OperatorDep) -> dict[str, Any]:
    """Load `name` now (a no-op if loaded), unloading idle ones past the budget; answers when loaded."""
    await off_loop(host.slots.load, name)
    return _state(host, name)


@admin_router.post("/models/{name}/unload")
async def unload(name: str, host: OperatorDep) -> dict[str, Any]:
    """Unload `name` now (503 while requests run on it); it loads again on its next request."""
    await off_loop(host.slots.unload, name)
    return _state(host, name)


def _state(host: Host, name: str) -> dict[str, Any]:
    return next(dataclasses.asdict(s) for s in host.slots.states() if s.name == name)
