"""The GGUF tokenizer against llama.cpp's own tokenization of the two real models."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REFERENCE, metadata_of

from realm.errors import InvalidArgument, ModelFormatError
from realm.models.tokenizer import StreamDecoder, Tokenizer, _bytes_to_unicode

REF_NAMES = {"smollm2": "smollm2-135m-instruct-q4_1", "gemma3": "gemma3-270m-q4_k_m"}


def gguf_fields(path: Path) -> dict[str, Any]:
    """GGUF metadata as plain Python values, as the engine's loader gives it (read once)."""
    return metadata_of(path)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(gguf_fields(smollm2_path))


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_fields(gguf_fields(gemma3_path))


@pytest.fixture(params=["smollm2", "gemma3"])
def model(request: pytest.FixtureRequest) -> tuple[str, Tokenizer]:
    return request.param, request.getfixturevalue(request.param)


def _cases(name: str) -> list[dict[str, Any]]:
    path = REFERENCE / f"{REF_NAMES[name]}.tokenizer.json"
    if not path.is_file():
        pytest.skip(f"reference data {path} is not there")
    return json.loads(path.read_text())["cases"]


def _prompts(name: str) -> tuple[list[dict[str, Any]], Any]:
    base = REFERENCE / REF_NAMES[name]
    meta = json.loads(base.with_suffix(".logits.json").read_text())
    return meta["prompts"], np.load(base.with_suffix(".logits.npz"))


# -- exactly llama.cpp -------------------------------------------------------------------------


def test_reference_encode(model: tuple[str, Tokenizer]) -> None:
    name, tok = model
    cases = _cases(name)
    assert len(cases) >= 40
    wrong = [(c["text"], tok.encode(c["text"]), c["ids"]) for c in cases]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ from llama.cpp: {wrong[:3]}"


def test_reference_decode(model: tuple[str, Tokenizer]) -> None:
    name, tok = model
    for c in _cases(name):
        assert tok.decode(c["ids"]) == c["detok"], c["text"]
        assert tok.decode(c["ids"], skip_special=True) == c["detok"], c["text"]
        assert b"".join(tok.token_bytes(i) for i in c["ids"]).decode("utf-8") == c["detok"]


def test_reference_prompts_with_special_tokens_and_bos(model: tuple[str, Tokenizer]) -> None:
    """The logits reference: prompts tokenized with the model's BOS rule and specials parsed."""
    name, tok = model
    prompts, arrays = _prompts(name)
    for i, p in enumerate(prompts):
        ids = tok.encode(p["prompt"], add_bos=tok.add_bos, parse_special=True)
        assert ids == arrays[f"p{i}_tokens"].tolist(), p["prompt"]
        assert len(ids) == p["n_prompt_tokens"]
        greedy = arrays[f"p{i}_greedy"].tolist()
        assert tok.decode(greedy, skip_special=True) == p["greedy_text"]


# -- BOS / EOS / special tokens -----------------------------------------------------------------


def test_bos_handling(smollm2: Tokenizer, gemma3: Tokenizer) -> None:
    assert gemma3.add_bos is True and gemma3.bos_id == 2
    plain = gemma3.encode("Hello world")
    assert gemma3.encode("Hello world", add_bos=True) == [2, *plain]
    assert gemma3.encode("", add_bos=True) == [2]
    assert gemma3.encode("") == []
    assert smollm2.add_bos is False
    assert smollm2.encode("Hello world", add_bos=smollm2.add_bos) == smollm2.encode("Hello world")
    assert smollm2.encode("Hello world") == [19556, 905]


