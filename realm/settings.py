"""The host's settings from the environment, read in one place.

Every layer asks `host_settings()` rather than reading `os.environ` itself, so each
variable has one name, one default and one parser, and a bad value is one clear error
naming the variable. The environment is read at each call (not at import), so a process
that changes it (a test, `realm serve` setting REALM_COMPILE for its workers) is seen.
The server's own settings (port, tenants, limits) are `realm.server.settings`; the
kernel library reads REALM_KERNEL_ISA itself (it is C++).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from realm.errors import InvalidArgument

Backend = Literal["auto", "gpu", "cpu", "naive"]
CompileMode = Literal["auto", "cached", "off"]

ENV_VARS: Mapping[str, str] = {
    "home": "REALM_HOME",
    "backend": "REALM_BACKEND",
    "compile": "REALM_COMPILE",
    "kernels": "REALM_KERNELS",
    "packed_cache": "REALM_PACKED_CACHE",
    "max_model_bytes": "REALM_MAX_MODEL_BYTES",
}
"""Setting -> the environment variable that sets it."""

SERVING_SPIN_COUNT = "20000"
"""GOMP_SPINCOUNT for `realm serve` (unless its environment sets it), set before torch loads
libgomp, which reads it once: how long an idle compute thread spins before it sleeps.
libgomp's default (300000) keeps the cores busy while the guests sample their next tokens
between rounds; see docs/SERVING.md."""

_COMPILE_WORDS = {"1": "auto", "on": "auto", "0": "off", "false": "off", "no": "off"}


class HostSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    home: Path = Field(
        default_factory=lambda: Path("~/.cache/realm").expanduser(),
        description="models, compiled steps, guest caches and blobs",
    )
    backend: Backend = Field("auto", description="compute backend: auto is the chain GPU -> CPU -> naive")
    compile: CompileMode = Field(
        "auto",
        description="compiled decode step: auto (use the artifacts, build missing ones in the background), "
        "cached (use them, never build) or off (the eager step only)",
    )
    kernels: Literal["native", "pytorch"] = Field(
        "native", description="native: Realm's C++ CPU kernels when built; pytorch: PyTorch's own"
    )
    packed_cache: Literal["on", "off"] = Field(
        "on", description="on: keep each model's packed weights in $REALM_HOME/packed, for faster loads"
    )
    max_model_bytes: int = Field(2 << 30, gt=0, description="the most GGUF bytes one realm_store_model accepts")


def host_settings(env: Mapping[str, str] | None = None) -> HostSettings:
    """The settings in `env` (default: this process's environment); unset or empty
    variables take the defaults. Raises InvalidArgument naming a variable with a bad value."""
    env = os.environ if env is None else env
    given = {name: env.get(var, "").strip() for name, var in ENV_VARS.items()}
    values: dict[str, object] = {name: raw for name, raw in given.items() if raw}
    for name in ("backend", "compile", "kernels", "packed_cache"):
        if name in values:
            values[name] = given[name].lower()
    if "compile" in values:
        values["compile"] = _COMPILE_WORDS.get(given["compile"].lower(), values["compile"])
    if "home" in values:
        values["home"] = Path(given["home"]).expanduser()
    try:
        return HostSettings.model_validate(values)
    except ValidationError as e:
        error = e.errors()[0]
        var = ENV_VARS.get(str(error["loc"][0]), "the environment") if error["loc"] else "the environment"
        raise InvalidArgument(f"${var}={env.get(var, '')!r}: {error['msg']}") from None
