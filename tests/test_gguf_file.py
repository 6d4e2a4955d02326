"""A bad model file is a clear ModelFormatError, never a crash or a half-loaded model."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

from realm.errors import ModelFormatError
from realm.models import gguf_file
from realm.models.config import config_from_gguf
from realm.models.gguf_file import GGUFFile, TensorData


def write_gguf(path, arch: str = "llama", tensor_type: QT = QT.F32) -> None:
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if tensor_type == QT.F32:
        writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    else:  # raw bytes of 8 rows of 256 elements in a type Realm does not run
        writer.add_tensor("token_embd.weight", np.zeros((8, 66), dtype=np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_truncated_file(tmp_path, smollm2_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[: 50 * 2**20])
    with pytest.raises(ModelFormatError, match="not a valid GGUF"):
        GGUFFile(cut)


def test_not_a_gguf(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFormatError, match="not a valid GGUF"):
        GGUFFile(junk)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="no such model file"):
        GGUFFile(tmp_path / "absent.gguf")


def test_unknown_architecture_is_named(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_gguf(path, arch="mamba")
    with pytest.raises(ModelFormatError, match="architecture 'mamba' is not supported"):
        config_from_gguf(GGUFFile(path))


def test_unknown_quantization_type_is_named(tmp_path):
    path = tmp_path / "iq.gguf"
    write_gguf(path, tensor_type=QT.IQ2_XXS)
    with pytest.raises(ModelFormatError, match="IQ2_XXS"):
        GGUFFile(path)


def test_missing_metadata_is_named(tmp_path):
    path = tmp_path / "bare.gguf"
    write_gguf(path)
    with pytest.raises(ModelFormatError, match="llama.embedding_length"):
        config_from_gguf(GGUFFile(path))


def test_real_models_read(smollm2_path, gemma3_path):
    smol, gemma = GGUFFile(smollm2_path), GGUFFile(gemma3_path)
    assert config_from_gguf(smol).n_layers == 30
    g = config_from_gguf(gemma)
    assert (g.n_layers, g.sliding_window, g.head_dim) == (18, 512, 256)
    assert [g.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    assert gemma.quant_types() == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


def test_reads_what_the_gguf_package_reads(smollm2_path):
    """The same metadata values and the same tensor bytes as the `gguf` package's own reader."""
    from gguf import GGUFReader

    mine, theirs = GGUFFile(smollm2_path), GGUFReader(smollm2_path, "r")
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert mine.metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert (
            mine.metadata[key] == pytest.approx(value) if isinstance(value, float) else mine.metadata[key] == value
        ), key
    assert len(mine.metadata["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in theirs.tensors] == list(mine.tensors)
    for t in theirs.tensors:
        got = mine.tensors[t.name]
        assert got.qtype == t.tensor_type and got.shape == tuple(reversed(t.shape.tolist()))
        assert bytes(np.ascontiguousarray(got.raw)) == bytes(np.ascontiguousarray(t.data)), t.name


# -- hand-made headers: every defect is named, none crashes ------------------------------------


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _kv(key: bytes, kind: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", kind) + payload


ARCH = _kv(b"general.architecture", 8, _string(b"llama"))


def _file(
    tmp_path,
    *kvs: bytes,
    tensors: tuple[bytes, ...] = (),
    n_kv: int | None = None,
    n_tensors: int | None = None,
    version: int = 3,
    data: bytes = b"",
) -> Path:
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % 32) + data
    path = tmp_path / "made.gguf"
    path.write_bytes(body)
    return path


def _tensor(name: bytes, dims: tuple[int, ...], qtype: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def test_a_hand_made_file_reads(tmp_path):
    values = struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0.5, -1.0, 2.0)
    path = _file(
        tmp_path,
        ARCH,
        _kv(b"x.flag", 7, b"\1"),
        _kv(b"x.list", 9, values),
        _kv(b"x.names", 9, struct.pack("<IQ", 8, 2) + _string(b"a") + _string("é".encode())),
        tensors=(_tensor(b"w", (4, 2)),),
        data=np.arange(8, dtype=np.float32).tobytes(),
    )
    g = GGUFFile(path)
    assert g.metadata == {
        "general.architecture": "llama",
        "x.flag": True,
        "x.list": [0.5, -1.0, 2.0],
        "x.names": ["a", "é"],
    }
    assert g.tensors["w"].shape == (2, 4)
    assert g.tensors["w"].rows([1]).tolist() == [[4.0, 5.0, 6.0, 7.0]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _file(p, ARCH, version=1), "version 1 is not supported"),
        (lambda p: _file(p, ARCH, version=3 << 24), "big-endian"),
        (lambda p: _file(p, ARCH, n_kv=2**62), "cannot fit"),
        (lambda p: _file(p, ARCH, _kv(b"x", 8, struct.pack("<Q", 2**40) + b"abc")), "ends inside metadata key 'x'"),
        (lambda p: _file(p, ARCH, _kv(b"x", 9, struct.pack("<IQ", 6, 2**40))), "ends inside metadata key 'x'"),
        (lambda p: _file(p, ARCH, _kv(b"x", 9, struct.pack("<IQ", 8, 2**40))), "ends inside metadata key 'x'"),
        (lambda p: _file(p, ARCH, _kv(b"x", 99, b"")), "metadata key 'x': unknown value type 99"),
        (lambda p: _file(p, ARCH, ARCH), "the key appears twice"),
        (lambda p: _file(p, ARCH, _kv(b"general.alignment", 4, struct.pack("<I", 48))), "48 is not a power of two"),
        (lambda p: _file(p, ARCH, tensors=(_tensor(b"w", (4, 2)),)), "tensor w: its 32 bytes at .* lie past the end"),
        (
            lambda p: _file(p, ARCH, tensors=(_tensor(b"w", (4,), offset=4),), data=bytes(64)),
            "not a multiple of the alignment 32",
        ),
        (
            lambda p: _file(p, ARCH, tensors=(_tensor(b"w", (4,)), _tensor(b"w", (4,))), data=bytes(32)),
            "the name appears twice",
        ),
        (lambda p: _file(p, ARCH, tensors=(_tensor(b"w", (4,) * 5),)), "5 dimensions"),
        (
            lambda p: _file(p, ARCH, tensors=(_tensor(b"w", (40,), qtype=8),), data=bytes(64)),
            "40 are not whole 32-element blocks",
        ),
        (lambda p: _file(p, ARCH, tensors=(_tensor(b"w", (4,), qtype=1000),)), "unknown quantization type 1000"),
        (lambda p: _file(p, _kv(b"general.architecture", 4, struct.pack("<I", 7))), "no general.architecture"),
    ],
)
def test_a_malformed_header_is_named(tmp_path, make, message):
    with pytest.raises(ModelFormatError, match=message):
        GGUFFile(make(tmp_path))


