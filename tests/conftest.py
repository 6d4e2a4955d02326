"""Shared fixtures: the two real models, fetched through the same pull code users run
(cached in $REALM_HOME between runs), and loaded once per test session.

Models decode eagerly unless a test asks for `smollm2_compiled` / `gemma3_compiled`: those
build the compiled decode step once per machine and code (about a minute each on 2 cores,
then cached in $REALM_HOME/compiled), and the tests that use them are marked `compiled`,
which `make test-fast` leaves out. Nothing else compiles or starts a background build: the
suite runs with REALM_COMPILE=off unless a test sets it for a process of its own.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from realm.server.settings import RAY_SERVE_ENVIRONMENT

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
COMPILED_FIXTURES = {"smollm2_compiled", "gemma3_compiled"}

torch.set_num_threads(2)
os.environ["REALM_COMPILE"] = "off"
os.environ.update(RAY_SERVE_ENVIRONMENT)  # before a test module imports Ray Serve (test_ray.py)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a compiled model is marked `compiled`, directly or through a fixture."""
    for item in items:
        if COMPILED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.compiled)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.fail(f"reference data not found at {REFERENCE} (expected ../shared/reference)")
    return REFERENCE


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from realm.models.catalogue import pull

    return pull("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from realm.models.catalogue import pull

    return pull("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def cpu_backend():
    from realm.backends.devices import BackendRegistry

    return BackendRegistry("cpu").active


@pytest.fixture(scope="session")
def smollm2(smollm2_path, cpu_backend):
    from realm.engine.model import load_model

    return load_model(smollm2_path, cpu_backend, name="smollm2-135m")


@pytest.fixture(scope="session")
def gemma3(gemma3_path, cpu_backend):
    from realm.engine.model import load_model

    return load_model(gemma3_path, cpu_backend, name="gemma3-270m")


def _compiled(path: Path, backend, name: str):
    from realm.engine import compiled_build
    from realm.engine.model import load_model

    model = load_model(path, backend, name=name, compile_mode="cached")
    if not model.transformer.compiled:
        compiled_build.build(model)
    assert model.transformer.compiled
    return model


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2_path, cpu_backend):
    """smollm2 decoding through its compiled step (built now if this machine has none)."""
    return _compiled(smollm2_path, cpu_backend, "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_compiled(gemma3_path, cpu_backend):
    return _compiled(gemma3_path, cpu_backend, "gemma3-270m")


@functools.cache
def metadata_of(path: Path) -> dict:
    """A GGUF's metadata as the engine reads it, read once per test session."""
    from realm.models.gguf_file import GGUFFile

    return GGUFFile(path).metadata


REFERENCE_FILES = {
    "smollm2": "smollm2-135m-instruct-q4_1",
    "gemma3": "gemma3-270m-q4_k_m",
}


def load_reference(name: str) -> tuple[np.lib.npyio.NpzFile, dict]:
    stem = REFERENCE / REFERENCE_FILES[name]
    return np.load(f"{stem}.logits.npz"), json.loads(Path(f"{stem}.logits.json").read_text())
