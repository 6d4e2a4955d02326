"""The model store: ids, content hashes, shared and counted weights, permissions.

Real models throughout. The tests hand the store a loader that returns the session's
already-loaded smollm2 (and counts its calls), so the store's bookkeeping is tested
without loading the weights again; a real load from a blob stored by two tenants is in
tests/test_sandbox.py, and a malformed blob goes through the real loader below.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence

import pytest
import torch
from tiny_model import write_tiny_llama

from realm.backends.devices import Backend, BackendKind
from realm.engine.memory import weight_bytes
from realm.engine.model_store import ModelStore
from realm.errors import (
    HashMismatch,
    LimitExceeded,
    ModelFormatError,
    NotFound,
    PermissionDenied,
    UnknownModel,
)
from realm.models.gguf_file import TensorData
from realm.models.transformer import Linear

SMOL = "smollm2-135m"


class CountingLoader:
    """Stands in for load_model: returns the already-loaded model, counting the loads."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, path, backend, name=None, sha256=None, keep_packed=True):
        with self.lock:
            self.calls += 1
        return self.model


@pytest.fixture
def loader(smollm2):
    return CountingLoader(smollm2)


@pytest.fixture
def store(cpu_backend, loader, tmp_path):
    return ModelStore(cpu_backend, home=tmp_path, loader=loader)


def test_ids_are_sequential_from_one_and_never_reused(store, loader, smollm2_path, smollm2):
    first = store.store_path(smollm2_path, name=SMOL, sha256=smollm2.sha256)
    assert first.id == 1 and first.refs == 1
    again = store.store_path(smollm2_path, name=SMOL, sha256=smollm2.sha256)
    assert again is first and first.refs == 2 and loader.calls == 1
    store.release(1)
    store.release(1)
    with pytest.raises(NotFound, match="released"):
        store.get(1)
    renewed = store.store_path(smollm2_path, name=SMOL, sha256=smollm2.sha256)
    assert renewed.id == 2  # same content, but the old id is retired for good
    assert loader.calls == 2
    with pytest.raises(NotFound):
        store.validate(1, smollm2.sha256)
    assert store.validate(2, smollm2.sha256) is renewed


def test_validation_answers_ok_unknown_mismatch_and_released_with_distinct_codes(store, smollm2_path, smollm2):
    entry = store.store_path(smollm2_path, name=SMOL, sha256=smollm2.sha256)
    assert store.validate(entry.id, smollm2.sha256) is entry
    assert store.validate(entry.id, bytes.fromhex(smollm2.sha256)) is entry
    with pytest.raises(UnknownModel) as unknown:
        store.validate(99, smollm2.sha256)
    with pytest.raises(HashMismatch) as mismatch:
        store.validate(entry.id, "00" * 32)
    store.release(entry.id)
    with pytest.raises(NotFound) as released:
        store.validate(entry.id, smollm2.sha256)
    codes = {unknown.value.abi_code, mismatch.value.abi_code, released.value.abi_code}
    assert codes == {-3, -4, -12}


def test_the_path_is_hashed_when_no_hash_is_given(store, smollm2_path, smollm2):
    entry = store.store_path(smollm2_path)
    assert entry.sha256 == smollm2.sha256 and entry.digest == bytes.fromhex(smollm2.sha256)
    assert SMOL in entry.names  # the catalogue knows this content


def test_storing_the_same_bytes_twice_keeps_one_copy(store, loader, smollm2_path, smollm2, tmp_path):
    data = smollm2_path.read_bytes()
    a = store.store_bytes(data)
    held = store.bytes_held
    assert held == weight_bytes(smollm2.transformer.weights) > 50_000_000
    blob = tmp_path / "blobs" / f"{smollm2.sha256}.gguf"
    assert blob.stat().st_size == len(data)
    b = store.store_bytes(memoryview(data))
    assert b is a and a.refs == 2 and loader.calls == 1
    assert store.bytes_held == held  # no second copy of the weights
    by_path = store.store_path(smollm2_path, name=SMOL)
    assert by_path is a and a.refs == 3
    assert store.by_name(SMOL) is a and a.refs == 4