def test_metadata_arrays_are_capped(tmp_path, monkeypatch):
    """Each array item becomes a Python object: past the cap a file is refused, not read."""
    monkeypatch.setattr(gguf_file, "MAX_ARRAY_ITEMS", 5)
    items = _kv(b"x.list", 9, struct.pack("<IQ", 0, 4) + bytes(4))
    GGUFFile(_file(tmp_path, ARCH, items))
    with pytest.raises(ModelFormatError, match="the metadata arrays hold more than 5 items in all"):
        GGUFFile(_file(tmp_path, ARCH, items, _kv(b"x.more", 9, struct.pack("<IQ", 0, 2) + bytes(2))))


def test_a_loaded_model_holds_its_vocabulary_once(smollm2):
    """The GGUF's per-token arrays are dropped once the tokenizer has them in its own form."""
    kept = [k for k, v in smollm2.gguf.metadata.items() if k.startswith("tokenizer.ggml.") and isinstance(v, list)]
    assert kept == []
    assert smollm2.gguf.metadata["tokenizer.ggml.model"] == "gpt2"
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode("Hello world")) == "Hello world"


def _mapped_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path`."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                current = len(parts) > 5 and parts[5] == str(path)
            elif current and parts[0] == "Rss:":
                total += int(parts[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux's /proc")
def test_rows_read_after_loading_map_nothing_and_match_the_mapped_bytes(smollm2_path):
    """Scattered rows (embeddings, exact logits) are read, not mapped: mapped reads pulled
    64 KiB around each row into the resident set."""
    g = GGUFFile(smollm2_path)
    g.drop_resident_pages()
    before = _mapped_kib(g.path)  # other mappings of the file (a loaded model's) count too
    embd = g.tensors["token_embd.weight"]
    ids = np.random.default_rng(0).integers(0, embd.shape[0], 512)
    got = embd.rows(ids)
    assert _mapped_kib(g.path) - before < 256  # 512 mapped reads: ~30 MiB
    mapped = TensorData(embd.name, embd.qtype, embd.shape, embd.raw)  # no reader: through the map
    assert torch.equal(got, mapped.rows(ids))
    assert torch.equal(embd.rows(slice(100, 164)), mapped.rows(slice(100, 164)))
    with pytest.raises(IndexError):
        embd.rows(np.array([embd.shape[0]]))
