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
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from realm.errors import ModelFormatError
from realm.models.quants import SUPPORTED


@dataclass(frozen=True)
class TensorData:
    """One tensor's raw bytes (a view into the memory map) and its logical shape."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major: (rows, cols) for a matrix
    raw: np.ndarray


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
        self.metadata: dict[str, Any] = {
            name: _field_value(field) for name, field in reader.fields.items()
        }
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


def _field_value(field: Any) -> Any:
    """A GGUF field as a plain Python value (str, int, float, bool or list of them)."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if types[0] == GGUFValueType.BOOL else value
