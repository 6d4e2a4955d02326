"""The model store: model identity (ids, content hashes, info) and shared, counted weights.

Every model the host runs is in the store under an id: a u32 handed out sequentially from
1 and never reused in this process, so a stale id can never alias another model. A model
is keyed by the SHA-256 of its GGUF content: storing content that is already stored (by
bytes, by path or by name) returns the same model and counts one more reference, so the
weights exist once however many tenants use them. `release` drops a reference; the last
one unloads the model and retires its id for good (a later store of the same content gets
a new id).

Bytes handed in by a caller are written content-addressed to ``$REALM_HOME/blobs/<sha>.gguf``
(atomically: a hidden temporary file moved into place) and loaded from there, so weights
come from a memory map exactly as for a cached model.

Permission: every entry point takes an optional `allowed` predicate from the caller (a
tenant's rule): it is asked about the model's SHA-256 hex and each of its names, and the
model is usable if it answers True for any of them.

A model the store's GPU cannot take (out of memory, or any error of the device while it
takes the weights) is loaded on the CPU instead, with a warning (`engine/model.py`,
`load_model`); its info says where it runs.

Thread-safe: one lock guards the maps; loading runs outside it (one load per content at a
time, others wait for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realm.backends.devices import Backend
from realm.engine.model import Model, load_model
from realm.errors import (
    HashMismatch,
    InvalidArgument,
    LimitExceeded,
    ModelFormatError,
    NotFound,
    PermissionDenied,
    UnknownModel,
)
from realm.files import atomic_write, sha256_file
from realm.models import catalogue
from realm.settings import host_settings

Allowed = Callable[[str], bool]
"""A tenant's rule: True if the model with this name (or SHA-256 hex) may be used."""


ARCHITECTURE_CODES = {"llama": 1, "gemma3": 2}
"""`realm_model_info.architecture`: 0 for an architecture not listed here."""

_GGUF_MAGIC = b"GGUF"


@dataclass
class StoredModel:
    """One model in the store: its identity, the loaded model and who holds it."""

    id: int
    sha256: str  # lower-case hex
    model: Model
    names: set[str] = field(default_factory=set)
    refs: int = 0
    bytes_held: int = 0  # packed weights in memory, measured once at load

    @property
    def digest(self) -> bytes:
        """The 32 raw bytes of the SHA-256 (what the ABI carries)."""
        return bytes.fromhex(self.sha256)

    @property
    def name(self) -> str:
        return self.model.name

    def info(self) -> dict[str, Any]:
        """The model's info plus its identity in this store."""
        return self.model.info() | dict(
            id=self.id,
            sha256=self.sha256,
            names=sorted(self.names),
            refs=self.refs,
            bytes_held=self.bytes_held,
        )


