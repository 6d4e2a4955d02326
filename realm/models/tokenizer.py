"""Tokenizers built from GGUF metadata that reproduce llama.cpp's tokenization exactly.

`Tokenizer.from_gguf_fields` puts together the parts, each in its own module:

* vocabulary.py: the `tokenizer.ggml.*` fields read and checked, token attributes;
* special_tokens.py: BOS / EOS / end-of-generation ids and the attributes llama.cpp
  adjusts (tokens found by their text become control tokens, ...);
* bpe_pre.py: the BPE pre-tokenizer regexes that `tokenizer.ggml.pre` names;
* encoders.py: the encoder of text fragments, for the two vocabulary kinds llama.cpp
  calls BPE (`gpt2`, with `tokenizers`) and SPM (`llama`, with spm.py);
* special_split.py: the split of the input on special tokens before tokenization
  (user-defined tokens always, control tokens only with `parse_special`);
* detokenize.py: llama.cpp's `token_to_piece` per token and the `clean_spaces` pass.

This module holds the tokenizer they make, and `StreamDecoder` for streaming output.
"""

from __future__ import annotations

import codecs
import dataclasses
import operator
from array import array
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from realm.errors import InvalidArgument
from realm.models.bpe_pre import BpePre, bpe_pre
from realm.models.byte_level import bytes_to_unicode as _bytes_to_unicode  # noqa: F401  (tests import it here)
from realm.models.detokenize import TokenPieces, clean_spaces, inert
from realm.models.encoders import FragmentEncoder, bpe_encoder, spm_encoder
from realm.models.special_split import SpecialSplitter
from realm.models.special_tokens import SpecialDefaults, resolve_special_tokens
from realm.models.vocabulary import ATTR_HIDDEN, ATTR_SPECIAL, Vocabulary, bool_field, read_vocabulary, string_field

__all__ = ["StreamDecoder", "Tokenizer"]


@dataclasses.dataclass(frozen=True)
class _KindSettings:
    """What llama.cpp sets per vocabulary kind (and BPE pre-tokenizer) before the fields."""

    pre_name: str  # "" for SentencePiece
    pre: BpePre | None  # None for SentencePiece
    defaults: SpecialDefaults
    add_space_prefix: bool
    clean_spaces: bool


def _kind_settings(vocab: Vocabulary, fields: Mapping[str, Any]) -> _KindSettings:
    """llama.cpp's defaults for the vocabulary's kind, with `add_space_prefix` as the file says."""
    pre_name = string_field(fields, "pre")
    if vocab.kind == "bpe":
        pre = bpe_pre(pre_name)
        defaults = SpecialDefaults(bos_id=None if pre.bos_none else 11, eos_id=11, unk_id=None, add_bos=pre.add_bos)
        settings = _KindSettings(pre_name, pre, defaults, add_space_prefix=False, clean_spaces=pre.clean_spaces)
    else:
        defaults = SpecialDefaults(bos_id=1, eos_id=2, unk_id=0, add_bos=True)
        settings = _KindSettings("", None, defaults, add_space_prefix=True, clean_spaces=False)
    flag = bool_field(fields, "add_space_prefix")
    if flag is not None:
        settings = dataclasses.replace(settings, add_space_prefix=flag)
    return settings