def test_special_ids(smollm2: Tokenizer, gemma3: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152 and gemma3.vocab_size == 262144
    assert smollm2.bos_id == 1 and smollm2.eos_id == 2
    assert smollm2.token_text(2) == "<|im_end|>"
    assert {0, 2} <= smollm2.eot_ids  # <|endoftext|>, <|im_end|>
    assert gemma3.eos_id == 1
    assert {1, 106} <= gemma3.eot_ids  # <eos>, <end_of_turn>
    assert gemma3.token_text(106) == "<end_of_turn>"
    assert all(isinstance(i, int) for i in gemma3.eot_ids)


def test_parse_special(smollm2: Tokenizer, gemma3: Tokenizer) -> None:
    assert smollm2.encode("<|im_start|>user", parse_special=True) == [1, 4093]
    as_text = smollm2.encode("<|im_start|>user")
    assert 1 not in as_text and len(as_text) > 2
    assert smollm2.decode(as_text) == "<|im_start|>user"
    turn = gemma3.encode("<start_of_turn>user\nHi<end_of_turn>", parse_special=True)
    assert turn[:2] == [105, 2364] and turn[-1] == 106
    assert 105 not in gemma3.encode("<start_of_turn>user")
    # user-defined tokens are matched even without parse_special (llama.cpp does so)
    assert gemma3.encode("a\n\nb")[1] == 108


def test_decode_special_tokens(smollm2: Tokenizer, gemma3: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)
    assert smollm2.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert smollm2.decode(ids, skip_special=True) == "user\nHi"
    assert smollm2.token_bytes(2) == b"" and smollm2.token_bytes(2, special=True) == b"<|im_end|>"
    assert gemma3.token_bytes(gemma3.token_to_id("<0x41>")) == b"A"
    assert gemma3.token_bytes(gemma3.token_to_id("▁the")) == b" the"
    assert gemma3.decode([2, *gemma3.encode("Hi")], skip_special=True) == "Hi"
    with pytest.raises(InvalidArgument):
        gemma3.decode([262144])
    with pytest.raises(InvalidArgument):
        gemma3.decode([-1])
    with pytest.raises(InvalidArgument):
        smollm2.token_bytes(-1)
    with pytest.raises(InvalidArgument):
        smollm2.decode(["a"])  # type: ignore[list-item]
    # integer scalars from numpy (and torch) are token ids too
    ids = np.array(smollm2.encode("Hi there"), dtype=np.int64)
    assert smollm2.decode(ids) == "Hi there"
    assert smollm2.token_text(np.int64(2)) == "<|im_end|>"


def test_every_token_by_id_and_by_text_and_all_at_once(model: tuple[str, Tokenizer]) -> None:
    """The texts and ids come from the encoder's own vocabulary and the pieces from one
    buffer: every token is still found both ways, and the table matches it token by token."""
    _, tok = model
    for special in (False, True):
        offsets, blob = tok.pieces_table(special=special)
        assert len(offsets) == tok.vocab_size + 1
        pieces = [blob[offsets[i] : offsets[i + 1]] for i in range(tok.vocab_size)]
        assert pieces == [tok.token_bytes(i, special=special) for i in range(tok.vocab_size)]
    texts = [tok.token_text(i) for i in range(tok.vocab_size)]
    assert [tok.token_to_id(t) for t in texts] == list(range(tok.vocab_size))
    assert tok.longest_text == max(map(len, texts))
    assert tok.token_to_id("no such token \u2603") is None


# -- streaming ---------------------------------------------------------------------------------

STREAM_TEXT = "日本語のテキスト 🙂🚀 👍🏽 naïve Привет — 中文分词测试 ∑∫√ end"


def _stream(tok: Tokenizer, ids: list[int], **kw: Any) -> list[str]:
    dec = StreamDecoder(tok, **kw)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def test_stream_decoder_never_splits_a_character(model: tuple[str, Tokenizer]) -> None:
    name, tok = model
    ids = tok.encode(STREAM_TEXT)
    # the test must exercise characters split over several tokens
    split = [i for i in ids if not _valid_utf8(tok.token_bytes(i))]
    if name == "smollm2":
        assert split, "expected byte-level tokens that are not whole characters"
    pieces = _stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT


def test_stream_decoder_flushes_broken_tail(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("🙂")
    assert len(ids) > 1
    dec = StreamDecoder(smollm2)
    assert "".join(dec.push(i) for i in ids[:-1]) == ""
    assert dec.flush() == "\ufffd"


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- metadata errors and other vocabularies (small synthetic ones) ------------------------------


def _byte_level_fields(pre: str, extra: list[str] = (), merges: list[str] = ()) -> dict[str, Any]:
    tokens = ["<|endoftext|>", *_bytes_to_unicode().values(), *extra]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": list(merges),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }


def test_unknown_pre_tokenizer_is_a_format_error() -> None:
    with pytest.raises(ModelFormatError, match="no-such-pre"):
        Tokenizer.from_gguf_fields(_byte_level_fields("no-such-pre"))


PRE_NAMES = ["default", "gpt-2", "gpt2", "llama3", "llama-bpe", "qwen2", "smollm", "starcoder",
             "falcon", "tekken", "gpt-4o", "dbrx"]  # fmt: skip


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_known_pre_tokenizers_build(pre: str) -> None:
    tok = Tokenizer.from_gguf_fields(_byte_level_fields(pre, ["Ġt", "he"], ["Ġ t", "h e"]))
    text = "Hello, the 12345 world's  tests\n\n!"
    assert tok.decode(tok.encode(text)) == text


def test_bad_metadata_is_a_format_error() -> None:
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf_fields({})
    with pytest.raises(ModelFormatError, match="bert"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelFormatError, match="tokens"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"})
    fields = _byte_level_fields("gpt-2")
    del fields["tokenizer.ggml.merges"]
    with pytest.raises(ModelFormatError, match="merges"):
        Tokenizer.from_gguf_fields(fields)
    fields = _byte_level_fields("gpt-2")
    fields["tokenizer.ggml.tokens"] = fields["tokenizer.ggml.tokens"] + ["a"]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"] + [1]
    with pytest.raises(ModelFormatError, match="duplicate"):
        Tokenizer.from_gguf_fields(fields)
    spm = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a"]}
    with pytest.raises(ModelFormatError, match="scores"):
        Tokenizer.from_gguf_fields(spm)
    with pytest.raises(ModelFormatError):
        Tokenizer.from_gguf_fields({**spm, "tokenizer.ggml.scores": [0.0]})


def test_clean_spaces_and_its_stream() -> None:
    """gpt-2 style vocabularies clean " ," " 's" ... on decode; streaming must agree."""
    tok = Tokenizer.from_gguf_fields(_byte_level_fields("gpt-2"))
    assert tok.clean_spaces
    assert tok.decode(tok.encode("a , b ' c it 's we 're x 't !")) == "a, b'c it's we're x 't!"
    rng = random.Random(7)
    alphabet = [" ", "'", "s", "m", "r", "e", "v", "t", "d", "l", "?", ",", ".", "x", "é", "\n"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        ids = tok.encode(text)
        assert "".join(_stream(tok, ids)) == tok.decode(ids), repr(text)


def _spm_fields(add_space_prefix: bool, words: Sequence[str] = (), scores: Sequence[float] = ()) -> dict[str, Any]:
    words = words or ["▁", "H", "e", "l", "o", "▁H", "ll", "▁He", "llo", "▁Hello", "w", "▁w"]
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *words]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": pieces,
        "tokenizer.ggml.scores": [0.0] * 259 + (list(scores) or [-float(i) for i in range(len(pieces) - 259)]),
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259),
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
    }


def test_sentencepiece_space_prefix_and_byte_fallback() -> None:
    tok = Tokenizer.from_gguf_fields(_spm_fields(True))
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.add_bos  # llama.cpp's SPM defaults
    ids = tok.encode("Hello w")
    assert [tok.token_text(i) for i in ids] == ["▁Hello", "▁w"]
    assert tok.decode(ids) == "Hello w"  # the prefix space goes again
    assert tok.encode("Hello", add_bos=True)[0] == 1
    ids = tok.encode("Hé")  # é is not a piece: its UTF-8 bytes
    assert [tok.token_text(i) for i in ids] == ["▁H", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids) == "Hé"
    assert "".join(_stream(tok, ids)) == "Hé"
    no_prefix = Tokenizer.from_gguf_fields(_spm_fields(False))
    assert [no_prefix.token_text(i) for i in no_prefix.encode("Hello")] == ["H", "e", "llo"]


# -- SentencePiece: Realm's merge loop (spm.py) and the `tokenizers` fallback ------------------


def _spm_pair(fields: dict[str, Any]) -> tuple[Tokenizer, Any]:
    """The tokenizer (Realm's SPM library) and the fallback encoder for the same vocabulary."""
    from realm.models import spm
    from realm.models.encoders import spm_encoder
    from realm.models.vocabulary import read_vocabulary

    assert spm.library() is not None, "make setup builds the SentencePiece library"
    tok = Tokenizer.from_gguf_fields(fields)
    fallback = spm_encoder(read_vocabulary(fields), tok.unk_id, tok.add_space_prefix, native=False)
    return tok, fallback


def test_spm_merges_as_llama_cpp_where_merge_ranks_cannot() -> None:
    """The two cases where `tokenizers`' BPE over derived merges differs from llama.cpp's
    loop, which spm.cpp runs: a character that is no token but makes one with its
    neighbour, and two different pairs of one score at once (the leftmost merges first)."""
    tok, fallback = _spm_pair(_spm_fields(False, ["a", "b", "c", "bc", "ab", "y", "xy"], [-1, -1, -1, -2, -2, -1, -3]))
    texts = lambda ids: [tok.token_text(i) for i in ids]  # noqa: E731
    assert texts(tok.encode("xy")) == ["xy"]  # "x" alone is no token
    assert texts(fallback.encode(["xy"])[0]) == ["<0x78>", "y"]
    assert texts(tok.encode("abc")) == ["ab", "c"]  # "bc" (the lower id) scores the same
    assert texts(fallback.encode(["abc"])[0]) == ["a", "bc"]
    assert texts(tok.encode("xz")) == ["<0x78>", "<0x7A>"]  # no token: the bytes


def test_spm_library_and_fallback_agree_on_gemma3(gemma3_path: Path) -> None:
    """Both encoders against each other on text far from the references: random runs of
    scripts, digits, punctuation and whitespace, and the texts of random token sequences."""
    tok, fallback = _spm_pair(gguf_fields(gemma3_path))
    rng = random.Random(3)
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"\n\t-_()[]{}<>/\\ "
        "éàüßçñ漢字かなカナ한국어 😀🎉\u2581\u00a0"
    )
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(1500)]
    texts += [tok.decode([rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]) for _ in range(1500)]
    for text in texts:
        fragments = [f for f in tok._splitter.split(text, False) if isinstance(f, str)]
        assert tok._encoder.encode(fragments) == fallback.encode(fragments), repr(text)


