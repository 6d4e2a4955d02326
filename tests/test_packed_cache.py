"""Packed weights kept on disk: a load that maps them gives the very matrices that packing
gives, and a file that cannot serve is packed and written again, never trusted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_model import write_tiny_llama

from realm.backends import devices, linear, native, packed_cache
from realm.engine.model import load_model
from realm.engine.model_store import ModelStore

pytestmark = pytest.mark.skipif(not native.load(), reason="a file holds the formats of Realm's kernels")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A $REALM_HOME of the test's own, where even a tiny model keeps a file."""
    monkeypatch.setenv("REALM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(packed_cache, "SMALLEST", 0)
    return tmp_path / "home" / "packed"


@pytest.fixture
def packs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the matrices the CPU backend packs (rather than a file giving them)."""
    names: list[str] = []
    pack_linear, pack_output = devices.Backend.pack_linear, devices.Backend.pack_output

    def linear(self, tensors):
        names.append("+".join(t.name for t in tensors))
        return pack_linear(self, tensors)

    def output(self, tensor):
        names.append(tensor.name)
        return pack_output(self, tensor)

    monkeypatch.setattr(devices.Backend, "pack_linear", linear)
    monkeypatch.setattr(devices.Backend, "pack_output", output)
    return names


def matrices(model) -> dict[str, object]:
    w = model.transformer.weights
    found = {"output": w.output}
    for i, layer in enumerate(w.layers):
        found |= {f"{i}.{f}": getattr(layer, f) for f in ("qkv", "attn_out", "gate_up", "down")}
    return found


def assert_same(a, b) -> None:
    """The same class and fields, tensors equal bit for bit (dtype and shape included)."""
    assert type(a) is type(b)
    fields_a, fields_b = vars(a), vars(b)
    assert fields_a.keys() == fields_b.keys()
    for name, x in fields_a.items():
        y = fields_b[name]
        pairs = list(zip(x, y, strict=True)) if isinstance(x, tuple) else [(x, y)]
        for u, v in pairs:
            if isinstance(u, torch.Tensor):
                assert u.dtype == v.dtype and u.shape == v.shape and torch.equal(u, v), name
            elif hasattr(u, "raw"):  # the GGUF tensor the screen's exact rows come from
                assert u.name == v.name and u.offset == v.offset
            else:
                assert u == v, name


def logits(model) -> torch.Tensor:
    """A prompt's logits, then a decode step's."""
    session = model.new_session()
    return torch.cat([session.feed([1, 5, 9, 13], all_logits=True), session.feed([7])])


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q5_0", "Q4_0"])
def test_a_second_load_maps_the_matrices_the_first_packed(home, packs, tmp_path, cpu_backend, qtype) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype=qtype)
    packed = load_model(path, cpu_backend, compile_mode="off")
    assert packs and len(list(home.glob("*.bin"))) == 1
    packs.clear()
    mapped = load_model(path, cpu_backend, compile_mode="off")
    assert packs == []  # every matrix came from the file
    for name, matrix in matrices(packed).items():
        assert_same(matrix, matrices(mapped)[name])
    assert torch.equal(logits(packed), logits(mapped))


def test_gemma3s_formats_come_back_the_same(home, gemma3_path, cpu_backend, packs) -> None:
    """gemma3's file holds every format the real models use: 5- and 8-bit layers, 4-bit
    ones, and the 4-bit screen of its 262k-row output projection."""
    packed = load_model(gemma3_path, cpu_backend, compile_mode="off")
    packs.clear()
    mapped = load_model(gemma3_path, cpu_backend, compile_mode="off")
    assert packs == []
    kinds = {type(m).__name__ for m in matrices(mapped).values()}
    assert {"NativeInt5Linear", "NativeInt8Linear", "ScreenedLinear"} <= kinds
    assert mapped.transformer.weights.output.nibbles is not None
    for name, matrix in matrices(packed).items():
        assert_same(matrix, matrices(mapped)[name])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"NOTMINE!" + path.read_bytes()[8:])


def _header(path: Path, change) -> None:
    """The header changed by `change`, the tensors left where they were."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[8:16], "little")
    header = json.loads(data[16 : 16 + length])
    change(header)
    new = json.dumps(header).encode()
    assert 16 + len(new) <= -(-(16 + length) // 64) * 64  # still ends before the first tensor
    data[8:16] = len(new).to_bytes(8, "little")
    data[16 : 16 + len(new)] = new
    path.write_bytes(data)


def _foreign_class(path: Path) -> None:
    def change(header):
        next(iter(header["objects"].values()))["kind"] = "Popen"

    _header(path, change)


def _tensor_outside(path: Path) -> None:
    def change(header):
        header["tensors"][0]["offset"] = 1 << 40

    _header(path, change)


@pytest.mark.parametrize("damage", [_truncate, _bad_magic, _foreign_class, _tensor_outside])
def test_a_file_that_cannot_serve_is_packed_again(home, packs, tmp_path, cpu_backend, caplog, damage) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="Q8_0")
    packed = load_model(path, cpu_backend, compile_mode="off")
    (file,) = home.glob("*.bin")
    damage(file)
    packs.clear()
    with caplog.at_level(logging.WARNING, logger="realm.backends.packed_cache"):
        again = load_model(path, cpu_backend, compile_mode="off")
    assert "ignoring packed weights" in caplog.text
    assert packs  # packed from the GGUF, not taken from the damaged file
    assert torch.equal(logits(packed), logits(again))
    packs.clear()
    load_model(path, cpu_backend, compile_mode="off")  # written anew, whole
    assert packs == []


def test_a_changed_model_file_is_packed_again_and_its_old_file_goes(home, packs, tmp_path, cpu_backend) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="Q8_0")
    load_model(path, cpu_backend, sha256="a" * 64, compile_mode="off")
    (first,) = home.glob("*.bin")
    write_tiny_llama(path, seed=1, qtype="Q8_0")  # the same name and hash given, new bytes
    packs.clear()
    load_model(path, cpu_backend, sha256="a" * 64, compile_mode="off")
    assert packs
    (second,) = home.glob("*.bin")
    assert second != first


