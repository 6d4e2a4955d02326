"""A GGUF file opened read-only and memory-mapped, with every defect turned into a clear error.

The `gguf` package does the parsing; this module adds the checks a server needs before it
trusts a file a user handed it: the header parses, every tensor lies inside the file,
every type is one we can run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from realm.errors import ModelFormatError
from realm.models.quants import SUPPORTED, dequantize


@dataclass(frozen=True)
class TensorData:
    """One tensor's raw bytes (a view into the memory map) and its logical shape."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major: (rows, cols) for a matrix
    raw: np.ndarray

    def rows(self, ids: np.ndarray | slice) -> torch.Tensor:
        """Some rows of a matrix as float32, dequantized exactly as stored and read straight
        from the memory map: only their pages are touched."""
        picked = np.ascontiguousarray(self.raw[ids])
        return dequantize(picked, self.qtype, (len(picked), self.shape[-1]))


class GGUFFile:
    """A parsed GGUF file: metadata as plain Python values, tensors by name."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such model file")
        try:
            reader = GGUFReader(self.path, "r")
        except Exception as exc:  # the gguf package raises many types for a bad file
            raise ModelFormatError(f"{self.path}: not a valid GGUF file ({exc})") from exc
        self._map = reader.data  # the whole file, memory-mapped read-only
        packed = {name: _packed_field(field) for name, field in reader.fields.items()}
        self.tensors: dict[str, TensorData] = {}
        for tensor in reader.tensors:
            if tensor.tensor_type not in SUPPORTED:
                raise ModelFormatError(
                    f"{self.path}: tensor {tensor.name} has quantization type "
                    f"{tensor.tensor_type.name}, which Realm does not support "
                    f"(supported: {', '.join(sorted(t.name for t in SUPPORTED))})"
                )
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
            self.tensors[tensor.name] = TensorData(
                tensor.name, tensor.tensor_type, shape, tensor.data
            )
        del reader  # its hundreds of thousands of small objects go before the metadata is made
        self.metadata: dict[str, Any] = {name: _unpacked_field(value) for name, value in packed.items()}
        self.architecture: str = self.metadata.get("general.architecture", "")
        if not self.architecture:
            raise ModelFormatError(f"{self.path}: no general.architecture in metadata")
        self.size_bytes = self.path.stat().st_size

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


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it after large transient
    allocations, such as decoding a model's tensors). A no-op where there is no glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@dataclass(frozen=True)
class _StringArray:
    """A string array as one blob and its end offsets: built while the reader is alive, it
    lets the final list of str be made after the reader's own objects are freed, so the two
    do not interleave on the heap (interleaved, they pinned ~200 MB for gemma3's vocabulary)."""

    blob: bytes
    ends: np.ndarray


def _packed_field(field: Any) -> Any:
    """A GGUF field in a form that holds no reference to the reader: strings and scalars as
    Python values, arrays as one numpy array or one `_StringArray`."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            pieces = [bytes(field.parts[i]) for i in field.data]
            return _StringArray(b"".join(pieces), np.cumsum([len(p) for p in pieces], dtype=np.int64))
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data])
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value


def _unpacked_field(value: Any) -> Any:
    """Plain Python values (str, int, float, bool or a list of them)."""
    if isinstance(value, _StringArray):
        starts = [0, *value.ends[:-1].tolist()]
        return [value.blob[a:b].decode("utf-8", errors="replace") for a, b in zip(starts, value.ends.tolist())]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
