"""Property: a mutated real GGUF either loads or is refused with a ModelFormatError, quickly.

Each case takes one of the two real models' headers, changes one to three things in it (a
metadata value to 0, -1, a huge number, a string or another type; a key dropped; an array's
count; a tensor's dimensions, type, offset or name; the counts; one byte; the file's length)
and runs it through the reader and model building. The tensor data is left sparse (zeros)
unless the case gets as far as packing weights, when the real bytes are copied in. Stages
whose inputs a mutation left unchanged are not run again: the real file passes them.
benchmarks/gguf_fuzz.py runs the same cases by the hundred thousand.
"""

from __future__ import annotations

import filecmp
import functools
import itertools
import math
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realm.engine.model import load_model
from realm.errors import InvalidArgument, ModelFormatError
from realm.models.chat_template import chat_template_from_fields
from realm.models.config import ModelConfig
from realm.models.gguf_file import _SCALARS, GGUFFile, _Reader
from realm.models.loader import checked_config
from realm.models.tokenizer import Tokenizer

_ALIGNMENT = 32  # both real models use GGUF's default


@dataclass(frozen=True)
class TensorInfo:
    name: bytes
    dims: tuple[int, ...]
    qtype: int
    offset: int


@dataclass(frozen=True)
class Header:
    """A GGUF header as parts that a mutation can change and `to_bytes` writes back."""

    path: Path  # the real file it was read from
    version: int
    kvs: tuple[tuple[bytes, int, bytes], ...]  # key, value type, the value's encoded bytes
    tensors: tuple[TensorInfo, ...]
    data_start: int  # in the real file
    n_kv: int | None = None  # counts that differ from len(kvs) / len(tensors) when mutated
    n_tensors: int | None = None

    def to_bytes(self) -> bytes:
        n_tensors = len(self.tensors) if self.n_tensors is None else self.n_tensors
        n_kv = len(self.kvs) if self.n_kv is None else self.n_kv
        parts = [b"GGUF", struct.pack("<IQQ", self.version, n_tensors, n_kv)]
        parts += [_string(key) + struct.pack("<I", kind) + value for key, kind, value in self.kvs]
        for t in self.tensors:
            parts.append(_string(t.name) + struct.pack(f"<I{len(t.dims)}QIQ", len(t.dims), *t.dims, t.qtype, t.offset))
        head = b"".join(parts)
        return head + bytes(-len(head) % _ALIGNMENT)


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@functools.cache
def real_header(path: Path) -> Header:
    """The header of a real model file, split into its parts."""
    reader = _Reader(np.memmap(path, mode="r").data)
    reader.take(4)
    version, n_tensors, n_kv = reader.scalar("I"), reader.scalar("Q"), reader.scalar("Q")
    kvs = []
    for _ in range(n_kv):
        key, kind = bytes(reader.take(reader.scalar("Q"))), reader.scalar("I")
        start = reader.pos
        reader.value(kind)
        kvs.append((key, kind, bytes(reader.data[start : reader.pos])))
    tensors = []
    for _ in range(n_tensors):
        name = bytes(reader.take(reader.scalar("Q")))
        dims = tuple(reader.scalar("Q") for _ in range(reader.scalar("I")))
        tensors.append(TensorInfo(name, dims, reader.scalar("I"), reader.scalar("Q")))
    data_start = -(-reader.pos // _ALIGNMENT) * _ALIGNMENT
    return Header(path, version, tuple(kvs), tuple(tensors), data_start)


# -- mutations ---------------------------------------------------------------------------------

_INTS = [0, 1, -1, 2, 3, 32, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**62, 2**63 - 1, -(2**63)]
_FLOATS = [0.0, -1.0, 1e-30, 1e30, math.nan, math.inf, -math.inf]
_NUMBER_CODES = {t: code for t, code in _SCALARS.items() if code in "BbHhIiQq"}  # the integer types


def _encode_int(kind: GGUFValueType, value: int) -> bytes:
    code = _NUMBER_CODES[kind]
    bits = 8 * struct.calcsize(code)
    wrapped = value % 2**bits
    if code.islower() and wrapped >= 2 ** (bits - 1):
        wrapped -= 2**bits
    return struct.pack("<" + code, wrapped)


@st.composite
def _value(draw: st.DrawFn) -> tuple[int, bytes]:
    """A metadata value of any type, biased to the values that break things."""
    kind = draw(st.sampled_from([*_NUMBER_CODES, "float", "bool", "string", "array"]))
    if kind == "float":
        width = draw(st.sampled_from([GGUFValueType.FLOAT32, GGUFValueType.FLOAT64]))
        x = draw(st.sampled_from(_FLOATS) | st.floats(width=32))
        return width, struct.pack("<f" if width == GGUFValueType.FLOAT32 else "<d", x)
    if kind == "bool":
        return GGUFValueType.BOOL, bytes([draw(st.sampled_from([0, 1, 2, 255]))])
    if kind == "string":
        return GGUFValueType.STRING, _string(draw(st.text(max_size=12)).encode())
    if kind == "array":
        items = draw(st.lists(st.sampled_from(_INTS), max_size=4))
        return GGUFValueType.ARRAY, struct.pack("<IQ", 6, len(items)) + b"".join(
            _encode_int(GGUFValueType.INT32, i) for i in items
        )
    return kind, _encode_int(kind, draw(st.sampled_from(_INTS) | st.integers()))


def _resized_array(value: bytes, count: int) -> bytes:
    """An array value's bytes with only its first `count` items, or as many as it really
    holds (an earlier mutation may have given it a count its items do not back)."""
    reader = _Reader(memoryview(value))
    kind, have = reader.scalar("I"), reader.scalar("Q")
    kept = 0
    while kept < min(count, have) and reader.pos < len(value):
        reader.value(kind)
        kept += 1
    return struct.pack("<IQ", kind, kept) + value[12 : reader.pos]


@st.composite
def _mutate_header(draw: st.DrawFn, header: Header) -> Header:
    """One structural change to the header."""
    what = draw(st.sampled_from(["value", "drop key", "array", "dims", "type", "offset", "name", "counts"]))
    kvs, tensors = list(header.kvs), list(header.tensors)
    if what in ("value", "drop key", "array"):
        i = draw(st.sampled_from(range(len(kvs))))
        key, kind, value = kvs[i]
        if what == "drop key":
            del kvs[i]
        elif what == "array" and kind == GGUFValueType.ARRAY:
            have = struct.unpack_from("<Q", value, 4)[0]
            count = draw(st.sampled_from([0, 1, have // 2, max(have - 1, 0), have + 1, 2**40]))
            if count <= have:
                kvs[i] = (key, kind, _resized_array(value, count))
            else:  # a count the items that follow do not back
                kvs[i] = (key, kind, value[:4] + struct.pack("<Q", count) + value[12:])
        else:
            kvs[i] = (key, *draw(_value()))
        return replace(header, kvs=tuple(kvs))
    if what == "counts":
        n_kv, n_tensors = len(kvs), len(tensors)
        return replace(
            header,
            n_kv=draw(st.sampled_from([n_kv, 0, n_kv - 1, n_kv + 1, 2**40])),
            n_tensors=draw(st.sampled_from([n_tensors, 0, n_tensors - 1, n_tensors + 1, 2**63])),
        )
    i = draw(st.sampled_from(range(len(tensors))))
    t = tensors[i]
    if what == "dims":
        dims = list(t.dims)
        j = draw(st.sampled_from(range(len(dims) + 1)))
        size = draw(st.sampled_from([0, 1, 2, 32, 256, 2**32, 2**63 - 1, 2**64 - 1, *(d for d in t.dims)]))
        if j == len(dims):  # one dimension more, or one fewer
            dims = dims[:-1] if draw(st.booleans()) and len(dims) > 1 else [*dims, size]
        else:
            # % 2**64: what the header's uint64 can hold, after earlier mutations of the same dimension
            dims[j] = draw(st.sampled_from([size, dims[j] - 1, dims[j] + 1, dims[j] * 2, dims[j] // 2])) % 2**64
        tensors[i] = replace(t, dims=tuple(dims))
    elif what == "type":
        tensors[i] = replace(t, qtype=draw(st.sampled_from([*map(int, GGMLQuantizationType), 4, 99, 2**32 - 1])))
    elif what == "offset":
        other = draw(st.sampled_from(tensors)).offset
        choices = [0, t.offset + 1, t.offset + _ALIGNMENT, t.offset - _ALIGNMENT, other, 2**40, 2**64 - 1]
        tensors[i] = replace(t, offset=draw(st.sampled_from(choices)) % 2**64)
    else:
        other = draw(st.sampled_from(tensors)).name
        name = draw(st.sampled_from([other, b"blk.999.attn_q.weight", b"blk." + b"9" * 5000 + b".x", b"", None]))
        if name is None:
            del tensors[i]
        else:
            tensors[i] = replace(t, name=name)
    return replace(header, tensors=tuple(tensors))


@dataclass(frozen=True)
class Case:
    """A mutated file: its header, then its length and one flipped byte if any."""

    header: Header
    length: int | None  # cut the file here (None: header plus the real data's length)
    flip: tuple[int, int] | None  # (position in the header, xor mask)

    def write(self, path: Path, real_data: bool = False) -> None:
        head = bytearray(self.header.to_bytes())
        if self.flip is not None:
            head[self.flip[0] % len(head)] ^= self.flip[1]
        full = len(head) + self.header.path.stat().st_size - self.header.data_start
        with path.open("wb") as f:
            f.write(head)
            if real_data:
                with self.header.path.open("rb") as src:
                    src.seek(self.header.data_start)
                    shutil.copyfileobj(src, f, 1 << 24)
            f.truncate(min(full, self.length if self.length is not None else full))


@st.composite
def cases(draw: st.DrawFn, header: Header) -> Case:
    """A real header with one to three structural changes, then maybe a cut or a flipped byte."""
    for _ in range(draw(st.integers(1, 3))):
        header = draw(_mutate_header(header))
    length, flip = None, None
    if draw(st.integers(0, 3)) == 0:  # a quarter of the cases are cut short
        length = draw(st.integers(0, header.path.stat().st_size + 64))
    if draw(st.integers(0, 3)) == 0:  # and a quarter have a byte flipped
        flip = draw(st.tuples(st.integers(0, 2**20), st.integers(1, 255)))
    return Case(header, length, flip)


# -- what becomes of a case --------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    """What a real file's stages produce: a mutated file that matches passes them too."""

    tokenizer_fields: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, tuple[int, tuple[int, ...]]]


def _tokenizer_fields(gguf: GGUFFile) -> dict[str, Any]:
    return {k: v for k, v in gguf.metadata.items() if k.startswith("tokenizer.")}


def _tensor_shapes(gguf: GGUFFile) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {name: (int(t.qtype), t.shape) for name, t in gguf.tensors.items()}


@functools.cache
def baseline(path: Path) -> Baseline:
    gguf = GGUFFile(path)
    return Baseline(_tokenizer_fields(gguf), checked_config(gguf), _tensor_shapes(gguf))


def open_and_build(case: Case, path: Path, load: Callable[[Path], object]) -> str:
    """Write `case` to `path` and take it as far as it goes: the stage that refused it with
    a ModelFormatError, or "loaded". Any other exception propagates. `load` loads a model
    from a path; it runs only when the tensors or the config differ from the real file's."""
    case.write(path)
    real = baseline(case.header.path)
    try:
        gguf = GGUFFile(path)
    except ModelFormatError:
        return "refused by the reader"
    try:
        config = checked_config(gguf)
    except ModelFormatError:
        return "refused by the config check"
    if _tokenizer_fields(gguf) != real.tokenizer_fields:
        try:
            tokenizer = Tokenizer.from_gguf_fields(gguf.metadata)
        except ModelFormatError:
            return "refused by the tokenizer"
        try:
            chat_template_from_fields(gguf.metadata, tokenizer)
        except InvalidArgument:  # load_model keeps such a model, without chat
            pass
    if config != real.config or _tensor_shapes(gguf) != real.tensors:
        case.write(path, real_data=True)
        try:
            load(path)
        except ModelFormatError:
            return "refused by the loader"
    return "loaded"


# -- the property, at a count the suite can afford --------------------------------------------

_counter = itertools.count()


def _check(case: Case, workdir: Path, backend: Any) -> None:
    path = workdir / f"case{next(_counter)}.gguf"
    try:
        outcome = open_and_build(case, path, lambda p: load_model(p, backend, sha256="0" * 64, compile_mode="off"))
    finally:
        path.unlink(missing_ok=True)
    assert outcome.startswith(("refused", "loaded"))


_SUITE = settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@_SUITE
@given(data=st.data())
def test_mutated_smollm2_loads_or_is_refused(data, smollm2_path, tmp_path_factory, cpu_backend):
    _check(data.draw(cases(real_header(smollm2_path))), tmp_path_factory.mktemp("fuzz"), cpu_backend)


@settings(_SUITE, max_examples=6)
@given(data=st.data())
def test_mutated_gemma3_loads_or_is_refused(data, gemma3_path, tmp_path_factory, cpu_backend):
    _check(data.draw(cases(real_header(gemma3_path))), tmp_path_factory.mktemp("fuzz"), cpu_backend)


def test_the_real_files_pass_unchanged(smollm2_path, gemma3_path, tmp_path):
    """The harness itself: an unmutated header writes back to a file that reads the same."""
    for real in (smollm2_path, gemma3_path):
        header = real_header(real)
        Case(header, None, None).write(tmp_path / "same.gguf", real_data=True)
        assert filecmp.cmp(tmp_path / "same.gguf", real, shallow=False)
        assert open_and_build(Case(header, None, None), tmp_path / "same.gguf", lambda p: None) == "loaded"


# -- what the first fuzz found, by name --------------------------------------------------------


def _set(key: bytes, kind: GGUFValueType, payload: bytes) -> Callable[[Header], Header]:
    def mutate(header: Header) -> Header:
        kvs = [(k, kind, payload) if k == key else (k, t, v) for k, t, v in header.kvs]
        return replace(header, kvs=tuple(kvs))

    return mutate


def _u32(key: str, value: int) -> Callable[[Header], Header]:
    return _set(key.encode(), GGUFValueType.UINT32, struct.pack("<I", value))


def _tensor(index: int, **change: Any) -> Callable[[Header], Header]:
    def mutate(header: Header) -> Header:
        tensors = list(header.tensors)
        if change.get("offset") == "previous":
            change["offset"] = tensors[index - 1].offset
        tensors[index] = replace(tensors[index], **change)
        return replace(header, tensors=tuple(tensors))

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_u32("llama.embedding_length", 0), r"llama.embedding_length is 0, outside 1\.\."),
        (_u32("llama.attention.head_count", 0), r"llama.attention.head_count is 0, outside 1\.\."),
        (_u32("llama.block_count", 0), r"llama.block_count is 0, outside 1\.\."),
        (_u32("llama.block_count", 31), "block_count is 31 but the file has tensors for 30 blocks"),
        (_u32("llama.attention.head_count_kv", 2), "head_count_kv 2 does not divide attention.head_count 9"),
        (_u32("llama.embedding_length", 577), "embedding_length 577 is not a multiple of attention.head_count 9"),
        (  # 733 GB of keys and values, before this check
            _u32("llama.embedding_length", 576 * 10**6),
            r"tensor token_embd.weight has shape \(49152, 576\) where the metadata makes it \(49152, 576000000\)",
        ),
        (
            _u32("llama.feed_forward_length", 1537),
            r"tensor blk.0.ffn_gate.weight has shape .*\(feed_forward_length x embedding_length\)",
        ),
        (_u32("llama.context_length", 0), "llama.context_length is 0, outside 1"),
        (_u32("llama.vocab_size", 49153), "vocab_size is 49153 but tokenizer.ggml.tokens has 49152 tokens"),
        (
            _set(b"llama.context_length", GGUFValueType.UINT64, struct.pack("<Q", 2**40)),
            "context_length is 1099511627776, outside 1..16777216",
        ),
        (_set(b"llama.embedding_length", GGUFValueType.STRING, _string(b"576")), "must be an integer, not str"),
        (
            _set(b"llama.attention.layer_norm_rms_epsilon", GGUFValueType.FLOAT32, struct.pack("<f", math.nan)),
            "layer_norm_rms_epsilon is nan; it must be a finite number above 0",
        ),
        (_tensor(0, dims=(576, 0)), r"tensor token_embd.weight: its dimensions \[576, 0\] include a 0"),
        (_tensor(0, dims=(2**32, 2**32)), "more elements than an int64 counts"),
        (_tensor(2, offset="previous"), "overlaps tensor"),
        (_tensor(0, qtype=99), "unknown quantization type 99"),
    ],
)
def test_an_impossible_header_is_named(smollm2_path, tmp_path, mutate, message):
    """Each of these once ended in a traceback, a huge allocation, or `realm inspect` saying
    nothing; now the reader or the config check names the key or tensor and its value."""
    path = tmp_path / "bad.gguf"
    Case(mutate(real_header(smollm2_path)), None, None).write(path)
    with pytest.raises(ModelFormatError, match=message):
        checked_config(GGUFFile(path))


def test_inspect_refuses_an_impossible_header(smollm2_path, tmp_path, capsys):
    from realm.cli import inspect

    path = tmp_path / "bad.gguf"
    Case(_u32("llama.attention.head_count", 0)(real_header(smollm2_path)), None, None).write(path)
    with pytest.raises(typer.Exit):
        inspect(str(path), as_json=True)
    assert "llama.attention.head_count is 0" in capsys.readouterr().err.replace("\n", "")


def test_gemma3_without_its_qk_norms_is_refused(gemma3_path, tmp_path):
    """gemma3 normalises q and k per head: a file that lacks those norms would load and then
    compute something else, so it is refused."""
    header = real_header(gemma3_path)
    at = next(i for i, t in enumerate(header.tensors) if t.name == b"blk.0.attn_q_norm.weight")
    path = tmp_path / "bad.gguf"
    Case(_tensor(at, name=b"blk.0.unused.weight")(header), None, None).write(path)
    with pytest.raises(ModelFormatError, match="required tensor 'blk.0.attn_q_norm.weight' is missing"):
        checked_config(GGUFFile(path))
