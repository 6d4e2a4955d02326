"""Realm's own CPU kernels (`quantized_gemm.cpp`): built once from source, loaded as PyTorch
operators (`torch.ops.realm.int4_gemm`, `int8_gemm`) that eager code and compiled graphs
call alike. The same library runs compiled steps without the GIL (`compiled_runner.cpp`).

PyTorch's int4 CPU kernel widens every weight to bf16 and multiplies in floating point;
with 2 threads it spent ~5 ms of smollm2's ~11 ms decode step. This one multiplies as
llama.cpp does, 8-bit activations against 4-bit codes in integer dot products, with the
rows laid out so that 16 of them accumulate in one register: 3x faster at one row, 2x at
eight (see the .cpp for the layout). Which instructions run is chosen when the library
loads, from the CPU's features (AVX512-VNNI, AVX2, or plain C++), and reported by `isa()`.

`make setup` builds the library (`python -m realm.backends.native`, ~15 s) into
`realm/backends/_build/<key>/` (or `$REALM_HOME/native/<key>/` where the package is
read-only), the key hashing the source, torch's version and the compiler's. Where it is
missing, damaged or cannot be built (no C++ compiler), the CPU backend runs PyTorch's
kernels instead, with a warning: slower, never wrong. REALM_KERNELS=pytorch asks for
PyTorch's kernels; REALM_KERNEL_ISA=avx2 or =scalar caps the instructions used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch

from realm.errors import InternalError, ModelFormatError
from realm.models.catalogue import realm_home
from realm.models.gguf_file import TensorData
from realm.native_build import NativeLibrary
from realm.settings import host_settings

log = logging.getLogger(__name__)

GROUP = 16
"""Rows of a weight the kernels handle together; `group_layout` pads to a multiple."""
SOURCE = Path(__file__).with_name("quantized_gemm.cpp")
SOURCES = (
    SOURCE,
    *(
        Path(__file__).with_name(name)
        for name in ("paged_attention.cpp", "file_rows.cpp", "compiled_runner.cpp", "token_mask.cpp", "best_logits.cpp")
    ),
)
HEADERS = (Path(__file__).with_name("kernel_isa.h"),)
LIBRARY = "librealm_quantized_gemm.so"


def _torch_flags() -> list[str]:
    from torch.utils import cpp_extension

    return [
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        *(f"-L{p}" for p in cpp_extension.library_paths()),
        "-ltorch_cpu",
        "-lc10",
    ]


KERNELS = NativeLibrary(
    LIBRARY,
    SOURCES,
    fallback=lambda: realm_home() / "native",
    headers=HEADERS,
    flags=_torch_flags,
    depends_on=f"torch {torch.__version__}",
)


def library_path() -> Path | None:
    """The built library, if there is one."""
    return KERNELS.path()


def build(force: bool = False) -> Path:
    """Compile the kernels, unless they are built already (native_build.py)."""
    return KERNELS.build(force)


@functools.cache
def load() -> bool:
    """Load the kernel into this process if it is built; False (and one warning) if not."""
    if host_settings().kernels == "pytorch":
        return False
    path = library_path()
    if path is None:
        log.warning(
            "Realm's CPU kernels are not built: using PyTorch's, which are slower. "
            "Build them with `python -m realm.backends.native` (make setup does)."
        )
        return False
    try:
        KERNELS.check(path)  # dlopen of a truncated library is a SIGBUS, not an error
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:  # damaged, or built against another torch
        log.warning(
            "Realm's CPU kernels in %s do not load (%s): using PyTorch's, which are slower. "
            "Rebuild them with `python -m realm.backends.native --force`.",
            path,
            e,
        )
        return False

    torch.library.register_fake("realm::int4_gemm", _int4_or_int5_shape)
    torch.library.register_fake("realm::int5_gemm", _int4_or_int5_shape)
    torch.library.register_fake("realm::int8_gemm", _int8_shape)
    torch.library.register_fake("realm::paged_attention", _attention_shape)

    return True


def group_layout(
    codes: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None = None, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes (N, K) unsigned, scale (N, K / 32 * S) and mins (N, K / 32) float) in the
    kernels' layout (see the .cpp): codes (N / 16, K / 32 * 16 * 32 * bits / 8) uint8 (5
    bits: the 4-bit layout of the low nibbles, then the fifth bits),
    scales (N / 16, K / 32 * S * 16) and mins (N / 16, K / 32 * 16) float16, S being the
    scales a block (1, or 2 for 8-bit codes scaled per 16). Rows are padded with zeros to
    a whole group. 8-bit codes have no mins (the kernel knows them)."""
    pad = -codes.shape[0] % GROUP
    if pad:
        codes, scale = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (codes, scale))
        mins = None if mins is None else torch.nn.functional.pad(mins, (0, 0, 0, pad))
    groups, blocks = codes.shape[0] // GROUP, codes.shape[1] // 32
    # (group, row, block, half of the block, slice, byte) -> (group, block, [half,] slice, row, byte)
    q = codes.to(torch.uint8).view(groups, GROUP, blocks, 2, 4, 4)
    if bits == 8:
        packed = q.permute(0, 2, 3, 4, 1, 5).reshape(groups, blocks, -1)
    else:
        low = q & 15
        packed = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).reshape(groups, blocks, -1)
    if bits == 5:  # per block, 8 words of 64 bits: (half, slice), bit 4 * row + byte
        tops = (q >> 4).permute(0, 2, 3, 4, 1, 5).reshape(groups, blocks, 8, 64).numpy()
        words = np.packbits(tops, axis=-1, bitorder="little").reshape(groups, blocks, 64)
        packed = torch.cat((packed, torch.from_numpy(words)), dim=2)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # (group, row, block, S) -> (group, block, S, row)
        t = t.reshape(groups, GROUP, blocks, -1).permute(0, 2, 3, 1)
        return t.reshape(groups, -1).to(torch.float16).contiguous()

    return packed.reshape(groups, -1).contiguous(), per_block(scale), None if mins is None else per_block(mins)