def test_off_keeps_no_file(home, packs, tmp_path, cpu_backend, monkeypatch) -> None:
    monkeypatch.setenv("REALM_PACKED_CACHE", "off")
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="Q8_0")
    load_model(path, cpu_backend, compile_mode="off")
    load_model(path, cpu_backend, compile_mode="off")
    assert not home.exists()


def test_an_unwritable_home_still_loads(home, tmp_path, cpu_backend, caplog) -> None:
    home.parent.mkdir(parents=True)
    home.write_text("a file where the folder would go")
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="Q8_0")
    with caplog.at_level(logging.WARNING, logger="realm.backends.packed_cache"):
        model = load_model(path, cpu_backend, compile_mode="off")
    assert "packed weights not kept" in caplog.text
    assert logits(model).isfinite().all()


def test_a_tenants_upload_keeps_no_file(home, tmp_path, cpu_backend) -> None:
    """Bytes a guest hands in stay one copy on disk (their blob), however many it sends."""
    store = ModelStore(cpu_backend, home=tmp_path)
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="Q8_0")
    entry = store.store_bytes(path.read_bytes())
    assert entry.model.transformer is not None
    assert not home.exists()


def test_a_matrix_the_file_cannot_hold_keeps_no_file(home, tmp_path, cpu_backend, caplog, monkeypatch) -> None:
    """A tensor of a dtype the file does not name is refused when writing, not written to be
    refused at every later load."""

    def float64(self, tensors):
        return linear.DenseLinear(linear.dequantize_stacked(tensors), torch.float64)

    monkeypatch.setattr(devices.Backend, "pack_linear", float64)
    path = write_tiny_llama(tmp_path / "tiny.gguf", qtype="Q8_0")
    with caplog.at_level(logging.WARNING, logger="realm.backends.packed_cache"):
        load_model(path, cpu_backend, compile_mode="off")
    assert "packed weights not kept" in caplog.text and "float64" in caplog.text
    assert not list(home.glob("*.bin"))
