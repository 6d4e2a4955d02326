"""The decode step as one compiled graph (torch.compile with Inductor) on the CPU.

Eagerly, a decode step spends more time dispatching its ~60 small PyTorch operations per
layer than running them: on smollm2 about 4.7 ms of a 9 ms token went to operations other
than the int4 products. Inductor fuses them into a few C++ loops around the products and
the attention gather, and its C++ wrapper (`cpp_wrapper`) calls those loops and the
products from C++ too: no Python runs between kernels, and the whole step runs without
the GIL, which the server's guests and HTTP loop need meanwhile. Against Inductor's Python
wrapper, a lone smollm2 step went from 5.5-5.8 ms to 4.9-5.6 ms (3 alternating runs,
medians of 30 steps); a batch of 8 ran the same. One graph with dynamic batch size and
length serves every batch of two or more; a lone sequence gets a graph of its own (dynamo
specialises size 1), which carries its activations as compensated pairs (backends/linear.py).

Costs and safety:
- The first decode step of a model shape compiles: about three minutes on 2 cores for the
  two graphs, twice what the Python wrapper took, once per machine. Inductor caches the
  result on disk, under `$REALM_HOME/compiled` unless TORCHINDUCTOR_CACHE_DIR says
  otherwise; a cached graph loads in seconds.
- The graph keeps the guards on its inputs and their sizes, none on the model: guarding
  every weight of every layer cost ~0.8 ms a step. (The size guards must stay: without
  them a lone sequence ran through the batch graph, which rounds its activations.) Each
  model compiles over its own copy of the step's code (`_own_code`), so its graphs are its
  own, and a model never changes after loading.
- If compiling fails (no C++ compiler, say) the step runs eagerly, with one warning.
  REALM_COMPILE=0 turns compiling off.
"""

from __future__ import annotations

import logging
import os
import re
import types
from typing import Any, Callable

import torch

from realm.models import catalogue

log = logging.getLogger(__name__)

_DECODE_INPUTS = ("x", "positions", "blocks", "offsets", "tables", "rope", "keys", "values")


def compile_enabled() -> bool:
    return os.environ.get("REALM_COMPILE", "1") not in ("0", "false", "no", "off")


def _keep_guard(entry: Any) -> bool:
    """Guards on the step's inputs and the unnamed ones (the shape environment's, which keep
    a lone sequence off the batch graph, and global state); none on the model (`self`)."""
    return re.split(r"[.\[]", entry.name, maxsplit=1)[0] in (*_DECODE_INPUTS, "")


def _own_code(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The bound method `step` over a copy of its code: dynamo keeps compiled graphs per
    code object, so each model gets graphs of its own, and with no guards on the model
    none can ever run another model's graph."""
    fn = step.__func__  # type: ignore[attr-defined]
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(copy, step.__self__)  # type: ignore[attr-defined]


def _mark_dynamic(x, positions, blocks, offsets, tables, rope, keys, values) -> None:  # noqa: ANN001
    """The sizes that change from step to step: batch, blocks attended, blocks in the pool.
    Everything else (every weight) stays static, which keeps compiling to minutes."""
    for t in (x, positions, blocks, offsets, tables, *(t for pair in rope for t in pair)):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(tables, 1)
    for t in (*keys, *values):
        torch._dynamo.maybe_mark_dynamic(t, 0)


def compile_decode(step: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`step` compiled; on a compile failure, `step` itself from then on."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(catalogue.realm_home() / "compiled"))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Round to bf16 where the code says so, even inside a fused kernel: the compensated
    # products (backends/linear.py) take lo = x - bf16(x), which is 0 if bf16(x) stays f32.
    torch._inductor.config.emulate_precision_casts = True
    options = {"guard_filter_fn": lambda entries: [_keep_guard(e) for e in entries], "cpp_wrapper": True}
    compiled = torch.compile(_own_code(step), options=options)
    broken = False

    def run(*args: Any) -> torch.Tensor:
        nonlocal broken
        if broken:
            return step(*args)
        try:
            _mark_dynamic(*args)
            return compiled(*args)
        except Exception as exc:
            out = step(*args)  # the input's own fault raises here, and compiling stays on
            broken = True
            log.warning("compiling the decode step failed, running it eagerly: %s", exc)
            return out

    return run
