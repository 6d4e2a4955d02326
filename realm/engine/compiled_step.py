"""A loaded model's compiled decode step: taken from the cache, built on request, or built
by a background process while the eager step serves, and picked up when it is ready.

A user never waits on a compile they did not ask for: a model without artifacts starts at
once on the eager step. In `auto` mode (REALM_COMPILE, see backends/compiled.py) loading
such a model starts a build in a process at idle priority, which outlives a short `realm
run`; a server watches it and switches its model to the compiled step between two decode
steps when it ends (sequences already running keep the step they began with). One build
runs per model at a time (a lock file beside the artifacts); a second process waits for
it instead of building too.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from realm.backends import compiled
from realm.backends.devices import BackendKind

if TYPE_CHECKING:
    from realm.engine.model import Model

log = logging.getLogger(__name__)


def can_compile(model: Model) -> bool:
    return model.backend.kind == BackendKind.CPU


def attach(model: Model, mode: str | None = None) -> str:
    """Switch `model` to its compiled step if its artifacts are on disk; in `auto` mode
    start building them in the background if not. Returns what the model decodes with
    now and next: `compiled`, `building` (eager until the build ends) or `eager`."""
    mode = mode or compiled.compile_mode()
    if mode == "off" or not can_compile(model):
        return "eager"
    if use_artifacts(model):
        return "compiled"
    if mode == "auto":
        BackgroundBuild(model).start()
        return "building"
    return "eager"


def status(sha256: str) -> str:
    """`compiled`, `building` or `none` for a model's artifacts on this machine and code."""
    if compiled.has_artifacts(sha256):
        return "compiled"
    if sha256 in _started:
        return "building"
    lock = _lock_path(sha256)
    if lock.exists():
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return "building"
    return "none"


def use_artifacts(model: Model) -> bool:
    """Switch `model` to its compiled step if its artifacts are on disk and load."""
    if not compiled.has_artifacts(model.sha256):
        return False
    t = model.transformer
    step = compiled.load(compiled.artifact_dir(model.sha256), t.weights.layers, compiled.layers_per_graph(t.config))
    if step is None:
        return False
    t.use_decode_graph(step)
    return True


def _lock_path(sha256: str) -> Path:
    directory = compiled.artifact_dir(sha256)
    return directory.with_name(directory.name + ".lock")


@contextmanager
def build_lock(sha256: str) -> Iterator[None]:
    """Held by whoever builds this model's artifacts; the kernel drops it if they die."""
    path = _lock_path(sha256)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


_AT_IDLE_PRIORITY = (
    "import os, sys\n"
    "try:\n"
    "    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "except (AttributeError, OSError):\n"
    "    os.nice(19)\n"
    "from realm.engine.compiled_build import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
"""The build's process, at idle priority from before it imports torch. Even at nice 10 a
build's start slowed a foreground eager decode tenfold on 2 cores: each of the thousands
of parallel regions a token waits at a barrier for whichever of its threads the build had
preempted. SCHED_IDLE (Linux) takes no time slice from a thread that wants one. Set in the
new process, not in a thread of this one: an idle thread holding the GIL stalls them all.
The process gets a process group of its own (Ctrl-C on a `realm run` leaves the build
alone) but not a session: Linux schedules each session as a group (autogroup), and a
session of its own would get half the CPU whatever its threads' priority (measured: an
eager decode 6-30x slower beside an idle-priority build in its own session, 1.2x in ours)."""


_started: set[str] = set()
"""Models whose background build this process started and has not seen end (the build
takes the lock only once it has imported torch)."""


class BackgroundBuild:
    """A build in a process of its own (detached, low priority, logging to a file beside
    the artifacts) and a thread that switches the model over when it ends."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.log_path = compiled.artifact_dir(model.sha256).with_suffix(".log")

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        _started.add(self.model.sha256)
        threading.Thread(target=self._build, daemon=True, name=f"realm-compile-{self.model.name}").start()

    def _build(self) -> None:
        argv = [sys.executable, "-c", _AT_IDLE_PRIORITY, str(self.model.path), self.model.sha256]
        with open(self.log_path, "ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                env={**os.environ, "REALM_COMPILE": "off"},
            )
        log.warning(
            "%s: no compiled decode step yet; decoding eagerly while process %d builds it (a few minutes, log in %s)",
            self.model.name,
            process.pid,
            self.log_path,
        )
        code = process.wait()
        _started.discard(self.model.sha256)
        if code != 0:
            log.error(
                "%s: building the compiled decode step failed (exit %d); see %s", self.model.name, code, self.log_path
            )
        elif use_artifacts(self.model):
            log.warning("%s: switched to the compiled decode step", self.model.name)
