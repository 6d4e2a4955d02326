"""The server's one settings schema: the TOML config file, environment variables and CLI
flags all fill the same pydantic model.

Precedence, lowest first: defaults < config file < environment (`REALM_HOST`,
`REALM_PORT`, `REALM_BACKEND`, `REALM_MODELS` comma-separated, `REALM_MAX_BODY_BYTES`,
`REALM_MAX_BATCH_TOKENS`, `REALM_THREADS`) < CLI flags. A bad file is an `InvalidArgument` that names the file,
the line and the field (``realm.toml:14: tenants[1].limits.max_concurrent: ...``).

A config with no tenants serves one open tenant, "default", that needs no API key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from realm.errors import InvalidArgument
from realm.models.catalogue import DEFAULT_MODEL
from realm.sandbox.limits import Limits
from realm.settings import ENV_VARS

KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
ALL_MODELS = "*"
ALL_KEYS = "*"  # in metrics_keys: any tenant's API key
_GUEST = Limits()  # the sandbox's defaults are a tenant's defaults

ENV_FIELDS: Mapping[str, str] = {
    "REALM_HOST": "host",
    "REALM_PORT": "port",
    ENV_VARS["backend"]: "backend",
    "REALM_MODELS": "models",
    "REALM_MAX_BODY_BYTES": "max_body_bytes",
    "REALM_MAX_BATCH_TOKENS": "max_batch_tokens",
    "REALM_THREADS": "threads",
}
"""Environment variable -> top-level setting."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantLimits(_Strict):
    """What one tenant may use. Every request runs in a fresh guest instance with these caps."""

    max_concurrent: int = Field(4, gt=0, le=1024, description="requests running at once (more: 429)")
    tokens_per_minute: int | None = Field(
        None, gt=0, description="prompt + completion tokens per minute, None: no limit (more: 429)"
    )
    max_tokens: int = Field(1024, gt=0, description="the most max_tokens one request may ask for (more: 400)")
    max_n: int = Field(
        4, gt=0, le=128, description="choices (n) one request may ask for (more: 400); each counts as a request"
    )
    guest_memory_mb: int = Field(
        _GUEST.memory_bytes >> 20, ge=1, le=65536, description="the guest's linear memory cap, MiB"
    )
    guest_seconds: float = Field(
        _GUEST.guest_seconds, gt=0, description="time running WebAssembly per request (host calls not counted)"
    )
    wall_seconds: float = Field(_GUEST.wall_seconds, gt=0, description="a whole request, host calls included")


class TenantSettings(_Strict):
    name: str = Field(pattern=NAME)
    keys: list[str] = Field(default_factory=list, description='hashed API keys, "sha256:<64 hex>" (realm keys new)')
    open: StrictBool = Field(False, description="serve requests that carry no key (or an unknown one) as this tenant")
    guest: str = Field("default", description='"default" or a path to a .wasm / .wat guest module')
    models: list[str] = Field(
        default_factory=lambda: [ALL_MODELS], description='model names it may use; "*": every served model'
    )
    limits: TenantLimits = Field(default_factory=TenantLimits)

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for k in keys:
            if not KEY_HASH.match(k):
                shown = k if k.startswith("sha256:") else k[:10] + "…"
                raise ValueError(
                    f'{shown!r} is not a key hash: keys are stored as "sha256:<64 lower-case hex digits>" '
                    "(`realm keys new TENANT` prints one; never put a plain key in the config)"
                )
        if len(set(keys)) != len(keys):
            raise ValueError("the same key hash is listed twice")
        return keys


class ModelSettings(_Strict):
    """A model to serve: a catalogue name, or a GGUF path with the name clients use for it."""

    name: str = Field(pattern=NAME)
    path: str | None = None


def _default_models() -> list[ModelSettings | str]:
    return [DEFAULT_MODEL]


RAY_SERVE_ENVIRONMENT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1"}
"""What `realm serve --ray` needs of Ray Serve, read from the environment when Ray Serve is
imported, by every process of the cluster: its HAProxy ingress, which asks Realm's router
with each POST's body (realm/server/ray_serve.py)."""


