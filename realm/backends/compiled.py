"""The decode step compiled ahead of time (torch.export + AOTInductor), loaded as a library.

Eagerly, a decode step spends more time dispatching its ~60 small PyTorch operations per
layer than running them. Inductor fuses them into a few C++ loops around the matrix
products, and AOTInductor writes the whole step, wrapper included, as one shared library:
no Python runs between kernels, and run through Realm's native library (when it is
built) the GIL is free while it runs, which the server's guests and HTTP loop need
meanwhile.

Built once, ahead of time, never in a user's way (`realm compile`, `realm pull --compile`,
or a background process that a first run starts): loading the library takes milliseconds,
where `torch.compile` re-traced the step in every process (~20 s) and compiled it for
minutes on first use. A model runs its eager step until its artifacts are there.

What is compiled is a run of `layers_per_graph` layers with their weights as inputs, not
constants, so one small graph serves every run of layers whose weights have the same
shapes (five calls a step for smollm2's 30 layers, three for gemma3's 18): a fifth of the
tracing and C++ that the whole unrolled step took (a graph builds in about 25 s on one
core instead of 100). Each kind of run gets two graphs: one for a lone sequence, whose
activations go in as compensated pairs (backends/linear.py), and one for any batch of two
rows or more, rounded to bf16. smollm2 has one kind of run, gemma3's Q4_K_M file three.

Artifacts live in `$REALM_HOME/compiled/<key>/`, the key hashing everything that makes
them invalid: the artifact format, torch's version, the CPU's features, the model's SHA-256
and the source of the code that is compiled. A manifest written last lists each file's
SHA-256; a missing, truncated or altered file is a warning and a rebuild, never a crash.
REALM_COMPILE=off runs the eager step only; =cached uses artifacts but never builds them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from realm.backends import linear, native
from realm.files import source_digest
from realm.models import catalogue, config, quants, transformer
from realm.models.transformer import KV_DTYPE, LayerWeights, Transformer
from realm.settings import host_settings

log = logging.getLogger(__name__)

FORMAT = 2
"""Bumped whenever the layout of an artifact directory changes."""
MIN_LAYERS_PER_GRAPH = 6
"""Fewer layers a graph means faster builds but more calls a step (each ~20 us and a trip
through the GIL); six keeps a step at three to five calls for the models we run."""
GRAPHS = {"lone": 1, "batch": 2}
"""Graph kind -> the rows of the example it is traced with (a batch graph takes 2 and up)."""
_SOURCES = (transformer, linear, quants, config)  # the code a graph is made of, besides this module

Graph = Callable[[list[torch.Tensor]], list[torch.Tensor]]
"""A loaded graph: its inputs in, its outputs out."""


def compile_mode() -> str:
    """REALM_COMPILE: `auto` (default: use the artifacts, build missing ones in the
    background), `cached` (use them, never build) or `off` (the eager step only)."""
    return host_settings().compile


def layers_per_graph(cfg: config.ModelConfig) -> int:
    """The fewest layers (at least MIN_LAYERS_PER_GRAPH) that divide the model into equal
    runs with the same pattern of sliding-window layers, so one graph serves them all."""
    n = cfg.n_layers
    for size in range(min(MIN_LAYERS_PER_GRAPH, n), n + 1):
        if n % size == 0 and all(cfg.is_sliding(i) == cfg.is_sliding(i % size) for i in range(n)):
            return size
    return n


# --------------------------------------------------------------------------- artifact keys


@functools.cache
def _cpu_features() -> str:
    """What the generated code may rely on: the ISA PyTorch picked and the CPU's flags."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} {flags}"


@functools.cache
def _code_version() -> str:
    return source_digest((*_SOURCES, __import__(__name__, fromlist=["_"])))


def artifact_key(model_sha256: str) -> str:
    parts = {
        "format": FORMAT,
        "torch": torch.__version__,
        "cpu": _cpu_features(),
        "code": _code_version(),
        "kernel": native.identity(),
        "model": model_sha256,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def artifact_dir(model_sha256: str) -> Path:
    return catalogue.realm_home() / "compiled" / artifact_key(model_sha256)


def has_artifacts(model_sha256: str) -> bool:
    """Whether a complete build for this model, machine and code is on disk (not checked
    byte for byte: `load` does that)."""
    return (artifact_dir(model_sha256) / "manifest.json").is_file()


# --------------------------------------------------------------------------- the layers as a pytree

# The layers go into the exported graph as inputs: torch.export flattens them to tensors
# through these registrations, and a call hands the same tensors over in the same order.


def _register(cls: type, tensors: Sequence[str], context: Sequence[str], **fixed: Any) -> None:
    """`cls` as a pytree: the tensor attributes `tensors` are its leaves, the attributes
    `context` (plain ints) go into its spec, and `fixed` is set on every rebuilt object
    (the graph reads only what it was given: no dense prefill copies)."""

    def flatten(obj: Any) -> tuple[list[torch.Tensor], tuple]:
        return [getattr(obj, n) for n in tensors], tuple(getattr(obj, n) for n in context)

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, torch.Tensor]], tuple]:
        leaves, spec = flatten(obj)
        return [(pytree.GetAttrKey(n), t) for n, t in zip(tensors, leaves)], spec

    def unflatten(leaves: Iterable[torch.Tensor], spec: tuple) -> Any:
        obj: Any = object.__new__(cls)
        for name, value in (*zip(tensors, leaves), *zip(context, spec), *fixed.items()):
            setattr(obj, name, value)
        return obj

    pytree.register_pytree_node(
        cls, flatten, unflatten, serialized_type_name=f"realm.{cls.__name__}", flatten_with_keys_fn=flatten_with_keys
    )


