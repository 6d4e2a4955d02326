"""A model's packed matrices kept on disk, so that the next load maps them in rather than
packing the GGUF's weights again.

Packing (the layers' codes laid out for Realm's kernels, the output projection's screen)
was most of a model's load. What it makes depends only on the GGUF's bytes, the packing
code and the kernels' layout, so after a load that packed, the matrices are written to
`$REALM_HOME/packed/<model>-<key>.bin`, and later loads map that file instead: gemma3-270m
loads in 0.58-0.65 s where it took 1.6-2.2, smollm2-135m in 0.25-0.38 s where it took
0.8-1.1 (AMD EPYC, 2 cores). Its pages are the page cache's, shared by every process that
serves the model.

The file is plain data, never code: a JSON header naming each matrix's class (one of
`KINDS`), its plain fields, and which of the tensors that follow are its tensors. One whose
header or size does not match is ignored, and the load packs and writes it again. It is
written whole, synced, and renamed into place, so a crash leaves the old file or none,
never a torn one. Only the CPU backend with Realm's kernels keeps one, and only for a GGUF
of `SMALLEST` bytes and up: a smaller model packs faster than its file would be read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from realm.backends import devices, linear, native, screened
from realm.files import atomic_file, source_digest
from realm.models import catalogue, gguf_file, quants
from realm.models.gguf_file import GGUFFile, TensorData
from realm.settings import host_settings

log = logging.getLogger(__name__)

MAGIC = b"REALMPK1"
SMALLEST = 32 << 20
"""GGUF bytes below which no file is kept (the test suite's tiny models pack in milliseconds)."""
_ALIGN = 64
_MADV_POPULATE_READ = 22  # linux/mman.h; not in Python's mmap module
_HEAD = struct.Struct("<8sQ")  # magic, header bytes

KINDS: Mapping[str, type] = {
    cls.__name__: cls
    for cls in (
        linear.NativeInt4Linear,
        linear.NativeInt5Linear,
        linear.NativeInt8Linear,
        linear.DenseLinear,
        screened.ScreenedLinear,
    )
}
"""The classes a file may name: what the CPU backend packs with Realm's kernels loaded."""
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32)
}
_DTYPE_NAMES = {d: name for name, d in _DTYPES.items()}

T = TypeVar("T")


def wanted(gguf: GGUFFile) -> bool:
    """Whether this model's CPU load keeps a file: Realm's kernels loaded (their formats are
    the ones a file holds), REALM_PACKED_CACHE on, and a model of `SMALLEST` bytes and up."""
    return host_settings().packed_cache == "on" and native.load() and gguf.path.stat().st_size >= SMALLEST


class NotStorable(Exception):
    """A packed object with a field the file cannot hold: the model is packed, not stored."""


