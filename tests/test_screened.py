"""The screened output projection: the largest logits exact, the tail close."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize as gguf_quantize

from realm.backends import native, screened
from realm.backends.screened import CANDIDATES, Int8Matrix, ScreenedLinear, largest
from realm.engine.memory import weight_bytes
from realm.models.gguf_file import TensorData


def exact_product(x: torch.Tensor, tensor: TensorData) -> torch.Tensor:
    """x @ W.T in float64 from the weights as stored, a slice of rows at a time."""
    pieces = [
        x.double() @ tensor.rows(slice(start, start + 32768)).double().T for start in range(0, tensor.shape[0], 32768)
    ]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.F16, QT.F32], ids=lambda q: q.name)
def test_a_vocabulary_smaller_than_the_candidates_is_exact_everywhere(qtype: QT) -> None:
    rows, cols = CANDIDATES // 2, 64
    w = np.random.default_rng(0).normal(0, 0.05, (rows, cols)).astype(np.float32)
    w[3] = 0  # an all-zero row must not divide by a zero scale
    tensor = TensorData("output.weight", qtype, (rows, cols), gguf_quantize(w, qtype))
    linear = ScreenedLinear(tensor)
    for x in (torch.randn(3, cols), torch.randn(1, cols)):  # a batch and a lone row
        y = linear(x)
        assert y.shape == (len(x), rows) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), exact_product(x, tensor), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.load(), reason="the 4-bit screen is Realm's native kernel")
def test_a_four_bit_screen_keeps_the_largest_exact_and_the_tail_close(monkeypatch) -> None:
    """A matrix past FOUR_BIT_FROM (here every matrix) is screened in 4-bit codes with a
    scale and a minimum per block: an all-zero row and a block of one value come through."""
    monkeypatch.setattr(screened, "FOUR_BIT_FROM", 0)
    rows, cols = 4096, 128
    w = np.random.default_rng(1).normal(0, 0.05, (rows, cols)).astype(np.float32)
    w[3], w[5, :32] = 0, 0.02
    tensor = TensorData("output.weight", QT.F32, (rows, cols), gguf_quantize(w, QT.F32))
    linear = ScreenedLinear(tensor)
    assert linear.nibbles is not None and linear.blocks is None
    # seeded: on random weights (a flatter top than a model's) the true top 32 fell outside
    # the 64 candidates for 9 of 300 random inputs of 4 rows
    x = torch.randn(4, cols, generator=torch.Generator().manual_seed(0))
    exact = exact_product(x, tensor)
    for y in (linear(x), torch.cat([linear(row[None]) for row in x])):
        error = (y.double() - exact).abs()
        top = exact.topk(CANDIDATES // 2, dim=1).indices
        assert error.gather(1, top).max() <= 1e-4
        assert 0 < error.mean() <= 0.1 * 0.05 * cols**0.5  # a tenth of a logit's spread (measured: 6%)
    torch.testing.assert_close(linear.precise(x).double(), exact, rtol=1e-5, atol=1e-4)  # perplexity's form


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_largest_logits_are_exact_and_the_tail_close(request, reference_dir, name):
    """On real hidden states (a reference prompt's last rows before the output projection):
    llama.cpp's reference keeps 20 logits a position, so those must carry no screening
    error; the tail moves by a few hundredths on average in 8 bits (smollm2), about a
    quarter in 4 bits (gemma3's 262,144 rows)."""
    model = request.getfixturevalue(name)
    output = model.transformer.weights.output
    assert isinstance(output, ScreenedLinear)
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return output(x)

    reference = np.load(next(reference_dir.glob(f"{name}*.logits.npz")))
    tokens = reference["p6_tokens"].astype(np.int64).tolist()[:120]
    model.transformer.weights.output = recording
    try:
        model.new_session().feed(tokens, all_logits=True)
    finally:
        model.transformer.weights.output = output
    x = torch.cat(seen)[::4]
    four_bits = output.nibbles is not None
    assert four_bits == (name == "gemma3" and native.load())
    mean_bound, max_bound = (0.35, 3.0) if four_bits else (0.1, 1.0)
    exact = exact_product(x, output.tensor)
    top20 = exact.topk(20, dim=1).indices
    # all rows at once (a batch, a prefill), then one at a time (a lone decode step)
    for logits in (output(x), torch.cat([output(row[None]) for row in x])):
        error = (logits.double() - exact).abs()
        assert error.gather(1, top20).max() <= 1e-4
        assert torch.equal(logits.argmax(dim=1), exact.argmax(dim=1))
        assert error.mean() <= mean_bound, float(error.mean())
        assert error.max() <= max_bound, float(error.max())


def test_a_mask_over_the_candidates_leaves_the_best_allowed_exact(gemma3, monkeypatch):
    """gemma3's 4-bit screen: a mask (a grammar, a guest's) that forbids every exact
    candidate would leave the rough tail to decide; a step told the mask (`allowed`)
    computes the best tokens it leaves from the weights as stored, and keeps the rest."""
    output = gemma3.transformer.weights.output
    seen: list[torch.Tensor] = []
    constrained = output.constrained

    def recording(x: torch.Tensor, rows: list[int], allowed: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return constrained(x, rows, allowed)

    monkeypatch.setattr(output, "constrained", recording)
    prompt = gemma3.tokenizer.encode("The capital of France is")
    free = gemma3.new_session(64).feed(prompt)[-1]
    allowed = torch.ones(gemma3.config.vocab_size, dtype=torch.bool)
    allowed[largest(free[None], CANDIDATES)[0]] = False
    row = gemma3.new_session(64).feed(prompt, allowed=allowed)[-1]
    precise = output.precise(seen[0])[0]
    left = largest(row.masked_fill(~allowed, float("-inf"))[None], CANDIDATES // 2)[0]  # clear of the edge
    assert (free[left] - precise[left]).abs().max() > 0.05  # without the mask: rough there
    torch.testing.assert_close(row[left], precise[left], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(row[~allowed], free[~allowed])  # unmasked: the favourites as before


def test_a_rows_screen_is_the_same_in_any_batch(smollm2):
    """The screen's integer sums make a sequence's screened logits independent of what
    else shares its step."""
    output = smollm2.transformer.weights.output
    x = torch.randn(9, output.in_features, generator=torch.Generator().manual_seed(0))
    assert torch.equal(output._screen(x), torch.cat([output._screen(row[None]) for row in x]))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")
def test_the_prepacked_product_gives_the_plain_products_integers() -> None:
    """The screen's oneDNN layout (unsigned activations, zero point 128) changes the speed,
    never the sums: equal to `torch._int_mm`'s to the last bit, at every batch size, with
    codes and activations at both ends of the int8 range."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (1000, 576), dtype=torch.int8, generator=gen)
    codes[0], codes[1] = 127, -127
    product, plain = Int8Matrix(codes), Int8Matrix(codes, prepack=False)
    assert product.packed is not None and plain.packed is None
    assert weight_bytes(product) >= codes.numel()  # a model's bytes_held counts oneDNN's copy
    for rows in (1, 2, 8, 17, 64):
        x = torch.randint(-127, 128, (rows, 576), dtype=torch.int8, generator=gen)
        x[0] = -127
        assert torch.equal(product(x), plain(x))


@pytest.mark.parametrize("n", [49152, 262144, 1000])
def test_largest_finds_the_same_entries_as_topk(n: int) -> None:
    logits = torch.randn(5, n)
    logits[1, 7::97] += 40  # many clustered winners: runs holding several of the k largest
    logits[2] = 0.5  # all tied
    logits[2, -3] = 1.0
    got = largest(logits, CANDIDATES)
    assert got.shape == (5, CANDIDATES)
    assert all(len(set(row.tolist())) == CANDIDATES for row in got)
    want = logits.topk(CANDIDATES, dim=1).values
    torch.testing.assert_close(logits.gather(1, got).sort(dim=1).values, want.sort(dim=1).values, rtol=0, atol=0)
    assert int(got[2].eq(n - 3).sum()) == 1