_SHAPE = ("out_features", "in_features")
_register(linear.Int4Linear, ("packed", "scales_zeros"), ("n_planes", *_SHAPE), dense=None)
_register(linear.NativeInt4Linear, ("codes", "scales", "mins"), _SHAPE)
_register(linear.NativeInt5Linear, ("codes", "scales", "mins"), _SHAPE)
_register(linear.NativeInt8Linear, ("codes", "scales"), ("scales_per_block", *_SHAPE))
_register(linear.DenseLinear, ("weight",), _SHAPE)
torch.export.register_dataclass(LayerWeights, serialized_type_name="realm.LayerWeights")


# --------------------------------------------------------------------------- running


def runs_of(layers: Sequence[LayerWeights], per_graph: int) -> list[list[LayerWeights]]:
    return [list(layers[i : i + per_graph]) for i in range(0, len(layers), per_graph)]


def weights_signature(run: Sequence[LayerWeights]) -> str:
    """What a graph assumes of a run's weights: their structure, shapes and dtypes. Runs of
    one model can differ (gemma3's Q4_K_M file mixes two kinds of layer), and each distinct
    signature gets graphs of its own."""
    leaves, spec = pytree.tree_flatten(list(run))
    shapes = [(list(t.shape), str(t.dtype)) for t in leaves]
    return hashlib.sha256(json.dumps([str(spec), shapes]).encode()).hexdigest()[:16]


class CompiledDecode:
    """`Transformer.decode_layers` as calls of compiled graphs, one per run of layers, the
    step's x going through each run in turn; `graphs[i]` is run i's (lone, batch) pair."""

    def __init__(self, graphs: Sequence[tuple[Graph, Graph]], runs: Sequence[Sequence[LayerWeights]]) -> None:
        self._per_graph = len(runs[0])
        self._runs = [(lone, batch, pytree.tree_leaves(list(run))) for (lone, batch), run in zip(graphs, runs)]

    def __call__(self, x: torch.Tensor, *inputs: Any) -> torch.Tensor:
        """x and the other inputs of `Transformer.decode_layers` after the layers."""
        positions, blocks, offsets, tables, rope, keys, values = inputs
        lone = x.shape[0] == 1
        shared = [t.contiguous() for t in (positions, blocks, offsets, tables, *(t for pair in rope for t in pair))]
        n = self._per_graph
        for g, (run_lone, run_batch, weights) in enumerate(self._runs):
            run = run_lone if lone else run_batch
            x = run([*weights, x.contiguous(), *shared, *keys[g * n : (g + 1) * n], *values[g * n : (g + 1) * n]])[0]
        return x


def load(directory: Path, layers: Sequence[LayerWeights], per_graph: int) -> CompiledDecode | None:
    """The compiled step from `directory`, or None (with a warning, and the directory
    removed so that it is built again) if any file is missing, altered or unloadable, or
    was built for weights of other shapes."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        runs = runs_of(layers, per_graph)
        signatures = [weights_signature(r) for r in runs]
        if manifest["layers_per_graph"] != per_graph or manifest["runs"] != signatures:
            raise ValueError("it was built for weights of other shapes")
        graphs: dict[str, tuple[Graph, Graph]] = {}
        for sig in dict.fromkeys(signatures):
            pair: list[Graph] = []
            for kind in GRAPHS:
                path = directory / f"{kind}-{sig}.pt2"
                with open(path, "rb") as f:
                    if hashlib.file_digest(f, "sha256").hexdigest() != manifest["files"][path.name]:
                        raise ValueError(f"{path.name} does not match its manifest (truncated or altered)")
                pair.append(_load_package(path))
            graphs[sig] = (pair[0], pair[1])
        return CompiledDecode([graphs[s] for s in signatures], runs)
    except Exception as e:  # any defect of a cached file: rebuild rather than fail
        log.warning("ignoring the compiled decode step in %s (%s); it will be built again", directory, e)
        shutil.rmtree(directory, ignore_errors=True)
        return None


def _load_package(path: Path) -> Graph:
    """A graph's package, run through Realm's native library when it is loaded: PyTorch's
    own binding of AOTInductor's loader holds the GIL for the whole step, which kept the
    server's event loop and guests waiting on every step (see compiled_runner.cpp).
    AOTInductor's loader itself, not `torch._inductor.package.load_package`, which wraps
    the same object but costs about 2 s to import, more than the rest of a warm start."""
    if native.load():
        return functools.partial(torch.ops.realm.run_compiled, torch.classes.realm.CompiledPackage(str(path)))
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).run


# --------------------------------------------------------------------------- building


class _Step(torch.nn.Module):
    """What torch.export traces: the decode layers as a function of their weights."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, layers: list[LayerWeights], *inputs: Any) -> torch.Tensor:
        return self.model.decode_layers(layers, *inputs)


