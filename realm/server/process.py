"""The server as a process: uvicorn around the app, with the signals an operator sends.

SIGTERM (or Ctrl-C) drains: new requests get 503 (and /health, so a load balancer stops
sending) while the running ones finish, for up to `shutdown_grace_s`; then the guests
still running are stopped, their clients get a 503 error (in the stream, if it had
started), and the process exits. A second signal exits at once.

SIGHUP reads the config again and takes its API keys: a revoked key is refused from the
next request on, without a restart (Host.reload_keys says what else would need one).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from realm.errors import RealmError
from realm.models.gguf_file import few_heap_arenas
from realm.server.app import create_app
from realm.server.host import Host
from realm.server.settings import ServerSettings

log = logging.getLogger("realm.server")

GIL_SWITCH_S = 0.0005
"""How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
The model runner releases the GIL in every tensor operation and takes it back after; with
a hundred streams' guests and the event loop wanting it too, each take-back waited up to
the interval. On a machine busy with other work (load 7-14 on 2 cores), a 100-client flood
served in-process took 93 s at 0.5 ms against 195 s at 5 ms; on a quiet machine
benchmarks/flood.py shows no difference either way (11 s both), nor does one stream."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first exit signal starts a drain instead of the exit."""

    def __init__(self, config: uvicorn.Config, host: Host, grace_s: float) -> None:
        super().__init__(config)
        self.host = host
        self.grace_s = grace_s
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and self.host.ready.is_set():
            self.drain_started = time.monotonic()
            self.host.drain()
            log.info(
                "shutting down: %d requests running, given up to %.0f s to finish (signal again to stop now)",
                self.host.running(),
                self.grace_s,
            )
            return
        self.host.stop_running()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            late = time.monotonic() - self.drain_started >= self.grace_s
            if late and self.host.running():
                log.warning("stopping %d requests still running after %.0f s", self.host.running(), self.grace_s)
                self.host.stop_running()
            if late or not self.host.running():
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: ServerSettings, reread: Callable[[], ServerSettings], log_level: str) -> BaseException | None:
    """Run the server for `settings` until it is told to stop; `reread` reads the config
    again on SIGHUP. Returns the error that kept it from starting, if one did."""
    sys.setswitchinterval(GIL_SWITCH_S)
    few_heap_arenas()
    application = create_app(settings)
    host: Host = application.state.host
    server = DrainingServer(
        uvicorn.Config(
            application,
            host=settings.host,
            port=settings.port,
            log_level=log_level,
            timeout_graceful_shutdown=5,
        ),
        host,
        settings.shutdown_grace_s,
    )

    def failed_to_load(error: BaseException) -> None:
        server.should_exit = True

    def reload(signum: int, frame: FrameType | None) -> None:
        try:
            fresh = reread()
        except RealmError as e:
            log.error("SIGHUP: the config was not reloaded, the keys stay as they were: %s", e)
            return
        for warning in host.reload_keys(fresh):
            log.warning("SIGHUP: %s", warning)
        log.info("SIGHUP: API keys reloaded (%d tenant keys)", len(host.keys))

    application.state.on_load_error = failed_to_load
    previous = signal.signal(signal.SIGHUP, reload)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGHUP, previous)
    return host.load_error
