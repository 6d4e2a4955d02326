"""A GGUF file opened read-only and memory-mapped (rows read later come by pread: see
RowReader), with every defect turned into a clear error.

The format (a header, typed key/value metadata, tensor descriptions, aligned tensor data)
is read here directly: the `gguf` package's reader makes a numpy view per array element,
which took 10 s for gemma3's 262144-token vocabulary where this takes a fraction of a
second. The package still names the types and block sizes. Every read is bounds-checked,
since the file may come from a user or a guest: a defect is a ModelFormatError naming
where it is, never a crash or a half-loaded model.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import os
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from realm.errors import ModelFormatError
from realm.models.quants import SUPPORTED, dequantize

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_ELEMENTS = 2**63 - 1  # ggml counts a tensor's elements in an int64
MAX_ARRAY_ITEMS = 1 << 23
"""The most metadata array items one file may hold, all arrays together. Each becomes a
Python object (tens of bytes where the file spends one to eight); the largest real
vocabularies need about a million (gemma3: 3 x 262144)."""

_U64 = struct.Struct("<Q")  # a string's length
_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


def _check_no_overlap(spans: list[tuple[int, int, str]]) -> None:
    """Each byte of tensor data belongs to one tensor at most (`spans`: start, length, name):
    tensors that share bytes were not written by a GGUF writer."""
    spans = sorted(spans)
    for (start, length, before), (next_start, _, name) in zip(spans, spans[1:], strict=False):
        if next_start < start + length:
            raise ValueError(
                f"tensor {name}'s data at {next_start} overlaps tensor {before}'s ({length} bytes at {start})"
            )


class _Truncated(Exception):
    """A read past the end of the file (turned into a ModelFormatError naming what was read)."""


class _Reader:
    """Little-endian values from a byte buffer, in order, each read checked against its end."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0
        self.array_items = 0  # read so far, against MAX_ARRAY_ITEMS

    def skip(self, n: int) -> int:
        """Advance over `n` bytes; return where they start."""
        start = self.pos
        if n < 0 or start + n > len(self.data):
            raise _Truncated
        self.pos = start + n
        return start

    def take(self, n: int) -> memoryview:
        start = self.skip(n)
        return self.data[start : start + n]

    def scalar(self, code: str) -> Any:
        return struct.unpack_from("<" + code, self.data, self.skip(struct.calcsize(code)))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8", "replace")

    def value(self, kind: int) -> Any:
        kind = _value_type(kind)
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            return self.array()
        return self.scalar(_SCALARS[kind])

    def array(self) -> list[Any]:
        kind, count = _value_type(self.scalar("I")), self.scalar("Q")
        least = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}.get(kind) or struct.calcsize(_SCALARS[kind])
        if count * least > len(self.data) - self.pos:  # the bytes each item takes at least
            raise _Truncated
        self.array_items += count
        if self.array_items > MAX_ARRAY_ITEMS:
            raise ValueError(f"the metadata arrays hold more than {MAX_ARRAY_ITEMS} items in all")
        if kind == GGUFValueType.STRING:
            return self._strings(count)
        if kind == GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        dtype = np.dtype("<" + _SCALARS[kind])
        return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()

    def _strings(self, count: int) -> list[str]:
        """`count` strings in a row: `string()`'s loop, inlined (gemma3's 262,144 tokens:
        0.26 -> 0.15 s)."""
        data, pos, end, length = self.data, self.pos, len(self.data), _U64.unpack_from
        out = []
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            n = length(data, pos)[0]
            pos += 8
            if n > end - pos:
                raise _Truncated
            out.append(str(data[pos : pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


def _value_type(kind: int) -> GGUFValueType:
    try:
        return GGUFValueType(kind)
    except ValueError:
        raise ValueError(f"unknown value type {kind}") from None


class RowReader:
    """A GGUF opened for reading rows with pread(2), not through the memory map: the kernel
    maps up to 64 KiB around every page a mapped read touches, so the few scattered rows a
    decode step reads (an embedding, the exact logits' weights) soon mapped most of the
    matrix into the process's resident set (smollm2's tied 30 MB embedding: 23 MiB after
    one 64-token request). 64 scattered rows cost 68 us this way against 6 us mapped."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        weakref.finalize(self, os.close, self.fd)

    def read(self, offset: int, row_bytes: int, ids: np.ndarray | slice, n_rows: int) -> np.ndarray:
        """Rows `ids` of the n_rows x row_bytes matrix at `offset` of the file, (rows, row_bytes)."""
        if isinstance(ids, slice):
            start, stop, step = ids.indices(n_rows)
            if step == 1:
                out = np.empty((max(0, stop - start), row_bytes), np.uint8)
                self._read_into(out, offset + start * row_bytes)
                return out
            ids = np.arange(start, stop, step)
        index = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()  # a step's few ids: lists beat numpy here
        if index and (min(index) < 0 or max(index) >= n_rows):
            raise IndexError(f"row ids outside 0..{n_rows - 1}")
        out = np.empty((len(index), row_bytes), np.uint8)
        for j, i in enumerate(index):
            self._read_into(out[j], offset + i * row_bytes)
        return out

    def _read_into(self, out: np.ndarray, at: int) -> None:
        view = out.data.cast("B")
        while view:
            done = os.preadv(self.fd, [view], at)
            if done <= 0:
                raise ModelFormatError("the model file is shorter than it was when it was loaded")
            view, at = view[done:], at + done


@dataclass(frozen=True)
class TensorData:
    """One tensor's raw bytes (a view into the memory map) and its logical shape; rows read
    after loading come from `reader` at `offset` when the tensor has one."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major: (rows, cols) for a matrix
    raw: np.ndarray  # uint8, one row of bytes per row of the tensor
    reader: RowReader | None = None
    offset: int = 0  # of the data in the file

    def rows(self, ids: np.ndarray | slice) -> torch.Tensor:
        """Some rows of a matrix as float32, dequantized exactly as stored; only their bytes
        are read (see RowReader)."""
        if self.reader is None:
            picked = np.ascontiguousarray(self.raw[ids])
        else:
            picked = self.reader.read(self.offset, self.raw.shape[-1], ids, self.raw.shape[0])
        return self.decode(picked)

    def decode(self, picked: np.ndarray) -> torch.Tensor:
        """Rows of this tensor's bytes (rows, row bytes) as float32, exactly as stored."""
        return dequantize(picked, self.qtype, (len(picked), self.shape[-1]))


class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such model file")
        self.size_bytes = self.path.stat().st_size
        if self.size_bytes < 24:
            raise ModelFormatError(f"{self.path}: not a valid GGUF file ({self.size_bytes} bytes)")
        self._map = np.memmap(self.path, mode="r")  # the whole file, memory-mapped read-only
        self._reader = RowReader(self.path)
        reader = _Reader(self._map.data)
        where = "the header"
        try:
            n_tensors, n_kv = self._header(reader)
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                where = f"a metadata key after {len(self.metadata)} keys"
                key = reader.string()
                where = f"metadata key {key!r}"
                if key in self.metadata:
                    raise ValueError("the key appears twice")
                self.metadata[key] = reader.value(reader.scalar("I"))
            where = "the tensor descriptions"
            described = [self._tensor_description(reader) for _ in range(n_tensors)]
            where = "general.alignment"
            alignment = self._alignment()
            data_start = -(-reader.pos // alignment) * alignment
            self.tensors: dict[str, TensorData] = {}
            spans = []
            for name, dims, qtype, offset in described:
                where = f"tensor {name}"
                if name in self.tensors:
                    raise ValueError("the name appears twice")
                self.tensors[name] = self._tensor(name, dims, qtype, data_start, offset, alignment)
                spans.append((data_start + offset, self.tensors[name].raw.nbytes, name))
            where = "the tensor data"
            _check_no_overlap(spans)
        except _Truncated:
            raise ModelFormatError(
                f"{self.path}: not a valid GGUF file (it ends inside {where}: truncated or corrupt)"
            ) from None
        except ValueError as exc:
            raise ModelFormatError(f"{self.path}: not a valid GGUF file ({where}: {exc})") from None
        self.architecture: str = self.metadata.get("general.architecture", "")
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ModelFormatError(f"{self.path}: no general.architecture in metadata")

    def _header(self, reader: _Reader) -> tuple[int, int]:
        """The tensor and key counts, after the magic and the version."""
        magic = bytes(reader.take(4))
        if magic != _MAGIC:
            raise ValueError(f"it starts with {magic!r}, not {_MAGIC!r}")
        version = reader.scalar("I")
        if version & 0xFFFF == 0 and version:
            raise ValueError("it is big-endian; Realm reads little-endian GGUF")
        if version not in _VERSIONS:
            raise ValueError(f"version {version} is not supported (supported: 2, 3)")
        n_tensors, n_kv = reader.scalar("Q"), reader.scalar("Q")
        # Each key takes at least 12 bytes and each tensor description at least 24.
        if n_kv * 12 + n_tensors * 24 > self.size_bytes:
            raise ValueError(f"{n_kv} keys and {n_tensors} tensors cannot fit in {self.size_bytes} bytes")
        return n_tensors, n_kv

    @staticmethod
    def _tensor_description(reader: _Reader) -> tuple[str, list[int], int, int]:
        name = reader.string()
        n_dims = reader.scalar("I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS})")
        dims = [reader.scalar("Q") for _ in range(n_dims)]
        return name, dims, reader.scalar("I"), reader.scalar("Q")

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{alignment!r} is not a power of two")
        return alignment

    def _tensor(
        self, name: str, dims: list[int], type_id: int, data_start: int, offset: int, alignment: int
    ) -> TensorData:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"unknown quantization type {type_id}") from None
        if qtype not in SUPPORTED:
            raise ModelFormatError(
                f"{self.path}: tensor {name} has quantization type {qtype.name}, which Realm does "
                f"not support (supported: {', '.join(sorted(t.name for t in SUPPORTED))})"
            )
        if 0 in dims:
            raise ValueError(f"its dimensions {dims} include a 0")
        if math.prod(dims) > _MAX_ELEMENTS:
            raise ValueError(f"its dimensions {dims} make more elements than an int64 counts")
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ValueError(f"its rows of {dims[0]} are not whole {block}-element blocks of {qtype.name}")
        if offset % alignment:
            raise ValueError(f"its data offset {offset} is not a multiple of the alignment {alignment}")
        row_bytes = dims[0] // block * block_bytes
        shape = tuple(reversed(dims))  # GGUF lists the innermost dimension first
        n_bytes = row_bytes * math.prod(shape[:-1])
        start = data_start + offset
        if start + n_bytes > self.size_bytes:
            raise ValueError(f"its {n_bytes} bytes at {start} lie past the end of the file ({self.size_bytes} bytes)")
        raw = self._map[start : start + n_bytes].reshape(*shape[:-1], row_bytes)
        return TensorData(name, qtype, shape, raw, self._reader, start)

    def get(self, key: str, default: Any = None) -> Any:
        """Metadata value by key, or `default`."""
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        """Metadata value that the model cannot run without."""
        if key not in self.metadata:
            raise ModelFormatError(f"{self.path}: required metadata key {key!r} is missing")
        return self.metadata[key]

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """`<architecture>.<suffix>`, the way GGUF namespaces per-architecture keys."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def tensor(self, name: str) -> TensorData:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: required tensor {name!r} is missing") from None

    def drop_resident_pages(self) -> None:
        """Tell the kernel we are done with the file pages read so far (after the weights are
        packed): they leave this process's resident set and are read again only if a
        lookup touches them. Linux only; a no-op elsewhere."""
        libc = _libc()
        if libc is not None:
            libc.madvise(ctypes.c_void_p(self._map.ctypes.data), ctypes.c_size_t(self._map.nbytes), _MADV_DONTNEED)

    def drop_vocabulary_arrays(self) -> None:
        """Forget the vocabulary's per-token arrays (`tokenizer.ggml.tokens`, `scores`,
        `token_type`, `merges`) once the tokenizer holds them in its own form: on gemma3's
        262,144 tokens they are 14 MiB of Python objects that nothing reads again."""
        for key in [k for k, v in self.metadata.items() if k.startswith("tokenizer.ggml.") and isinstance(v, list)]:
            del self.metadata[key]

    def quant_types(self) -> dict[str, int]:
        """How many tensors use each quantization type."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        return counts


_MADV_DONTNEED = 4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name and hasattr(ctypes.CDLL(name), "madvise") else None
    except OSError:
        return None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_MMAP_FLOOR, _MMAP_CEILING = 128 * 1024, 32 * 1024 * 1024  # glibc's defaults on 64-bit
SERVING_ARENAS = 2
"""malloc arenas a server keeps (glibc's default: up to 8 a core)."""


def few_heap_arenas() -> None:
    """Caps the process's malloc arenas at SERVING_ARENAS, for a server, before its threads
    start. glibc gives a thread that allocates while another holds an arena's lock an arena
    of its own, which keeps what was freed in it; a server's guest threads come and go with
    its requests, each leaving one behind. Measured (benchmarks/server_load.py, gemma3,
    3 runs each way, AMD EPYC, 2 cores): resident memory with 8 tenants streaming at once
    against one, 1.15-1.20 -> 1.10-1.14 (about 40 MiB less at 8), tokens/s unchanged
    within the runs' spread. A no-op without glibc, or where the environment sets
    MALLOC_ARENA_MAX (glibc has read it)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt") and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, SERVING_ARENAS)


@contextlib.contextmanager
def transient_heap() -> Iterator[None]:
    """Heap settings for loading a model, whose large allocations are transient (each
    tensor's dequantized copy, up to tens of MB). Inside, every allocation from 128 KiB up
    gets pages of its own, given back when freed; glibc's dynamic rule would instead raise
    its threshold after the first such free and serve the rest from a heap they leave
    fragmented. After, the threshold, and the one for giving the heap's top back, are where
    that rule takes them anyway (serving allocates such sizes every step, and fresh pages
    would cost page faults each time), and the freed heap is given back. Measured on a
    server's loading thread, smollm2 loaded and warmed up: 651 -> 571 MiB resident (gemma3
    1055 -> 1015), for loads 10-20% longer. The settings are the process's: a load while
    serving briefly gives other threads' large allocations pages of their own too. A no-op
    without glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_FLOOR)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_CEILING)
        libc.malloc_trim(0)
