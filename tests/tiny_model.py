"""Tiny random models written as real GGUF files, for tests that need a model in milliseconds.

`write_tiny_llama(path)` makes a 2-layer llama (dim 64, 4 heads, 2 KV heads, FFN 128) with
a small GPT-2 byte-level BPE vocabulary: the 256 byte tokens, a few merges, and
`<|endoftext|>` as BOS and EOS. Weights are random (normal, scaled so that greedy argmax
is never decided by a near tie) and float32 by default, so the host runs them dense in
float32 and a guest's float32 arithmetic gives the same tokens; `qtype` quantizes the
matrices (Q8_0 or Q4_0) to exercise the host's quantized paths. `write_tiny_gemma3` is
the same for gemma3 (6 layers, so one is global and five use a short sliding window).
Both have an output projection of their own (smollm2 covers the tied case).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

from realm.models.tokenizer import _bytes_to_unicode

DIM = 64
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = DIM // N_HEADS
FFN = 128
CONTEXT = 256

# Merges in rank order; each joins two tokens into one that is added to the vocabulary.
# 15 of them make the vocabulary 272 = 17 * 16 tokens: the host's int4 kernel wants
# output widths divisible by 16 (a quantized output projection is one).
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("a", "t"), ("Ġ", "w"), ("o", "r"), ("e", "n"), ("Ġ", "o"),
    ("Ġ", "c"),
]  # fmt: skip
EOS_TEXT = "<|endoftext|>"


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255."""
    table = _bytes_to_unicode()
    return [table[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): byte tokens, merged tokens, then EOS."""
    tokens = _byte_chars()
    merges = []
    for a, b in _MERGES:
        tokens.append(a + b)
        merges.append(f"{a} {b}")
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens.append(EOS_TEXT)
    types.append(int(TokenType.CONTROL))
    return tokens, types, merges


def write_tiny_llama(path: str | Path, seed: int = 0, qtype: str = "F32") -> Path:
    """A 2-layer random llama as GGUF at `path` (qtype: "F32", "Q8_0" or "Q4_0")."""
    return _write(Path(path), "llama", 2, seed, qtype)


def write_tiny_gemma3(path: str | Path, seed: int = 0, qtype: str = "F32") -> Path:
    """A 6-layer random gemma3 as GGUF at `path`: layers 0-4 slide over 8 positions."""
    return _write(Path(path), "gemma3", 6, seed, qtype)


def _write(path: Path, arch: str, n_layers: int, seed: int, qtype: str) -> Path:
    qt = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    eos = vocab - 1

    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    w.add_vocab_size(vocab)
    if arch == "llama":
        w.add_rope_freq_base(10000.0)
        w.add_rope_dimension_count(HEAD_DIM)
    else:
        w.add_rope_freq_base(1000000.0)
        w.add_key_length(HEAD_DIM)
        w.add_value_length(HEAD_DIM)
        w.add_sliding_window(8)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(eos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(True)

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        data = rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)
        if qt == GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, qt), raw_dtype=qt)

    def vector(name: str, n: int) -> None:  # norms stay float32, as in real checkpoints
        w.add_tensor(name, (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32))

    # gemma3 scales embeddings by sqrt(DIM): keep the scaled ones near llama's size
    matrix("token_embd.weight", vocab, DIM, 0.3 if arch == "llama" else 0.3 / np.sqrt(DIM))
    for i in range(n_layers):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", DIM)
        matrix(p + "attn_q.weight", N_HEADS * HEAD_DIM, DIM, 0.3 / np.sqrt(DIM) * 4)
        matrix(p + "attn_k.weight", N_KV_HEADS * HEAD_DIM, DIM, 0.3 / np.sqrt(DIM) * 4)
        matrix(p + "attn_v.weight", N_KV_HEADS * HEAD_DIM, DIM, 1.0 / np.sqrt(DIM))
        matrix(p + "attn_output.weight", DIM, N_HEADS * HEAD_DIM, 1.0 / np.sqrt(DIM))
        if arch == "gemma3":
            vector(p + "attn_q_norm.weight", HEAD_DIM)
            vector(p + "attn_k_norm.weight", HEAD_DIM)
            vector(p + "post_attention_norm.weight", DIM)
            vector(p + "post_ffw_norm.weight", DIM)
        vector(p + "ffn_norm.weight", DIM)
        matrix(p + "ffn_gate.weight", FFN, DIM, 1.0 / np.sqrt(DIM))
        matrix(p + "ffn_up.weight", FFN, DIM, 1.0 / np.sqrt(DIM))
        matrix(p + "ffn_down.weight", DIM, FFN, 1.0 / np.sqrt(FFN))
    vector("output_norm.weight", DIM)
    matrix("output.weight", vocab, DIM, 0.3)  # untied: a tied one makes gemma3 repeat itself

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
