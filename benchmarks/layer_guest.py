"""A guest at ABI level 2 (per-layer calls) beside a decoding sequence: does it slow it?

    .venv/bin/python benchmarks/layer_guest.py [--rounds 2] [--steps 600]

In one process, as a server holds them: smollm2-135m behind a BatchScheduler and the
sandbox's SchedulerRouter. One thread decodes a sequence through the scheduler (greedy,
--steps steps) and reports its time per step (p50, p99); meanwhile `guest/dispatch.c` at
level "layer" generates 4-token requests in a loop on its own thread. Each round measures
the sequence alone, then beside the guest with its per-layer calls on the model's runner
thread (what the host does), then with them on the guest's own thread (what it did before:
that thread then holds an OpenMP team of its own, which throttles every parallel region of
the runner's steps; realm/engine/scheduler.py, RUNNER_IDLE_S). It also reports the
guest's tokens per second in each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from realm.settings import SERVING_SPIN_COUNT  # noqa: E402

os.environ.setdefault("GOMP_SPINCOUNT", SERVING_SPIN_COUNT)  # the server's, before torch loads libgomp

from anchor import cpu_model  # noqa: E402
from sandbox_helpers import greedy_request, make_runtime  # noqa: E402

from realm.backends.devices import cpu_backend  # noqa: E402
from realm.engine.model import load  # noqa: E402
from realm.engine.scheduler import BatchScheduler  # noqa: E402
from realm.engine.step_router import SchedulerRouter  # noqa: E402
from realm.models.catalogue import pull  # noqa: E402

MODEL = "smollm2-135m"


class GuestThreadRouter(SchedulerRouter):
    """The router as it was: other model work runs on the calling (guest's) thread."""

    def call(self, transformer: Any, fn: Callable[[], Any]) -> Any:
        return fn()


def on_a_thread(fn: Callable[[], Any]) -> Any:
    """fn() on a thread that ends with it (so its OpenMP team ends too)."""
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    model = on_a_thread(lambda: load(MODEL, cpu_backend(), progress=False))
    scheduler = BatchScheduler(model.transformer)
    routers = {"runner thread": SchedulerRouter(), "guest's thread": GuestThreadRouter()}
    for router in routers.values():
        router.add(scheduler)
    runtime = make_runtime({MODEL: (pull(MODEL, progress=False), model)}, Path(tempfile.mkdtemp()))
    guest = runtime.load_module(REPO / "guest" / "build" / "dispatch.wasm")

    def decode() -> tuple[float, float]:
        session = model.new_session(args.steps + 16)
        row = scheduler.step(session, model.encode_prompt("Once upon a time"))
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            row = scheduler.step(session, [int(np.argmax(row))])
            times.append(time.perf_counter() - started)
        times.sort()
        return 1000 * statistics.median(times), 1000 * times[int(0.99 * (len(times) - 1))]

    def beside_guest(router: SchedulerRouter) -> tuple[float, float, float]:
        runtime.steps = router
        stop, tokens = threading.Event(), [0]

        def generate() -> None:
            while not stop.is_set():
                with runtime.instance(guest, tenant="layer") as instance:
                    request = greedy_request(runtime, MODEL, "The capital of France is", 4) | {"level": "layer"}
                    tokens[0] += len(instance.generate(request).tokens)

        neighbour = threading.Thread(target=generate)
        neighbour.start()
        time.sleep(1.0)
        started, tokens[0] = time.perf_counter(), 0
        p50, p99 = on_a_thread(decode)
        rate = tokens[0] / (time.perf_counter() - started)
        stop.set()
        neighbour.join()
        return p50, p99, rate

    rows: dict[str, list[tuple[float, ...]]] = {"alone": [], **{name: [] for name in routers}}
    for _ in range(args.rounds):
        rows["alone"].append(on_a_thread(decode))
        for name, router in routers.items():
            rows[name].append(beside_guest(router))
    scheduler.close()
    print(f"{cpu_model()}; {MODEL}, a sequence decoding through the scheduler, {args.steps} steps a round")
    for name, figures in rows.items():
        p50 = statistics.median(f[0] for f in figures)
        p99 = statistics.median(f[1] for f in figures)
        line = f"  {'alone' if name == 'alone' else 'beside the guest, its calls on the ' + name:52}"
        line += f" step p50 {p50:5.2f} ms, p99 {p99:5.2f} ms"
        if name != "alone":
            line += f"; the guest: {statistics.median(f[2] for f in figures):.1f} tokens/s"
        print(line)


if __name__ == "__main__":
    main()