def _example(model: Transformer, rows: int, per_graph: int, block_size: int) -> tuple:
    """Inputs of the shapes a step sees (values do not matter): `rows` tokens over a
    pool of 4 blocks, each row's table 2 blocks long."""
    cfg = model.config
    positions = torch.zeros(rows, dtype=torch.long)
    pool = [torch.zeros(4, cfg.n_kv_heads, block_size, cfg.head_dim, dtype=KV_DTYPE) for _ in range(2 * per_graph)]
    return (
        torch.zeros(rows, cfg.dim),
        positions,
        torch.ones(rows, dtype=torch.long),
        torch.zeros(rows, dtype=torch.long),
        torch.ones(rows, 2, dtype=torch.long),
        model.rope_tables(positions, torch.device("cpu")),
        pool[:per_graph],
        pool[per_graph:],
    )


def _dynamic_shapes(example: tuple, rows: int) -> Any:
    """Which sizes vary from call to call: rows (batch graph only), the blocks a row's
    table holds, the blocks in the pool. Every weight's shape is fixed."""
    from torch.export import Dim, ShapesCollection

    b = Dim("rows", min=2, max=transformer.GRAPH_CELLS) if rows > 1 else None
    n, pool = Dim("table", min=2, max=1 << 20), Dim("pool", min=2, max=1 << 24)
    x, positions, blocks, offsets, tables, rope, keys, values = example
    shapes = ShapesCollection()
    for t in (x, positions, blocks, offsets, *(t for pair in rope for t in pair)):
        shapes[t] = {0: b} if b else {}
    shapes[tables] = {0: b, 1: n} if b else {1: n}
    for t in (*keys, *values):
        shapes[t] = {0: pool}
    return shapes


def graph_jobs(model: Transformer) -> list[tuple[str, str]]:
    """The graphs a model needs, as (weights signature, kind): each distinct run of layers
    in a lone and a batch version. They build independently (`build_graph`)."""
    runs = runs_of(model.weights.layers, layers_per_graph(model.config))
    return [(sig, kind) for sig in dict.fromkeys(weights_signature(r) for r in runs) for kind in GRAPHS]


def build_graph(model: Transformer, job: tuple[str, str], block_size: int, scratch: Path) -> tuple[str, str]:
    """Export and compile one graph of `graph_jobs` into `scratch`: its file name and SHA-256."""
    import torch._inductor

    sig, kind = job
    per_graph = layers_per_graph(model.config)
    run = next(r for r in runs_of(model.weights.layers, per_graph) if weights_signature(r) == sig)
    example = _example(model, GRAPHS[kind], per_graph, block_size)
    program = torch.export.export(
        _Step(model), (run, *example), dynamic_shapes=_dynamic_shapes(example, GRAPHS[kind]), strict=False
    )
    path = scratch / f"{kind}-{sig}.pt2"
    # Round to bf16 where the code says so, even inside a fused kernel: the compensated
    # products (backends/linear.py) take lo = x - bf16(x), which is 0 if bf16(x) stays f32.
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"emulate_precision_casts": True}
    )
    with open(path, "rb") as f:
        return path.name, hashlib.file_digest(f, "sha256").hexdigest()


def build(
    model: Transformer,
    model_sha256: str,
    build_graphs: Callable[[list[tuple[str, str]], Path], dict[str, str]],
) -> Path:
    """Build every graph of `model` with `build_graphs(jobs, scratch)` (which returns the
    files it wrote, name -> SHA-256) and publish them as the model's artifact directory:
    built in a scratch directory and renamed into place, so no reader sees half a build."""
    directory = artifact_dir(model_sha256)
    directory.parent.mkdir(parents=True, exist_ok=True)
    per_graph = layers_per_graph(model.config)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".build-") as scratch:
        files = build_graphs(graph_jobs(model), Path(scratch))
        manifest = {
            "format": FORMAT,
            "model_sha256": model_sha256,
            "torch": torch.__version__,
            "layers_per_graph": per_graph,
            "runs": [weights_signature(r) for r in runs_of(model.weights.layers, per_graph)],
            "build_seconds": round(time.perf_counter() - started, 1),
            "files": files,
        }
        (Path(scratch) / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(scratch, directory)
        os.mkdir(scratch)  # for TemporaryDirectory's cleanup
    return directory