class Tokenizer:
    """A GGUF vocabulary that tokenizes and detokenizes exactly like llama.cpp.

    Attributes:
        vocab_size: number of tokens.
        bos_id, eos_id, unk_id: the model's BOS / EOS / unknown ids (None when it has none).
        eot_id: the end-of-turn id (None when it has none).
        eot_ids: the ids that end generation (llama.cpp's "EOG" set): EOS, EOT, and the
            tokens llama.cpp recognises by text, e.g. `<|im_end|>`, `<end_of_turn>`.
        add_bos: whether the model wants BOS in front of a prompt
            (`tokenizer.ggml.add_bos_token`, else llama.cpp's default for the vocabulary).
        add_eos: likewise for EOS at the end (rare).
        add_space_prefix: a SentencePiece space is put in front of the text (and the
            leading space is dropped again when decoding).
        clean_spaces: decoded text gets llama.cpp's `clean_spaces` pass.
        longest_text: characters of the longest token text.
        kind: "spm" or "bpe"; pre: the BPE pre-tokenizer name ("" for SPM).
    """

    kind: str
    pre: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eot_id: int | None
    eot_ids: frozenset[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    clean_spaces: bool
    longest_text: int
    _attrs: array[int]  # llama.cpp's token attributes by id
    _splitter: SpecialSplitter
    _encoder: FragmentEncoder  # also the texts by id and the ids by text (its vocabulary is the file's)
    _pieces: TokenPieces

    def __init__(self) -> None:  # use from_gguf_fields
        raise TypeError("build a Tokenizer with Tokenizer.from_gguf_fields(fields)")

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata as plain Python values keyed by GGUF key;
        every defect is a ModelFormatError."""
        vocab = read_vocabulary(fields)
        settings = _kind_settings(vocab, fields)
        special = resolve_special_tokens(fields, vocab, settings.defaults)
        self = object.__new__(cls)
        self.kind, self.pre = vocab.kind, settings.pre_name
        self.vocab_size = vocab.size
        self.longest_text = max(map(len, vocab.texts))
        self._attrs = array("H", vocab.attrs)
        self.bos_id, self.eos_id, self.unk_id = special.bos_id, special.eos_id, special.unk_id
        self.eot_id, self.eot_ids = special.eot_id, special.eog_ids
        self.add_bos, self.add_eos = special.add_bos, special.add_eos
        self.add_space_prefix, self.clean_spaces = settings.add_space_prefix, settings.clean_spaces
        specials = {i: vocab.texts[i] for i, a in enumerate(vocab.attrs) if a & ATTR_SPECIAL}
        self._splitter = SpecialSplitter(specials, self._attrs)
        if settings.pre is not None:
            self._encoder = bpe_encoder(fields, vocab, settings.pre)
        else:
            self._encoder = spm_encoder(vocab, special.unk_id, settings.add_space_prefix)
        self._pieces = TokenPieces(vocab)
        return self

    # -- queries ---------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (e.g. 'Ġthe', '▁the', '<|im_end|>')."""
        return self._encoder.text(self._check_id(token_id))

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is `text`, if any."""
        return self._encoder.id(text)

    def is_control(self, token_id: int) -> bool:
        """Whether llama.cpp treats the token as a control token (hidden unless special)."""
        return bool(self._attrs[self._check_id(token_id)] & ATTR_HIDDEN)

    def control_tokens(self) -> np.ndarray:
        """`is_control` of every token at once, (vocab_size,) bool."""
        return (np.frombuffer(self._attrs, dtype=np.uint16) & ATTR_HIDDEN) != 0

    def is_eog(self, token_id: int) -> bool:
        """Whether the token ends generation (is in `eot_ids`)."""
        return token_id in self.eot_ids

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The raw bytes the token contributes to the output: llama.cpp's `token_to_piece`.

        Normal tokens give their text (SentencePiece `▁` -> space; GPT-2 byte-level text
        mapped back to bytes); `<0xNN>` byte tokens give that byte; user-defined tokens
        give their text; control and unknown tokens give b"" unless `special` is true, in
        which case they give their text (llama.cpp's `special` argument); unused tokens
        give b"".
        """
        return self._pieces.piece(self._check_id(token_id), bool(special))

    def pieces_table(self, *, special: bool = False) -> tuple[np.ndarray, bytes]:
        """Every token's `token_bytes` at once: offsets (vocab_size + 1, uint64) into one
        buffer."""
        return self._pieces.table(special)

    def _check_id(self, token_id: int) -> int:
        try:
            index = operator.index(token_id)  # ints, numpy and torch integer scalars
        except TypeError:
            raise InvalidArgument(f"token id {token_id!r} is not an integer") from None
        if not 0 <= index < self.vocab_size:
            raise InvalidArgument(f"token id {index} is outside the vocabulary (0..{self.vocab_size - 1})")
        return index

    # -- encode ----------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize`.

        add_bos: put the BOS id in front (the caller decides; `self.add_bos` is the model's
            wish). parse_special: control tokens written in the text (e.g. "<|im_start|>")
            become their ids; without it they are tokenized as plain text. User-defined
            tokens are matched either way, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise InvalidArgument(f"text to encode must be a str, got {type(text).__name__}")
        out: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise InvalidArgument("this model has no BOS token")
            out.append(self.bos_id)
        if not text:
            return out
        fragments = self._splitter.split(text, parse_special)
        encoded = iter(self._encoder.encode([f for f in fragments if isinstance(f, str)]))
        for f in fragments:
            if isinstance(f, str):
                out.extend(next(encoded))
            else:
                out.append(f)
        return out

    # -- decode ----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`, as llama.cpp's `llama_detokenize(remove_special=False)`.

        skip_special=False renders control tokens as their text (llama.cpp's
        `unparse_special=True`, what `common_detokenize` does by default);
        skip_special=True drops them (`unparse_special=False`, what llama-cpp-python's
        `detokenize` and llama.cpp's server stream do). User-defined tokens are always
        rendered. Invalid UTF-8 becomes U+FFFD.
        """
        ids = list(ids)
        if not ids:
            return ""
        if not (all(type(i) is int for i in ids) and 0 <= min(ids) and max(ids) < self.vocab_size):
            ids = [self._check_id(i) for i in ids]
        parts = self._pieces.pieces(ids, not skip_special)
        if self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        text = b"".join(parts).decode("utf-8", errors="replace")
        return clean_spaces(text) if self.clean_spaces else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"
        )


class StreamDecoder:
    """Incremental detokenizer for streaming: never emits a broken UTF-8 character.

    Characters split across tokens come out once all their bytes are there.

    The concatenation of every `push` and the final `flush` equals
    `tokenizer.decode(ids, skip_special=skip_special)`. By default control tokens are not
    shown (skip_special=True), as llama.cpp's server streams them; the engine stops on
    `eot_ids` before they would matter anyway.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._special = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._clean = tokenizer.clean_spaces
        self._pending = ""  # clean_spaces only: text not yet emitted
        self._has_ctx = False  # clean_spaces only: _pending[0] was emitted already

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe "")."""
        piece = self._tok.token_bytes(token_id, special=self._special)
        if self._first:
            self._first = False
            if self._tok.add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
        text = self._utf8.decode(piece)
        return self._emit(text) if self._clean else text

    def flush(self) -> str:
        """The rest: bytes of an unfinished character become U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if not self._clean:
            return text
        pending = self._pending + text
        self._pending = ""
        if not pending:
            return ""
        out = clean_spaces(pending)
        if self._has_ctx:
            out = out[1:]
        self._has_ctx = False
        return out

    def _emit(self, text: str) -> str:
        # clean_spaces looks at most a few characters around a space or an apostrophe:
        # emit up to the last two neighbouring characters that are neither, keep the rest.
        p = self._pending + text
        k = len(p) - 1
        while k >= 1 and not (inert(p[k]) and inert(p[k - 1])):
            k -= 1
        if k < 1:
            self._pending = p
            return ""
        out = clean_spaces(p[: k + 1])
        if self._has_ctx:
            out = out[1:]
        self._pending = p[k:]
        self._has_ctx = True
        return out
