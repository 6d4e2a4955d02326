"""The encoder of text fragments (the text between special tokens), one per vocabulary kind.

* `gpt2` (BPE): `tokenizers`' GPT-2 byte-level BPE with the file's merges, behind the
  pre-tokenizer regexes that `tokenizer.ggml.pre` names (bpe_pre.py).
* `llama` (SPM): SentencePiece BPE with scores. llama.cpp merges, inside each text
  fragment, the adjacent pair whose concatenation is the vocabulary token with the
  highest score (the leftmost on a tie): spm.py runs that loop in Realm's own library.
  Where the library is not built, it is `tokenizers`' BPE whose merge ranks are the
  scores: every split of a token into two tokens, ranked by the score of the whole, as
  transformers' SentencePiece converters do. That can differ from llama.cpp in two corner
  cases (neither occurs on the reference models): two *different* pairs forming the *same*
  score at once (llama.cpp takes the leftmost, there the lower merge rank wins); a
  SentencePiece character that is not itself a token but forms one with its neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from tokenizers import Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from realm.errors import InvalidArgument, ModelFormatError
from realm.models import spm
from realm.models.bpe_pre import BpePre
from realm.models.spm import SPM_SPACE
from realm.models.vocabulary import Vocabulary, list_field


class FragmentEncoder(Protocol):
    """What a Tokenizer asks of its encoder: the tokens of each text fragment, and the
    vocabulary's texts by id and ids by text."""

    def encode(self, fragments: Sequence[str]) -> list[list[int]]: ...
    def text(self, token_id: int) -> str: ...
    def id(self, text: str) -> int | None: ...


class HFEncoder:
    """A `tokenizers.Tokenizer` as a FragmentEncoder."""

    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf

    def encode(self, fragments: Sequence[str]) -> list[list[int]]:
        encode = self._hf.encode  # one fragment at a time: the batch API spawns threads
        try:
            return [encode(f, add_special_tokens=False).ids for f in fragments]
        except Exception as exc:  # e.g. lone surrogates
            raise InvalidArgument(f"cannot tokenize the text: {exc}") from exc

    def text(self, token_id: int) -> str:
        return self._hf.id_to_token(token_id)  # type: ignore[return-value]

    def id(self, text: str) -> int | None:
        return self._hf.token_to_id(text)


def bpe_encoder(fields: Mapping[str, Any], vocab: Vocabulary, pre: BpePre) -> FragmentEncoder:
    """GPT-2 byte-level BPE over the merges in `tokenizer.ggml.merges`."""
    raw = list_field(fields, "merges", str)
    if raw is None:
        raise ModelFormatError("a 'gpt2' tokenizer needs tokenizer.ggml.merges")
    merges = _gguf_merges(raw, vocab.ids)
    # bytes without a token (e.g. 0xC0, never in UTF-8) are dropped, as in llama.cpp
    try:
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        hf = HFTokenizer(models.BPE(vocab=vocab.ids, merges=merges, ignore_merges=pre.ignore_merges))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    except Exception as exc:
        raise ModelFormatError(f"cannot build the BPE tokenizer: {exc}") from exc
    return HFEncoder(hf)


def spm_encoder(vocab: Vocabulary, unk_id: int | None, add_space_prefix: bool, native: bool = True) -> FragmentEncoder:
    """SentencePiece BPE with byte fallback: Realm's library, or (without it, or with
    `native` false) `tokenizers`' BPE whose merge ranks follow the token scores."""
    if vocab.scores is None:
        raise ModelFormatError("a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores")
    lib = spm.library() if native else None
    if lib is not None:
        return spm.SpmEncoder(lib, vocab.texts, vocab.scores, unk_id, add_space_prefix)
    merges = _spm_merges(vocab.texts, vocab.scores)
    unk = vocab.texts[unk_id] if unk_id is not None else None
    try:
        hf = HFTokenizer(models.BPE(vocab=vocab.ids, merges=merges, unk_token=unk, byte_fallback=True))
    except Exception as exc:
        raise ModelFormatError(f"cannot build the SentencePiece tokenizer: {exc}") from exc
    steps: list[normalizers.Normalizer] = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    hf.normalizer = normalizers.Sequence(steps)
    return HFEncoder(hf)


def _gguf_merges(raw: list[str], ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """The file's "a b" merges as pairs, keeping only those that can make a token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for m in raw:
        pos = m.find(" ", 1)
        if pos < 0:
            continue
        pair = (m[:pos], m[pos + 1 :])
        # llama.cpp keeps the first rank of a duplicate; a merge whose parts or result
        # are not tokens can never produce a token there either
        if pair in seen or pair[0] not in ids or pair[1] not in ids:
            continue
        if pair[0] + pair[1] not in ids:
            continue
        seen.add(pair)
        merges.append(pair)
    return merges


def _spm_merges(texts: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, ranked by the whole token's score (high first).

    llama.cpp's SPM tokenizer merges the adjacent pair whose concatenation is the token
    with the highest score (the leftmost on a tie); these merges make `tokenizers`' BPE do
    the same. Splits of one token are ranked left to right, equal scores by token id.
    """
    vocab = set(texts)
    merges: list[tuple[str, str]] = []
    add = merges.append
    # highest score first; sorted() is stable, so equal scores stay in id order
    for tid in sorted(range(len(texts)), key=scores.__getitem__, reverse=True):
        t = texts[tid]
        for k in range(1, len(t)):
            a = t[:k]
            if a in vocab:
                b = t[k:]
                if b in vocab:
                    add((a, b))
    return merges
