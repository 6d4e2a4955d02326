"""A bad model file is a clear ModelFormatError, never a crash or a half-loaded model."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter

from realm.errors import ModelFormatError
from realm.models.config import config_from_gguf
from realm.models.gguf_file import GGUFFile


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