def _int4_or_int5_shape(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, out_features: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def _int8_shape(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, scales_per_block: int, out_features: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def _attention_shape(q: torch.Tensor, *_: object) -> torch.Tensor:
    return q.new_empty(q.shape)


def read_rows(tensor: TensorData, ids: torch.Tensor) -> torch.Tensor:
    """`tensor.rows(ids)`, the pread loop in the native library (file_rows.cpp) where it is
    loaded: 64 scattered rows in ~40 us rather than ~170."""
    reader = tensor.reader
    if reader is None or not load():
        return tensor.rows(ids.numpy())
    try:
        raw = torch.ops.realm.read_rows(reader.fd, tensor.offset, tensor.raw.shape[-1], tensor.raw.shape[0], ids)
    except RuntimeError as e:
        raise ModelFormatError(str(e).splitlines()[0]) from e
    return tensor.decode(raw.numpy())


@functools.cache
def _c_functions() -> ctypes.CDLL | None:
    """The library's plain C functions (token_mask.cpp, best_logits.cpp), where it is loaded."""
    path = library_path() if load() else None
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.realm_mask_logits.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.realm_mask_logits.restype = None
    lib.realm_best_logits.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    lib.realm_best_logits.restype = ctypes.c_int32
    return lib


def mask_logits(logits: np.ndarray, mask: np.ndarray) -> bool:
    """Sets the logits (vocab,) float32 of the tokens a bitmask (words,) uint32 forbids to
    -inf, in place, in one pass (token_mask.cpp): gemma3's 262k logits under the schema
    suite's masks in ~0.03 ms, where NumPy took 0.17 on average and 1 ms on a mask that
    forbids scattered tokens. False, having done nothing, where the library is not loaded."""
    lib = _c_functions()
    if lib is None:
        return False
    if logits.dtype != np.float32 or not logits.flags.c_contiguous or not logits.flags.writeable:
        raise InternalError("mask_logits needs a writable, contiguous float32 row")
    if mask.dtype != np.uint32 or not mask.flags.c_contiguous or mask.size * 32 < logits.size:
        raise InternalError(f"a mask of {mask.size} uint32 words does not cover {logits.size} logits")
    lib.realm_mask_logits(logits.ctypes.data, mask.ctypes.data, logits.size)
    return True


def best_logits(row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The k best logits of a row (vocab,) float32 and their ids (int32), best first in the
    sampler's order, -inf left out (best_logits.cpp: one pass, about 10 us on gemma3's 262k
    logits); None where the library is not loaded."""
    lib = _c_functions()
    if lib is None:
        return None
    if row.dtype != np.float32 or not row.flags.c_contiguous or k < 1:
        raise InternalError("best_logits needs a contiguous float32 row and k >= 1")
    ids, values = np.empty(k, np.int32), np.empty(k, np.float32)
    n = lib.realm_best_logits(row.ctypes.data, row.size, k, ids.ctypes.data, values.ctypes.data)
    return ids[:n], values[:n]


def isa() -> str:
    """The instruction set the loaded kernel runs (`avx512-vnni`, `avx2`, `scalar`), or
    `pytorch` when it is not loaded."""
    return torch.ops.realm.isa() if load() else "pytorch"


@functools.cache
def identity() -> str:
    """What compiled graphs depend on: the operators' schemas (they call them through
    PyTorch's dispatcher, so a change inside a kernel needs no rebuild), or PyTorch's
    kernels when these are not loaded."""
    if not load():
        return "pytorch"
    schemas = [schema for source in SOURCES for schema in re.findall(r'm\.def\("([^"]+)"', source.read_text())]
    return "realm " + hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]


if __name__ == "__main__":
    print(build(force="--force" in sys.argv))