def test_spm_refuses_lone_surrogates_clearly(gemma3: Tokenizer) -> None:
    with pytest.raises(InvalidArgument, match="cannot tokenize"):
        gemma3.encode("a\ud800b")


def _spm_tokens_in_a_child(library_path: str) -> tuple[str, str]:
    """'Hello wé' tokenized with the synthetic SentencePiece vocabulary in a fresh process
    whose libraries' path is `library_path` (a Python expression): its token texts and
    its stderr."""
    import subprocess
    import sys

    code = (
        f"import pathlib, realm.native_build as b; b.NativeLibrary.path = lambda self: {library_path}\n"
        "from test_tokenizer import Tokenizer, _spm_fields\n"
        "tok = Tokenizer.from_gguf_fields(_spm_fields(True))\n"
        "print([tok.token_text(i) for i in tok.encode('Hello wé')])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
    )
    return done.stdout.strip(), done.stderr


def test_without_the_spm_library_a_warning_and_the_same_tokens() -> None:
    """A library that is not built (no compiler at setup) costs load time, never tokens."""
    tokens, warnings = _spm_tokens_in_a_child("None")
    assert tokens == str(["▁Hello", "▁w", "<0xC3>", "<0xA9>"])
    assert "SentencePiece library is not built" in warnings


def test_a_damaged_spm_library_is_a_warning_and_the_same_tokens(tmp_path: Path) -> None:
    """A truncated library (a build killed half way) is refused before dlopen, never loaded."""
    from realm.models import spm

    built = spm.LIBRARY.path()
    assert built is not None, "make setup builds the SentencePiece library"
    broken = tmp_path / built.name
    broken.write_bytes(built.read_bytes()[:4096])
    (tmp_path / (built.name + ".sha256")).write_text(Path(str(built) + ".sha256").read_text())
    tokens, warnings = _spm_tokens_in_a_child(f"pathlib.Path({str(broken)!r})")
    assert tokens == str(["▁Hello", "▁w", "<0xC3>", "<0xA9>"])
    assert "does not load" in warnings and "recorded SHA-256" in warnings