class ModelStore:
    """Models by id, content hash and name, loaded once on `backend` and shared."""

    def __init__(
        self,
        backend: Backend,
        *,
        home: Path | None = None,
        paths: Mapping[str, str | os.PathLike[str]] | None = None,
        max_model_bytes: int | None = None,
        loader: Callable[..., Model] = load_model,
    ) -> None:
        """`paths`: names the operator configured (name -> GGUF path) that `by_name` may load;
        `home`: where blobs go (default $REALM_HOME); `loader`: load_model's signature."""
        self.backend = backend
        self.home = home
        self.paths = {k: Path(v) for k, v in (paths or {}).items()}
        self.max_model_bytes = max_model_bytes or host_settings().max_model_bytes
        self._loader = loader
        self._lock = threading.Lock()
        self._by_id: dict[int, StoredModel] = {}
        self._by_sha: dict[str, StoredModel] = {}
        self._by_name: dict[str, StoredModel] = {}
        self._retired: set[int] = set()
        self._issued = 0
        self._loading: dict[str, threading.Lock] = {}

    # ----------------------------------------------------------------------- storing

    def store_bytes(self, data: bytes | bytearray | memoryview, allowed: Allowed | None = None) -> StoredModel:
        """Store GGUF content handed in by a caller; +1 reference. The bytes are hashed
        first: content already stored costs no copy at all."""
        view = memoryview(data).cast("B")
        if len(view) > self.max_model_bytes:
            raise LimitExceeded(
                f"a model of {len(view)} bytes exceeds the limit of {self.max_model_bytes} bytes per store call"
            )
        if len(view) < 4 or bytes(view[:4]) != _GGUF_MAGIC:
            raise ModelFormatError(f"the bytes are not a GGUF model (they start with {bytes(view[:4])!r})")
        sha = hashlib.sha256(view).hexdigest()
        names = _catalogue_names(sha)
        _check_allowed(allowed, sha, names)
        existing = self._acquire_existing(sha, allowed)
        if existing is not None:
            return existing

        def load() -> Model:
            path = self._write_blob(sha, view)
            try:
                name = names[0] if names else f"blob-{sha[:12]}"
                return self._loader(path, self.backend, name=name, sha256=sha, keep_packed=False)
            except BaseException:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise

        return self._load_once(sha, load, names, allowed)

    def store_path(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        sha256: str | None = None,
        allowed: Allowed | None = None,
    ) -> StoredModel:
        """Store the GGUF file at `path` (hashed unless `sha256` is given); +1 reference."""
        path = Path(path)
        if not path.is_file():
            raise UnknownModel(f"{path}: no such model file")
        sha = (sha256 or sha256_file(path)).lower()
        names = ([name] if name else []) + _catalogue_names(sha)
        _check_allowed(allowed, sha, names)
        existing = self._acquire_existing(sha, allowed, names)
        if existing is not None:
            return existing
        return self._load_once(
            sha,
            lambda: self._loader(path, self.backend, name=name or (names[0] if names else None), sha256=sha),
            names,
            allowed,
        )

    def store_source(self, source: catalogue.ModelSource, allowed: Allowed | None = None) -> StoredModel:
        """Store a located model (`catalogue.locate`) under its name, with its known hash."""
        return self.store_path(source.path, name=source.name, sha256=source.sha256, allowed=allowed)

    def by_name(self, name: str, allowed: Allowed | None = None) -> StoredModel:
        """A model by name, never through a guest's bytes: one already stored under the name,
        else a path the operator configured, else a catalogue model already in the cache.
        Nothing is fetched from the network here: an uncached catalogue model is
        UnknownModel (the operator runs `realm pull`). +1 reference."""
        if not isinstance(name, str) or not name or len(name) > 256:
            raise InvalidArgument("a model name must be 1 to 256 characters")
        with self._lock:
            entry = self._by_name.get(name)
            if entry is not None:
                _check_allowed(allowed, entry.sha256, sorted(entry.names))
                entry.refs += 1
                return entry
        if name in self.paths:
            return self.store_path(self.paths[name], name=name, allowed=allowed)
        cat = catalogue.CATALOGUE.get(name)
        if cat is not None:
            _check_allowed(allowed, cat.sha256, [name])
            if not (catalogue.models_dir() / cat.filename).is_file():
                raise UnknownModel(
                    f"model {name!r} is not in this host's cache (the operator runs `realm pull {name}`)"
                )
            path = catalogue.pull(name, progress=False)
            return self.store_path(path, name=name, sha256=cat.sha256, allowed=allowed)
        known = sorted(set(self._by_name) | set(self.paths))
        raise UnknownModel(f"no model named {name!r} on this host (known: {', '.join(known) or 'none'})")

    # ----------------------------------------------------------------------- identity

    def get(self, model_id: int, allowed: Allowed | None = None) -> StoredModel:
        """The stored model with this id: UnknownModel if never issued, NotFound if released."""
        with self._lock:
            entry = self._entry(model_id)
        _check_allowed(allowed, entry.sha256, sorted(entry.names))
        return entry

    def validate(self, model_id: int, sha256: str | bytes, allowed: Allowed | None = None) -> StoredModel:
        """The model if `model_id` is stored with content `sha256` (hex or 32 raw bytes)."""
        expected = sha256.hex() if isinstance(sha256, (bytes, bytearray, memoryview)) else str(sha256).lower()
        entry = self.get(model_id, allowed)
        if entry.sha256 != expected:
            raise HashMismatch(f"model id {model_id} has SHA-256 {entry.sha256}, not {expected}")
        return entry

    def acquire(self, model_id: int) -> StoredModel:
        """+1 reference to a stored model."""
        with self._lock:
            entry = self._entry(model_id)
            entry.refs += 1
            return entry

    def release(self, model_id: int) -> None:
        """-1 reference; the last one unloads the model and retires its id forever."""
        with self._lock:
            entry = self._entry(model_id)
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._by_id[model_id]
            del self._by_sha[entry.sha256]
            for n in entry.names:
                if self._by_name.get(n) is entry:
                    del self._by_name[n]
            self._retired.add(model_id)

    def was_issued(self, model_id: int) -> bool:
        return 0 < model_id <= self._issued

    # ----------------------------------------------------------------------- accounting

    def models(self) -> list[StoredModel]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda e: e.id)

    @property
    def bytes_held(self) -> int:
        """Bytes of packed weights held by every stored model, each counted once."""
        with self._lock:
            return sum(e.bytes_held for e in self._by_id.values())

    # ----------------------------------------------------------------------- internals

    def _entry(self, model_id: int) -> StoredModel:
        """The live entry for `model_id` (call with the lock held): NotFound if released,
        UnknownModel if never issued."""
        entry = self._by_id.get(model_id)
        if entry is not None:
            return entry
        if model_id in self._retired:
            raise NotFound(f"model id {model_id} was released (ids are never reused)")
        raise UnknownModel(f"no model has id {model_id}")

    def _acquire_existing(self, sha: str, allowed: Allowed | None, names: Sequence[str] = ()) -> StoredModel | None:
        with self._lock:
            entry = self._by_sha.get(sha)
            if entry is None:
                return None
            _check_allowed(allowed, sha, sorted(entry.names | set(names)))
            self._add_names(entry, names)
            entry.refs += 1
            return entry

    def _load_once(self, sha: str, load: Callable[[], Model], names: list[str], allowed: Allowed | None) -> StoredModel:
        with self._lock:
            gate = self._loading.setdefault(sha, threading.Lock())
        with gate:
            existing = self._acquire_existing(sha, allowed, names)
            if existing is not None:
                return existing
            try:
                model = load()
            finally:
                with self._lock:
                    self._loading.pop(sha, None)
            held = model.bytes_held
            with self._lock:
                self._issued += 1
                entry = StoredModel(id=self._issued, sha256=sha, model=model, refs=1, bytes_held=held)
                self._by_id[entry.id] = entry
                self._by_sha[sha] = entry
                self._add_names(entry, [model.name, *names])
                return entry

    def _add_names(self, entry: StoredModel, names: Sequence[str]) -> None:
        for n in names:
            if n and n not in self._by_name:
                entry.names.add(n)
                self._by_name[n] = entry

    def _write_blob(self, sha: str, data: memoryview) -> Path:
        blobs = (self.home or catalogue.realm_home()) / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        dest = blobs / f"{sha}.gguf"
        if dest.is_file() and dest.stat().st_size == len(data):
            return dest
        atomic_write(dest, data)
        return dest


def _catalogue_names(sha: str) -> list[str]:
    return [e.name for e in catalogue.CATALOGUE.values() if e.sha256.lower() == sha]


def _check_allowed(allowed: Allowed | None, sha: str, names: Sequence[str]) -> None:
    if allowed is None:
        return
    if allowed(sha) or any(allowed(n) for n in names):
        return
    label = names[0] if names else f"sha256:{sha[:16]}…"
    raise PermissionDenied(f"this tenant may not use model {label}")
