"""Token embedding lookup straight from the GGUF file.

Only the rows asked for are read and dequantized, exactly as stored (`TensorData.rows`),
so the table costs no memory of its own and matches llama.cpp's lookup bit for bit.
"""

from __future__ import annotations

import torch

from realm.backends import native
from realm.models.gguf_file import TensorData


class RawEmbedding:
    def __init__(self, tensor: TensorData, device: torch.device) -> None:
        self.tensor = tensor
        self.device = device
        self.vocab_size, self.dim = tensor.shape

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return native.read_rows(self.tensor, ids.cpu()).to(self.device)
