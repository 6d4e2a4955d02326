"""The host's compute backends: detected once, chosen by the fallback chain GPU -> CPU -> naive.

A backend is a device plus the weight formats that run fast on it. The device is a
parameter of the same code, not a fork of it: the GPU backend runs the very forward pass
the CPU backend runs, with dense float32 weights on `cuda` (or `mps`): exact, and for
models of this size a GPU step is bound by kernel launches, not by reading weights.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from realm.backends import linear, native
from realm.backends.embedding import RawEmbedding
from realm.backends.one_thread import one_thread
from realm.backends.screened import ScreenedLinear
from realm.errors import BackendUnavailable, InvalidArgument
from realm.models.gguf_file import TensorData
from realm.models.quants import dequantize
from realm.models.transformer import KV_DTYPE, Embedding, Linear, PagedAttention, attend_pages
from realm.settings import host_settings


class BackendKind(enum.IntEnum):
    """The numbers `realm_get_backend_type()` returns to guests."""

    CPU = 0
    GPU = 1
    NONE = 2


@dataclass(frozen=True)
class Backend:
    kind: BackendKind
    device: torch.device
    description: str

    @property
    def name(self) -> str:
        return {BackendKind.CPU: "cpu", BackendKind.GPU: "gpu", BackendKind.NONE: "naive"}[self.kind]

    @property
    def kv_dtype(self) -> torch.dtype:
        """The KV pool's element type: the naive backend is the float32 reference."""
        return torch.float32 if self.kind == BackendKind.NONE else KV_DTYPE

    @property
    def paged_attention(self) -> PagedAttention:
        """Realm's kernel on the CPU (paged_attention.cpp), PyTorch's operations elsewhere."""
        if self.kind == BackendKind.CPU and native.load():
            return cast(PagedAttention, torch.ops.realm.paged_attention)
        return attend_pages

    def pack_linear(self, tensors: Sequence[TensorData]) -> Linear:
        if self.kind == BackendKind.CPU:
            return linear.pack_for_cpu(tensors)
        return linear.pack_dense(tensors, self.device, torch.float32)

    def pack_output(self, tensor: TensorData) -> Linear:
        if self.kind == BackendKind.CPU:
            return ScreenedLinear(tensor)
        return linear.pack_dense([tensor], self.device, torch.float32)

    def make_embedding(self, tensor: TensorData) -> Embedding:
        return RawEmbedding(tensor, self.device)

    def make_vector(self, tensor: TensorData) -> torch.Tensor:
        return dequantize(tensor.raw, tensor.qtype, tensor.shape).to(self.device)

    def matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """float32 (m, k) @ (k, n) on this backend's device, result back on the CPU. A guest's
        own arithmetic: on the CPU it runs on the calling thread alone (one_thread.py)."""
        if self.device.type == "cpu":
            with one_thread():
                return a @ b
        return (a.to(self.device) @ b.to(self.device)).cpu()


def cpu_backend() -> Backend:
    """The CPU backend: always there, and where a model goes that the GPU cannot take."""
    return Backend(BackendKind.CPU, torch.device("cpu"), f"cpu (PyTorch, {torch.get_num_threads()} threads)")


def _gpu() -> Backend | None:
    if torch.cuda.is_available():
        return Backend(BackendKind.GPU, torch.device("cuda"), f"cuda ({torch.cuda.get_device_name(0)})")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Backend(BackendKind.GPU, torch.device("mps"), "mps (Apple Metal)")
    return None


class BackendRegistry:
    """Every backend this host has, initialised once at start-up, and the one in use.

    `chain` is the fallback chain from the backend in use down to naive: the backends
    guests may call per operation (`offered`). The operator's choice cuts off what comes
    before it: under "cpu" a GPU the machine has is not used, and under "naive" guests get
    no host kernel at all (docs/ABI.md, `realm_get_backend_type`)."""

    CHOICES = ("auto", "gpu", "cpu", "naive")

    def __init__(self, preference: str | None = None) -> None:
        preference = (preference or host_settings().backend).lower()
        if preference not in self.CHOICES:
            raise InvalidArgument(f"unknown backend {preference!r} (choose one of: {', '.join(self.CHOICES)})")
        cpu = cpu_backend()
        naive = Backend(BackendKind.NONE, torch.device("cpu"), "naive (float32 reference, no kernels for guests)")
        gpu = _gpu()
        self.available: list[Backend] = [b for b in (gpu, cpu, naive) if b is not None]
        if preference == "gpu" and gpu is None:
            raise BackendUnavailable("backend 'gpu' was asked for, but PyTorch sees no CUDA or MPS device")
        chains: dict[str, list[Backend]] = {
            "auto": self.available,
            "gpu": self.available,
            "cpu": [cpu, naive],
            "naive": [naive],
        }
        self.chain = chains[preference]
        self.preference = preference
        self.active: Backend = self.chain[0]

    def offered(self, kind: BackendKind) -> Backend:
        """The backend of `kind` that guests may call per operation (realm_matmul_cpu / _gpu).

        Raises BackendUnavailable when the chain in use has none: the host runs no kernel
        it tells guests it does not have."""
        found = next((b for b in self.chain if b.kind == kind), None)
        if found is None:
            raise BackendUnavailable(
                f"no {kind.name} backend for guests: the host runs the {self.active.name} backend "
                f"(realm_get_backend_type() = {int(self.active.kind)}); compute this product in WebAssembly"
            )
        return found

    def describe(self) -> dict:
        """What was detected and what is in use, for `realm backends` and /health."""
        return {
            "preference": self.preference,
            "active": self.active.name,
            "available": [
                {"name": b.name, "type": int(b.kind), "device": str(b.device), "description": b.description}
                for b in self.available
            ],
        }