class RaySettings(_Strict):
    """`realm serve --ray`: how many Realm replicas, and where the cluster is."""

    address: str | None = Field(
        None, description='an existing cluster ("auto", "ray://host:10001", "host:6379"); None: start a local one'
    )
    replicas: int = Field(2, ge=1, le=1024, description="Realm replicas (a fixed number, unless an autoscaling range)")
    min_replicas: int | None = Field(None, ge=0, le=1024, description="autoscaling: fewest replicas")
    max_replicas: int | None = Field(None, ge=1, le=1024, description="autoscaling: most replicas")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="autoscaling: requests per replica it aims for (more: it adds replicas)"
    )
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica")
    max_ongoing_requests: int = Field(
        64, ge=1, le=65536, description="requests one replica takes at once (Ray queues the others)"
    )
    limits_timeout_s: float = Field(
        2.0, gt=0, le=60, description="how long a replica waits for the cluster's limits actor before it falls back"
    )

    @model_validator(mode="after")
    def _range(self) -> RaySettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("an autoscaling range needs both min_replicas and max_replicas")
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is more than max_replicas {self.max_replicas}")
        return self


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    models: list[ModelSettings | str] = Field(default_factory=_default_models, min_length=1)
    backend: Literal["auto", "gpu", "cpu", "naive"] | None = None
    max_body_bytes: int = Field(4 << 20, gt=0, description="larger request bodies get 413")
    max_batch_tokens: int = Field(256, gt=0, description="tokens per batched forward call (prompt pieces fill it)")
    batch_wait_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="how long a batched call may wait for the sequences of the previous call to come back "
        "(their guests sample in between; a sequence that has ended is not waited for), so they run together "
        "rather than in fragments",
    )
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="compute threads of the model runners; default: one per CPU this process may use",
    )
    tenants: list[TenantSettings] = Field(default_factory=list)
    metrics_keys: list[str] | None = Field(
        None,
        min_length=1,
        description="who may read /metrics: None, anyone (the default); else the keys whose hashes are listed, "
        '"sha256:<64 hex>", and, if "*" is listed, any tenant\'s key',
    )
    docs: StrictBool = Field(True, description="serve /docs, /redoc and /openapi.json; false hides all three")
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="on SIGTERM, how long running requests may take to finish (new ones get 503) before they "
        "are stopped and the server exits",
    )
    preload: list[str] | None = Field(
        None,
        description="models loaded at startup (None: every served model, at most max_loaded_models); "
        "the others load on their first request",
    )
    max_loaded_models: int | None = Field(
        None, ge=1, le=1024, description="models held at once; past it the least recently used idle one is unloaded"
    )
    max_loaded_mb: int | None = Field(
        None, ge=1, description="MiB of weights held at once; past it the least recently used idle ones are unloaded"
    )
    grammars_at_load: StrictBool = Field(
        False,
        description="build llguidance's view of each model's vocabulary (what structured output's masks need) "
        "when the model loads, not at its first constrained request, which would wait for it (gemma3: 1.5 s); "
        "it keeps its memory from then on (gemma3: 150 MiB)",
    )
    admin_keys: list[str] | None = Field(
        None,
        min_length=1,
        description='hashed keys ("sha256:<64 hex>") that may use /admin (list, load and unload models); '
        "None: /admin is closed",
    )
    ray: RaySettings = Field(default_factory=RaySettings)
    config_dir: Path | None = Field(None, exclude=True, description="where relative guest and model paths start")

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("admin_keys")
    @classmethod
    def _admin_keys(cls, keys: list[str] | None) -> list[str] | None:
        for k in keys or ():
            if not KEY_HASH.match(k):
                raise ValueError(f'{k[:10] + "…"!r} is not a key hash "sha256:<64 hex>"')
        return keys

    @field_validator("metrics_keys")
    @classmethod
    def _metrics_keys(cls, keys: list[str] | None) -> list[str] | None:
        for k in keys or ():
            if k != ALL_KEYS and not KEY_HASH.match(k):
                shown = k[:10] + "…"
                raise ValueError(f'{shown!r} is neither "*" (any tenant\'s key) nor a key hash "sha256:<64 hex>"')
        return keys

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        served = self.model_names()
        if len(set(served)) != len(served):
            raise ValueError(f"a model name is listed twice in models: {served}")
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError(f"tenant names must be unique: {names}")
        if sum(t.open for t in self.tenants) > 1:
            raise ValueError("at most one tenant may be open")
        not_served = [m for m in self.preload or () if m not in served]
        if not_served:
            raise ValueError(f"preload names {not_served}, which this server does not serve (models: {served})")
        if (
            self.preload is not None
            and self.max_loaded_models is not None
            and len(self.preload) > self.max_loaded_models
        ):
            raise ValueError(
                f"preload lists {len(self.preload)} models but max_loaded_models is {self.max_loaded_models}: "
                "list fewer (the others load on demand), or raise max_loaded_models"
            )
        seen: dict[str, str] = {}
        for t in self.tenants:
            for k in t.keys:
                if k in seen:
                    raise ValueError(f"tenants {seen[k]} and {t.name} share a key hash")
                seen[k] = t.name
            unknown = [m for m in t.models if m != ALL_MODELS and m not in served]
            if unknown:
                raise ValueError(
                    f"tenant {t.name} may use {unknown}, which this server does not serve (models: {served})"
                )
        return self

    def compute_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))

    def model_entries(self) -> list[ModelSettings]:
        """Every served model as (name, path or None for a catalogue name)."""
        out = []
        for m in self.models:
            if isinstance(m, ModelSettings):
                out.append(m)
            elif _looks_like_path(m):
                out.append(ModelSettings(name=_model_name(Path(m).stem), path=m))
            else:
                out.append(ModelSettings(name=m))
        return out

    def model_names(self) -> list[str]:
        return [m.name for m in self.model_entries()]

    def preloaded(self) -> list[str]:
        """The models loaded at startup: `preload`, else every served one (the first
        max_loaded_models of them if that is fewer)."""
        if self.preload is not None:
            return list(self.preload)
        return self.model_names()[: self.max_loaded_models]

    def effective_tenants(self) -> list[TenantSettings]:
        """The configured tenants, or the one open tenant "default" when there are none."""
        return list(self.tenants) or [TenantSettings(name="default", open=True)]

    def resolve_path(self, path: str) -> Path:
        """A path from the config: relative ones start at the config file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.config_dir is None else self.config_dir / p


def _looks_like_path(value: str) -> bool:
    return value.endswith(".gguf") or "/" in value or os.sep in value


def _model_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", stem)[:64].lstrip("-_.")
    return name or "model"


# ---------------------------------------------------------------------------- loading


def load_settings(
    config: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerSettings:
    """Settings from a TOML file (`config`, else $REALM_CONFIG, else none), the environment
    and CLI overrides (None values are ignored). Raises InvalidArgument naming the file,
    line and field of any error."""
    env = os.environ if env is None else env
    config = config or env.get("REALM_CONFIG") or None
    data: dict[str, Any] = {}
    text = ""
    label = "config"
    path: Path | None = None
    if config is not None:
        path = Path(config).expanduser()
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidArgument(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"{path}:{_toml_line(str(e), text)}: invalid TOML: {e}") from None
    sources: dict[str, str] = {}
    for var, name in ENV_FIELDS.items():
        if env.get(var):
            data[name] = env[var]
            sources[name] = f"${var}"
    for name, value in (overrides or {}).items():
        if value is not None:
            data[name] = value
            sources[name] = f"--{name.replace('_', '-')}"
    if path is not None:
        data["config_dir"] = path.resolve().parent
    try:
        return ServerSettings.model_validate(data)
    except ValidationError as e:
        raise InvalidArgument(_describe(e, label, text, sources)) from None


def _toml_line(message: str, text: str) -> int:
    m = re.search(r"at line (\d+)", message)
    return int(m.group(1)) if m else max(1, len(text.splitlines()))


def _describe(error: ValidationError, label: str, text: str, sources: Mapping[str, str]) -> str:
    lines = field_lines(text) if text else {}
    out = []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        loc = tuple(p for p in loc if p not in ("ModelSettings", "str"))  # union branches
        field = dotted(loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        where = label
        top = str(loc[0]) if loc else ""
        if top in sources:
            where = sources[top]
        else:
            line = _line_of(loc, lines)
            if line is not None:
                where = f"{label}:{line}"
        out.append(f"{where}: {field}: {message}")
    unique = list(dict.fromkeys(out))
    return "bad settings:\n  " + "\n  ".join(unique) if len(unique) > 1 else f"bad settings: {unique[0]}"


def dotted(loc: Iterable[Any]) -> str:
    """A field's location as one path: `tenants[0].limits.max_tokens`."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _line_of(loc: tuple, lines: Mapping[tuple, int]) -> int | None:
    for n in range(len(loc), 0, -1):
        line = lines.get(loc[:n])
        if line is not None:
            return line
    return None