def cache_file(model_sha256: str, gguf_path: Path) -> Path:
    """Where the packed matrices of this model, as this code packs them, are kept. The key
    hashes what they depend on: the model (its hash, and the file's size and modification
    time, so a file changed in place is packed again), the packing code and this module
    (the file's layout), the kernels' sources (their layout) and PyTorch."""
    stat = gguf_path.stat()
    parts = {
        "model": model_sha256,
        "file": [stat.st_size, stat.st_mtime_ns],
        "code": source_digest((linear, screened, quants, gguf_file, native, devices, sys.modules[__name__])),
        "kernels": native.KERNELS.key,
        "torch": torch.__version__,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return catalogue.realm_home() / "packed" / f"{model_sha256[:16]}-{key}.bin"


class PackedCache:
    """One model's packed matrices: those its file holds, handed out by the names of the
    GGUF tensors they were packed from, and those packed this load, written at `save`."""

    def __init__(self, model_sha256: str, gguf: GGUFFile) -> None:
        self.path = cache_file(model_sha256, gguf.path)
        self.folder = self.path.parent
        self._stored = _read(self.path, gguf)
        self._matrices: dict[str, Any] = {}
        self._missed = False
        self._lock = threading.Lock()

    def take(self, name: str, pack: Callable[[], T]) -> T:
        """The matrix packed from the GGUF tensor(s) `name`: from the file, else `pack()`."""
        stored = self._stored.get(name)
        if stored is None:
            stored = pack()
            self._missed = True
        with self._lock:
            self._matrices[name] = stored
        return stored

    def pack_linear(self, pack: Callable[[Sequence[TensorData]], T]) -> Callable[[Sequence[TensorData]], T]:
        return lambda tensors: self.take("+".join(t.name for t in tensors), lambda: pack(tensors))

    def pack_output(self, pack: Callable[[TensorData], T]) -> Callable[[TensorData], T]:
        return lambda tensor: self.take(tensor.name, lambda: pack(tensor))

    def save(self) -> None:
        """Write this load's matrices if any was packed (not taken from the file); the
        model's files of other keys go. A failure (a full disk, a read-only home, a matrix
        the file cannot hold) is logged and changes nothing else."""
        if not self._missed:
            return
        try:
            _write(self.path, self._matrices)
        except (OSError, NotStorable) as e:
            log.warning("packed weights not kept in %s: %s", self.folder, e)
            return
        log.info("packed weights kept in %s (%d MiB)", self.path, self.path.stat().st_size >> 20)
        prefix = self.path.name.split("-", 1)[0]
        for old in self.folder.glob(f"{prefix}-*.bin"):
            if old != self.path:
                old.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- the file


def _write(path: Path, matrices: Mapping[str, Any]) -> None:
    tensors: list[torch.Tensor] = []

    def field(owner: str, value: Any) -> dict[str, Any]:
        if isinstance(value, torch.Tensor):
            if value.dtype not in _DTYPE_NAMES:  # else written, then refused at every load
                raise NotStorable(f"{owner} is a {value.dtype} tensor")
            tensors.append(value.detach().cpu().contiguous())
            return {"tensor": len(tensors) - 1}
        if isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            return {"tensors": [field(owner, v)["tensor"] for v in value]}
        if isinstance(value, TensorData):
            return {"gguf": value.name}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise NotStorable(f"{owner} holds a {type(value).__name__}")

    objects = {}
    for name, obj in matrices.items():
        kind = type(obj).__name__
        if KINDS.get(kind) is not type(obj):
            raise NotStorable(f"{name} is a {kind}")
        objects[name] = {"kind": kind, "fields": {k: field(f"{kind}.{k}", v) for k, v in vars(obj).items()}}
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + _aligned(t.nbytes))
    entries = [
        {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "offset": offset}
        for t, offset in zip(tensors, offsets)
    ]
    header = json.dumps({"objects": objects, "tensors": entries}).encode()
    start = _aligned(_HEAD.size + len(header))
    with atomic_file(path) as f:
        f.write(_HEAD.pack(MAGIC, len(header)) + header)
        for t, offset in zip(tensors, offsets):
            f.seek(start + offset)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        f.truncate(start + offsets[-1])


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _read(path: Path, gguf: GGUFFile) -> dict[str, Any]:
    """The matrices `path` holds, mapped; {} (with the reason logged) if it cannot serve."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            magic, length = _HEAD.unpack(f.read(_HEAD.size))
            if magic != MAGIC or _HEAD.size + length > size:
                raise ValueError("not a packed-weights file")
            header = json.loads(f.read(length))
            start = _aligned(_HEAD.size + length)
            # private and writable (PyTorch wants a writable buffer): the page cache's own
            # pages, copied only if written, which nothing does to weights
            data = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE)
        _populate(data)
        tensors = [_tensor(data, start, entry, size) for entry in header["tensors"]]
        return {name: _object(spec, tensors, gguf) for name, spec in header["objects"].items()}
    except FileNotFoundError:
        return {}
    except Exception as e:  # any defect of a cache file: pack again, and write it anew
        log.warning("ignoring packed weights %s (%s); packing the model", path, e)
        return {}


def _populate(data: mmap.mmap) -> None:
    """Map every page now, as read-only views of the page cache, so that the first step does
    not take a fault per page (MADV_POPULATE_READ, Linux 5.14; MAP_POPULATE would copy them
    all, the mapping being writable). Elsewhere the kernel is told to read ahead."""
    try:
        data.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError):
        data.madvise(mmap.MADV_WILLNEED)


def _tensor(data: mmap.mmap, start: int, entry: Mapping[str, Any], size: int) -> torch.Tensor:
    dtype, shape = _DTYPES[entry["dtype"]], [int(n) for n in entry["shape"]]
    count = int(torch.Size(shape).numel()) * dtype.itemsize
    offset = start + int(entry["offset"])
    if offset % _ALIGN or offset + count > size:
        raise ValueError("a tensor lies outside the file")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8, count=count, offset=offset).view(dtype).view(shape)


def _object(spec: Mapping[str, Any], tensors: Sequence[torch.Tensor], gguf: GGUFFile) -> Any:
    obj: Any = object.__new__(KINDS[spec["kind"]])
    for name, field in spec["fields"].items():
        if "tensor" in field:
            value: Any = tensors[field["tensor"]]
        elif "tensors" in field:
            value = tuple(tensors[i] for i in field["tensors"])
        elif "gguf" in field:
            value = gguf.tensor(field["gguf"])
        else:
            value = field["value"]
        setattr(obj, name, value)
    return obj
