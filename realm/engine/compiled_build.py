"""Building a model's compiled decode step: in this process (`realm compile`), in worker
processes one graph a core, or as the background build that engine/compiled_step.py starts
(`main`, run at idle priority). Kept apart from compiled_step so that loading a model, which
attaches its step, never imports the loader back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from realm.backends import compiled
from realm.backends.devices import cpu_backend
from realm.engine.compiled_step import build_lock, use_artifacts
from realm.engine.kv_cache import BLOCK
from realm.engine.model import Model, load_model
from realm.errors import InternalError

log = logging.getLogger(__name__)


def build(model: Model, on_stage: Callable[[str], None] = lambda _: None) -> Path:
    """Build `model`'s artifacts now (unless another process just did) and switch it to
    them: what `realm compile` runs."""
    with build_lock(model.sha256):
        if not use_artifacts(model):
            directory = compiled.build(model.transformer, model.sha256, _graph_builder(model, on_stage))
            if not use_artifacts(model):
                raise InternalError(f"the compiled decode step built in {directory} does not load")
    return compiled.artifact_dir(model.sha256)


def _graph_builder(model: Model, on_stage: Callable[[str], None]) -> Callable[[list, Path], dict[str, str]]:
    """Builds a model's graphs one per core at once, each in a worker process of its own
    (tracing and code generation are Python, one core each: on 2 cores gemma3's six graphs
    took 182 s one after another, 121 s two at a time). A worker loads the model once."""

    def build_graphs(jobs: list[tuple[str, str]], scratch: Path) -> dict[str, str]:
        workers = min(len(jobs), os.cpu_count() or 1)
        on_stage(f"compiling {len(jobs)} graphs, {workers} at a time")
        if workers == 1:
            return dict(compiled.build_graph(model.transformer, job, BLOCK, scratch) for job in jobs)
        files: dict[str, str] = {}
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            pending = [pool.submit(_build_in_worker, str(model.path), model.sha256, job, str(scratch)) for job in jobs]
            for done in as_completed(pending):
                name, digest = done.result()
                files[name] = digest
                on_stage(f"compiled {len(files)} of {len(jobs)} graphs")
        return files

    return build_graphs


_worker_models: dict[str, Model] = {}


def _build_in_worker(path: str, sha256: str, job: tuple[str, str], scratch: str) -> tuple[str, str]:
    torch.set_num_threads(1)  # one graph a core
    if path not in _worker_models:
        _worker_models[path] = load_model(path, cpu_backend(), sha256=sha256, compile_mode="off")
    return compiled.build_graph(_worker_models[path].transformer, job, BLOCK, Path(scratch))


def main(argv: list[str]) -> int:
    """The background build of the model at GGUF with this SHA-256 (argv). It takes the lock
    before it loads the model, so that `status` says `building` from its first seconds (and
    so does not call `build`, which would take the lock a second time)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path, sha256 = argv
    with build_lock(sha256):
        if compiled.has_artifacts(sha256):
            return 0
        model = load_model(path, cpu_backend(), sha256=sha256, compile_mode="off")
        directory = compiled.build(model.transformer, sha256, _graph_builder(model, lambda what: log.info("%s", what)))
    log.info("built %s", directory)
    return 0