_ARRAY_HEADER = re.compile(r"^\[\[\s*(.+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\[\s*(.+?)\s*\]")
_KEY = re.compile(r"""^((?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'))*)\s*=""")


def field_lines(text: str) -> dict[tuple, int]:
    """Where each table and key of a TOML document starts: path -> 1-based line number.
    Array-of-tables elements are indexed like pydantic's error locations (tenants, 0, name)."""
    lines: dict[tuple, int] = {}
    counts: dict[tuple, int] = {}
    prefix: tuple = ()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _ARRAY_HEADER.match(line)
        if m:
            keys = _split_key(m.group(1))
            counts[tuple(keys)] = counts.get(tuple(keys), -1) + 1
            prefix = _indexed(keys[:-1], counts) + (keys[-1], counts[tuple(keys)])
            lines.setdefault(prefix, number)
            lines.setdefault(prefix[:-1], number)
            continue
        m = _TABLE_HEADER.match(line)
        if m:
            prefix = _indexed(_split_key(m.group(1)), counts)
            lines.setdefault(prefix, number)
            continue
        m = _KEY.match(line)
        if m:
            lines.setdefault(prefix + tuple(_split_key(m.group(1))), number)
    return lines


def _split_key(key: str) -> list[str]:
    parts = re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_\-]+)', key)
    return [a or b or c for a, b, c in parts]


def _indexed(keys: list[str], counts: Mapping[tuple, int]) -> tuple:
    out: list[Any] = []
    for i, k in enumerate(keys):
        out.append(k)
        n = counts.get(tuple(keys[: i + 1]))
        if n is not None:
            out.append(n)
    return tuple(out)