def test_bytes_that_are_not_a_model_are_refused(cpu_backend, tmp_path):
    store = ModelStore(cpu_backend, home=tmp_path, max_model_bytes=1 << 20)
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        store.store_bytes(b"\x7fELF and more")
    with pytest.raises(LimitExceeded, match="exceeds the limit"):
        store.store_bytes(b"GGUF" + bytes(2 << 20))
    with pytest.raises(ModelFormatError):
        store.store_bytes(b"GGUF" + bytes(4096))  # the real loader reads it and refuses
    assert not list((tmp_path / "blobs").glob("*.gguf"))  # nothing half-stored stays
    assert store.models() == []


def test_a_tenant_rule_refuses_models_it_does_not_allow(store, smollm2_path, smollm2):
    with pytest.raises(PermissionDenied, match="may not use"):
        store.store_path(smollm2_path, name=SMOL, sha256=smollm2.sha256, allowed=lambda m: m == "gemma3-270m")
    entry = store.store_path(smollm2_path, name=SMOL, sha256=smollm2.sha256, allowed=lambda m: m == SMOL)
    with pytest.raises(PermissionDenied):
        store.validate(entry.id, smollm2.sha256, allowed=lambda m: False)
    # a rule on the content hash works for bytes of any name
    assert store.store_bytes(smollm2_path.read_bytes(), allowed=lambda m: m == smollm2.sha256) is entry


def test_by_name_finds_stored_configured_and_cached_models_but_never_fetches(
    cpu_backend, loader, smollm2_path, tmp_path
):
    store = ModelStore(cpu_backend, home=tmp_path, loader=loader, paths={"mine": smollm2_path})
    with pytest.raises(UnknownModel, match="no model named"):
        store.by_name("no-such-model")
    mine = store.by_name("mine")
    assert "mine" in mine.names and loader.calls == 1
    # the catalogue name resolves to the cached file: same content, same model
    assert store.by_name(SMOL) is mine and loader.calls == 1


def test_concurrent_stores_of_one_model_load_it_once(store, loader, smollm2_path, smollm2):
    got = []
    threads = [
        threading.Thread(target=lambda: got.append(store.store_path(smollm2_path, sha256=smollm2.sha256)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loader.calls == 1 and len({id(e) for e in got}) == 1 and got[0].refs == 4


# -- a GPU that cannot take a model ------------------------------------------------------------
# There is no GPU here: these are unit tests of the fallback, with a backend whose packing
# fails the way a device does (torch.cuda.OutOfMemoryError is a RuntimeError raised while
# the weights are copied over). Its tensors stay on the CPU, so nothing else is faked.


@dataclasses.dataclass(frozen=True)
class FailingDevice(Backend):
    """A backend whose device refuses the weights."""

    error: RuntimeError = dataclasses.field(default_factory=RuntimeError)

    def pack_linear(self, tensors: Sequence[TensorData]) -> Linear:
        raise self.error


def test_a_model_the_gpu_cannot_take_runs_on_the_cpu(tmp_path, caplog):
    full = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    gpu = FailingDevice(BackendKind.GPU, torch.device("cpu"), "cuda (full)", error=full)
    store = ModelStore(gpu, home=tmp_path)
    with caplog.at_level(logging.WARNING, logger="realm.engine.model"):
        entry = store.store_path(write_tiny_llama(tmp_path / "tiny.gguf"), name="tiny")
    assert entry.model.backend.kind == BackendKind.CPU
    info = entry.info()
    assert (info["backend"], info["device"]) == ("cpu", "cpu")
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert "tiny" in warning[0].getMessage() and "CUDA out of memory" in warning[0].getMessage()
    assert entry.model.new_session().feed([1, 2, 3]).shape == (1, entry.model.config.vocab_size)


def test_a_cpu_that_fails_is_the_end_of_the_chain(tmp_path):
    cpu = FailingDevice(BackendKind.CPU, torch.device("cpu"), "cpu (broken)", error=RuntimeError("no memory"))
    store = ModelStore(cpu, home=tmp_path)
    with pytest.raises(RuntimeError, match="no memory"):
        store.store_path(write_tiny_llama(tmp_path / "tiny.gguf"), name="tiny")
    assert store.models() == []
