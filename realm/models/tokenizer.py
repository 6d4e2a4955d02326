"""Tokenizers built from GGUF metadata that reproduce llama.cpp's tokenization exactly.

`Tokenizer.from_gguf_fields` reads the `tokenizer.ggml.*` fields and builds a
`tokenizers.Tokenizer` (normalizer, pre-tokenizer, BPE model, decoder) that does the
heavy lifting. Around it sits the part of llama.cpp's `llama-vocab.cpp` that the
`tokenizers` library has no notion of, reproduced here:

* token attributes: the GGUF token types, adjusted the way llama.cpp adjusts them
  (end-of-generation and FIM tokens found by their text become control tokens, ...);
* the split of the input on special tokens before tokenization (`tokenizer_st_partition`:
  longest token first; user-defined tokens always, control tokens only with
  `parse_special`);
* detokenization: llama.cpp's `token_to_piece` per token (control tokens render as their
  text, or as nothing when special tokens are skipped; SentencePiece `▁` becomes a space
  and `<0xNN>` that byte; GPT-2 byte-level text is mapped back to bytes), the leading-space
  strip of `add_space_prefix` vocabularies and the `clean_spaces` pass of some BPE
  pre-tokenizers.

Two vocabulary kinds are supported, the ones llama.cpp calls SPM and BPE:

* `tokenizer.ggml.model = "gpt2"`: GPT-2 byte-level BPE with merges. The pre-tokenizer
  regexes come from `tokenizer.ggml.pre` (table `_BPE_PRE` below, copied from
  llama.cpp); an unknown name is a `ModelFormatError`.
* `tokenizer.ggml.model = "llama"`: SentencePiece BPE with scores (Llama 1/2, Gemma, ...).
  llama.cpp merges, inside each text fragment, the adjacent pair whose concatenation is
  the vocabulary token with the highest score. That is BPE whose merge ranks are the
  scores, so the merges are derived from the vocabulary (every split of a token into two
  tokens, ranked by the score of the whole) and handed to `tokenizers`' BPE with byte
  fallback, like transformers' SentencePiece converters do.

Known corner cases where this can differ from llama.cpp (none occurs in practice):
two *different* pairs forming the *same* score at once (llama.cpp takes the leftmost,
here the lower merge rank wins); a SentencePiece character that is not itself a token
but forms one with its neighbour; the order among special tokens of equal length that
overlap in the text (llama.cpp's sort is unstable; here lower id first).
"""

from __future__ import annotations

import codecs
import operator
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from realm.errors import InvalidArgument, ModelFormatError

__all__ = ["StreamDecoder", "Tokenizer"]

# --- token types (GGUF) and attributes (llama.cpp's llama_token_attr) -------------------

_TYPE_UNDEFINED, _TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL = 0, 1, 2, 3
_TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 4, 5, 6

ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_TYPE_TO_ATTR = {
    _TYPE_UNDEFINED: ATTR_UNDEFINED,
    _TYPE_NORMAL: ATTR_NORMAL,
    _TYPE_UNKNOWN: ATTR_UNKNOWN,
    _TYPE_CONTROL: ATTR_CONTROL,
    _TYPE_USER_DEFINED: ATTR_USER_DEFINED,
    _TYPE_UNUSED: ATTR_UNUSED,
    _TYPE_BYTE: ATTR_BYTE,
}

# Token texts llama.cpp treats as end of turn / generation (llama-vocab.cpp, `load`).
_EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
)  # fmt: skip
_EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
    "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
    "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
    "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))  # fmt: skip
_FIM_TEXTS = {  # GGUF key suffix -> texts that identify the token when the key is absent
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                "▁<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                "▁<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                "▁<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
_FIM_DEPRECATED_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# --- BPE pre-tokenizers (llama-vocab.cpp, llm_tokenizer_bpe) ----------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_MINICPM5 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_GPT2 = (_RE_GPT2,)
_STARCODER = (r"\p{N}", _RE_GPT2)
_LLAMA3 = (_RE_LLAMA3,)
_QWEN2 = (_RE_QWEN2,)
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]")


class _Pre:
    """How one BPE pre-tokenizer name behaves in llama.cpp."""

    def __init__(
        self,
        regexes: tuple[str, ...],
        *,
        clean_spaces: bool = True,
        ignore_merges: bool = False,
        add_bos: bool = False,
        bos_none: bool = False,
    ) -> None:
        self.regexes = regexes
        self.clean_spaces = clean_spaces
        self.ignore_merges = ignore_merges
        self.add_bos = add_bos
        self.bos_none = bos_none


def _pre_table() -> dict[str, _Pre]:
    table: dict[str, _Pre] = {"": _Pre(_DEFAULT), "default": _Pre(_DEFAULT)}
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                 "midm-2.0", "lfm2", "jina-v5-nano"):  # fmt: skip
        table[name] = _Pre(_LLAMA3, ignore_merges=True, add_bos=True)
    for name in ("dbrx", "smaug-bpe"):
        table[name] = _Pre(_LLAMA3)
    for name in ("glm4", "chatglm-bpe"):
        table[name] = _Pre(_LLAMA3, bos_none=True)
    for name in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                 "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "exaone4", "mpt", "olmo",
                 "jais"):  # fmt: skip
        table[name] = _Pre(_GPT2)
    for name in ("trillion", "granite-docling"):
        table[name] = _Pre(_GPT2, clean_spaces=False)
    for name in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"):
        table[name] = _Pre(_STARCODER)
    for name in ("smollm", "command-r"):
        table[name] = _Pre(_STARCODER, clean_spaces=False)
    for name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"):
        table[name] = _Pre(_QWEN2, clean_spaces=False)
    for name in ("stablelm2", "megrez"):
        table[name] = _Pre(_QWEN2)
    table["falcon"] = _Pre(_FALCON)
    table["tekken"] = _Pre((_RE_TEKKEN,), clean_spaces=False, ignore_merges=True, add_bos=True)
    for name in ("gpt-4o", "llama4", "kanana2", "talkie"):
        table[name] = _Pre((_RE_GPT4O,), clean_spaces=False)
    table["minicpm5"] = _Pre((r"\p{N}{1,3}", _RE_MINICPM5), ignore_merges=True)
    return table


_BPE_PRE = _pre_table()
SUPPORTED_BPE_PRE = frozenset(name for name in _BPE_PRE if name)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: bytes([b]) for b, c in _BYTE_TO_CHAR.items()}
_HEX_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_C_SPACE = " \t\n\v\f\r"  # C isspace(), what llama.cpp strips around lstrip/rstrip tokens
_SPM_SPACE = "\u2581"


# --- field access -------------------------------------------------------------------------


def _get(fields: Mapping[str, Any], key: str) -> Any:
    return fields.get(f"tokenizer.ggml.{key}")


def _list_field(fields: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> list | None:
    value = _get(fields, key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be an array, got {type(value).__name__}")
    for item_type in set(map(type, value)):  # one check per distinct type: 262144 items are many
        if not issubclass(item_type, kind) or issubclass(item_type, bool):
            raise ModelFormatError(f"tokenizer.ggml.{key} holds a {item_type.__name__}, which does not belong there")
    return list(value)


def _id_field(fields: Mapping[str, Any], key: str) -> int | None:
    value = _get(fields, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be an integer, got {value!r}")
    return value


def _bool_field(fields: Mapping[str, Any], key: str) -> bool | None:
    value = _get(fields, key)
    if value is None:
        return None
    if not isinstance(value, (bool, int)):
        raise ModelFormatError(f"tokenizer.ggml.{key} must be a boolean, got {value!r}")
    return bool(value)


# --- clean_up_tokenization_spaces (llama_vocab::impl::detokenize) --------------------------


def _clean_spaces(text: str) -> str:
    """llama.cpp's three `clean_spaces` passes, character for character."""
    if len(text) < 2 or (" " not in text):
        return text
    # pass 1: " ?" " !" " ." " ," lose the space
    out = [text[0]]
    for i in range(1, len(text)):
        x = text[i]
        if text[i - 1] == " " and x in "?!.,":
            out.pop()
        out.append(x)
    # pass 2: " ' " -> "'"
    t = out
    out = [t[0]]
    i = 1
    n = len(t)
    while i < n:
        x = t[i]
        if x == "'" and i + 1 < n and t[i - 1] == " " and t[i + 1] == " ":
            out.pop()
            i += 1
            t[i] = "\0"  # the next space is dropped (and no longer reads as a space)
        out.append(x)
        i += 1
    # pass 3: " 's" " 'm" " 're" " 've" lose the space
    t = out
    out = [t[0]]
    n = len(t)
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == " " and x == "'" and i + 1 < n:
            x1 = t[i + 1]
            if x1 in "sm":
                out.pop()
            elif x1 not in "td" and i + 2 < n:
                x2 = t[i + 2]
                if (x1 == "r" and x2 == "e") or (x1 == "v" and x2 == "e"):
                    out.pop()
        out.append(x)
    return "".join(out)


def _inert(c: str) -> bool:
    """A character that no clean_spaces rule can remove or depend on across it."""
    return c != " " and c != "'"


# --- the tokenizer --------------------------------------------------------------------------


class Tokenizer:
    """A GGUF vocabulary that tokenizes and detokenizes exactly like llama.cpp.

    Attributes:
        vocab_size: number of tokens.
        bos_id, eos_id: the model's BOS / EOS ids (None when it has none).
        eot_ids: the ids that end generation (llama.cpp's "EOG" set): EOS, EOT, and the
            tokens llama.cpp recognises by text, e.g. `<|im_end|>`, `<end_of_turn>`.
        add_bos: whether the model wants BOS in front of a prompt
            (`tokenizer.ggml.add_bos_token`, else llama.cpp's default for the vocabulary).
        add_eos: likewise for EOS at the end (rare).
        kind: "spm" or "bpe"; pre: the BPE pre-tokenizer name ("" for SPM).
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    eot_ids: frozenset[int]
    add_bos: bool

    def __init__(self) -> None:  # use from_gguf_fields
        raise TypeError("build a Tokenizer with Tokenizer.from_gguf_fields(fields)")

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer from GGUF metadata as plain Python values keyed by GGUF key."""
        self = object.__new__(cls)
        self._load(fields)
        return self

    def _load(self, fields: Mapping[str, Any]) -> None:
        model = _get(fields, "model")
        if not isinstance(model, str) or not model:
            raise ModelFormatError("the model has no tokenizer (tokenizer.ggml.model is missing)")
        if model == "llama":
            kind = "spm"
        elif model == "gpt2":
            kind = "bpe"
        else:
            raise ModelFormatError(
                f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                "Realm supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)"
            )
        self.kind = kind

        tokens = _list_field(fields, "tokens", str)
        if not tokens:
            raise ModelFormatError("tokenizer.ggml.tokens is missing or empty")
        n = len(tokens)
        scores = _list_field(fields, "scores", (int, float))
        if scores is not None and len(scores) < n:
            raise ModelFormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
        types = _list_field(fields, "token_type", int)
        if types is not None and len(types) < n:
            raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

        texts = tokens
        if "" in texts:  # llama.cpp renames empty tokens
            texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        vocab = dict(zip(texts, range(n), strict=True))
        if len(vocab) != n:
            seen: dict[str, int] = {}
            for i, t in enumerate(texts):
                if t in seen:
                    raise ModelFormatError(f"duplicate token in vocabulary: {t!r} has ids {seen[t]} and {i}")
                seen[t] = i
        if types is None:
            attrs = [ATTR_NORMAL] * n
        else:
            attrs = [_TYPE_TO_ATTR.get(t, ATTR_UNDEFINED) for t in types[:n]]
        self.vocab_size = n
        self._texts = texts
        self._vocab = vocab
        self._attrs = attrs

        # flags and defaults, as llama.cpp sets them per vocabulary kind
        pre_name = _get(fields, "pre") or ""
        if not isinstance(pre_name, str):
            raise ModelFormatError(f"tokenizer.ggml.pre must be a string, got {pre_name!r}")
        pre: _Pre | None = None
        if kind == "bpe":
            pre = _BPE_PRE.get(pre_name)
            if pre is None:
                raise ModelFormatError(
                    f"unknown pre-tokenizer type {pre_name!r} (tokenizer.ggml.pre); "
                    f"supported: {', '.join(sorted(SUPPORTED_BPE_PRE))}"
                )
            bos, eos, unk = (None if pre.bos_none else 11), 11, None
            add_space_prefix, add_bos, clean_spaces = False, pre.add_bos, pre.clean_spaces
            self.pre = pre_name
        else:
            bos, eos, unk = 1, 2, 0
            add_space_prefix, add_bos, clean_spaces = True, True, False
            self.pre = ""
        add_eos = False
        flag = _bool_field(fields, "add_space_prefix")
        if flag is not None:
            add_space_prefix = flag

        def special(key: str, default: int | None) -> int | None:
            if default is not None and not 0 <= default < n:
                default = None
            value = _id_field(fields, key)
            if value is None or not 0 <= value < n:
                return default
            return value

        self.bos_id = special("bos_token_id", bos)
        self.eos_id = special("eos_token_id", eos)
        self.unk_id = special("unknown_token_id", unk)
        eot_id = special("eot_token_id", None)
        eom_id = special("eom_token_id", None)
        fim: dict[str, int | None] = {}
        for name in _FIM_TEXTS:
            fim[name] = special(f"{name}_token_id", None)
            if fim[name] is None and name in _FIM_DEPRECATED_KEYS:
                fim[name] = special(f"{_FIM_DEPRECATED_KEYS[name]}_token_id", None)
        for key, setter in (("add_bos_token", "bos"), ("add_eos_token", "eos")):
            flag = _bool_field(fields, key)
            if flag is not None:
                if setter == "bos":
                    add_bos = flag
                else:
                    add_eos = flag
        if add_bos and self.bos_id is None:
            raise ModelFormatError("tokenizer.ggml.add_bos_token is true, but there is no BOS id")
        if add_eos and self.eos_id is None:
            raise ModelFormatError("tokenizer.ggml.add_eos_token is true, but there is no EOS id")
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.clean_spaces = clean_spaces

        # tokens found by their text: EOT and FIM ids, end-of-generation set, attributes
        if eot_id is None:
            found = [vocab[t] for t in _EOT_TEXTS if t in vocab]
            if found:
                eot_id = min(found)
                attrs[eot_id] |= ATTR_CONTROL
        for name, candidates in _FIM_TEXTS.items():
            if fim[name] is None:
                found = [vocab[t] for t in candidates if t in vocab]
                if found:
                    fim[name] = min(found)
                    attrs[fim[name]] |= ATTR_CONTROL
        for i, a in enumerate(attrs):
            if a & ATTR_CONTROL and "unused" in texts[i]:
                attrs[i] |= ATTR_UNUSED
        eog: set[int] = {fim[k] for k in ("fim_pad", "fim_rep", "fim_sep") if fim[k] is not None}
        for t in _EOG_TEXTS:
            i = vocab.get(t)
            if i is not None:
                eog.add(i)
                attrs[i] |= ATTR_CONTROL
        for t in _ALWAYS_RENDERED:
            if t in vocab:
                attrs[vocab[t]] = ATTR_USER_DEFINED
        eog.update(i for i in (self.eos_id, eot_id, eom_id) if i is not None)
        eog_texts = {texts[i] for i in eog}
        if "<|end|>" in eog_texts and (
            {"<|return|>", "<|call|>"} <= eog_texts or {"<|calls|>", "<|flush|>"} <= eog_texts
        ):
            end = vocab["<|end|>"]
            eog.discard(end)
            attrs[end] = ATTR_USER_DEFINED
        if "<|tool_response>" in eog_texts and "</s>" in eog_texts:
            s = vocab["</s>"]
            eog.discard(s)
            attrs[s] = ATTR_NORMAL
        self.eot_id = eot_id
        self.eot_ids = frozenset(eog)

        specials = [i for i, a in enumerate(attrs) if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN)]
        name = str(fields.get("general.name") or "").lower()
        if "phi-3" in name or "phi3" in name:  # llama.cpp's per-model attribute fix-ups
            for i in specials:
                attrs[i] |= ATTR_RSTRIP
            if "</s>" in vocab:
                attrs[vocab["</s>"]] |= ATTR_RSTRIP
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                if t in vocab:
                    attrs[vocab[t]] &= ~ATTR_RSTRIP
        specials.sort(key=lambda i: (-len(texts[i].encode("utf-8")), i))
        self._special_rank = {tid: r for r, tid in enumerate(specials)}
        self._split_all = _SpecialMatcher(texts, specials)
        self._split_text = _SpecialMatcher(texts, [i for i in specials if not attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)])

        self._hf = self._build_hf(fields, pre, scores)
        self._build_pieces()

    def _build_hf(self, fields: Mapping[str, Any], pre: _Pre | None, scores: list | None) -> HFTokenizer:
        texts, vocab = self._texts, self._vocab
        if pre is not None:  # GPT-2 byte-level BPE
            raw = _list_field(fields, "merges", str)
            if raw is None:
                raise ModelFormatError("a 'gpt2' tokenizer needs tokenizer.ggml.merges")
            merges: list[tuple[str, str]] = []
            seen: set[tuple[str, str]] = set()
            for m in raw:
                pos = m.find(" ", 1)
                if pos < 0:
                    continue
                pair = (m[:pos], m[pos + 1 :])
                # llama.cpp keeps the first rank of a duplicate; a merge whose parts or result
                # are not tokens can never produce a token there either
                if pair in seen or pair[0] not in vocab or pair[1] not in vocab:
                    continue
                if pair[0] + pair[1] not in vocab:
                    continue
                seen.add(pair)
                merges.append(pair)
            # bytes without a token (e.g. 0xC0, never in UTF-8) are dropped, as in llama.cpp
            try:
                splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
                hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges))
                hf.pre_tokenizer = pre_tokenizers.Sequence(
                    [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
                )
            except Exception as exc:
                raise ModelFormatError(f"cannot build the BPE tokenizer: {exc}") from exc
            hf.decoder = decoders.ByteLevel()
            return hf

        # SentencePiece: BPE whose merge ranks follow the token scores
        if scores is None:
            raise ModelFormatError("a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores")
        merges = _spm_merges(texts, scores)
        unk = texts[self.unk_id] if self.unk_id is not None else None
        try:
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True))
        except Exception as exc:
            raise ModelFormatError(f"cannot build the SentencePiece tokenizer: {exc}") from exc
        steps = [normalizers.Replace(" ", _SPM_SPACE)]
        if self.add_space_prefix:
            steps.insert(0, normalizers.Prepend(_SPM_SPACE))
        hf.normalizer = normalizers.Sequence(steps)
        hf.decoder = decoders.Sequence([decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
        return hf

    def _build_pieces(self) -> None:
        """llama.cpp's token_to_piece for every token, with special=True and special=False."""
        texts, attrs = self._texts, self._attrs
        spm = self.kind == "spm"
        joined = "\0".join(texts)
        if joined.count("\0") == len(texts) - 1:  # no token holds a NUL itself
            raw = joined.encode("utf-8", "surrogatepass").split(b"\0")
            if spm:
                unescaped = joined.replace(_SPM_SPACE, " ")
                normal = unescaped.encode("utf-8", "surrogatepass").split(b"\0")
        else:
            raw = [t.encode("utf-8", "surrogatepass") for t in texts]
            if spm:
                normal = [t.replace(_SPM_SPACE, " ").encode("utf-8", "surrogatepass") for t in texts]
        rendered: list[bytes] = []
        add = rendered.append
        special_attrs = ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED
        for i, a in enumerate(attrs):
            if a & special_attrs:
                add(raw[i])
            elif a & ATTR_NORMAL:
                add(normal[i] if spm else _byte_decode(texts[i]))
            elif a & ATTR_BYTE:  # <0xNN>
                m = _HEX_BYTE.fullmatch(texts[i])
                add(bytes([int(m.group(1), 16)]) if m else b"")
            else:  # unused / undefined tokens are suppressed like control tokens
                add(b"")
        plain = list(rendered)
        for i, a in enumerate(attrs):
            if a & (ATTR_UNKNOWN | ATTR_CONTROL):
                plain[i] = b""
        self._pieces = {True: rendered, False: plain}

    # -- queries ---------------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (no special-token handling of its own)."""
        return self._hf

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (e.g. 'Ġthe', '▁the', '<|im_end|>')."""
        return self._texts[self._check_id(token_id)]

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is `text`, if any."""
        return self._vocab.get(text)

    def is_control(self, token_id: int) -> bool:
        """Whether llama.cpp treats the token as a control token (hidden unless special)."""
        return bool(self._attrs[self._check_id(token_id)] & (ATTR_CONTROL | ATTR_UNKNOWN))

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
        return self._pieces[bool(special)][self._check_id(token_id)]

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
        fragments = self._partition(text, parse_special)
        encode = self._hf.encode  # one fragment at a time: the batch API spawns threads
        try:
            for f in fragments:
                if isinstance(f, str):
                    out.extend(encode(f, add_special_tokens=False).ids)
                else:
                    out.append(f)
        except Exception as exc:  # e.g. lone surrogates
            raise InvalidArgument(f"cannot tokenize the text: {exc}") from exc
        return out

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """llama.cpp's tokenizer_st_partition: cut special tokens out, longest first."""
        matcher = self._split_all if parse_special else self._split_text
        found = matcher.find(text)
        if not found:
            return [text]
        rank = self._special_rank
        fragments: list[str | int] = [text]
        for tid in sorted(found, key=rank.__getitem__):
            s = self._texts[tid]
            attr = self._attrs[tid]
            lstrip, rstrip = attr & ATTR_LSTRIP, attr & ATTR_RSTRIP
            new: list[str | int] = []
            for f in fragments:
                if not isinstance(f, str) or s not in f:
                    new.append(f)
                    continue
                parts = f.split(s)
                last = len(parts) - 1
                for k, p in enumerate(parts):
                    if k:
                        new.append(tid)
                        if rstrip:
                            p = p.lstrip(_C_SPACE)
                    if lstrip and k < last:
                        p = p.rstrip(_C_SPACE)
                    if p:
                        new.append(p)
            fragments = new
        return fragments

    # -- decode ----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`, as llama.cpp's `llama_detokenize(remove_special=False)`.

        skip_special=False renders control tokens as their text (llama.cpp's
        `unparse_special=True`, what `common_detokenize` does by default);
        skip_special=True drops them (`unparse_special=False`, what llama-cpp-python's
        `detokenize` and llama.cpp's server stream do). User-defined tokens are always
        rendered. Invalid UTF-8 becomes U+FFFD.
        """
        pieces = self._pieces[not skip_special]
        ids = list(ids)
        try:
            parts = [pieces[i] for i in ids]
            valid = not parts or min(ids) >= 0
        except (TypeError, IndexError):
            valid = False
        if not valid:
            for i in ids:
                self._check_id(i)
        if not parts:
            return ""
        if self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        text = b"".join(parts).decode("utf-8", errors="replace")
        return _clean_spaces(text) if self.clean_spaces else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"
        )


def _spm_merges(texts: list[str], scores: list) -> list[tuple[str, str]]:
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


def _byte_decode(text: str) -> bytes:
    """llama_decode_text: GPT-2 byte-level characters back to bytes."""
    try:
        return b"".join(_CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        pass
    out = bytearray()
    for c in text:
        b = _CHAR_TO_BYTE.get(c)
        if b is not None:
            out += b
        else:  # llama.cpp writes this marker (with the whole token text) for such a char
            out += b"[UNK_BYTE_0x" + c.encode("utf-8").hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


class _SpecialMatcher:
    """Finds which of a set of special tokens occur in a text (a character trie)."""

    _END = ""

    def __init__(self, texts: list[str], ids: list[int]) -> None:
        root: dict = {}
        for tid in ids:
            node = root
            for c in texts[tid]:
                node = node.setdefault(c, {})
            node[self._END] = tid
        self._root = root
        firsts = "".join(sorted(root))
        self._starts = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]") if root else None

    def find(self, text: str) -> set[int]:
        if self._starts is None:
            return set()
        found: set[int] = set()
        root, end = self._root, self._END
        n = len(text)
        for m in self._starts.finditer(text):
            node = root
            j = m.start()
            while j < n:
                node = node.get(text[j])
                if node is None:
                    break
                j += 1
                tid = node.get(end)
                if tid is not None:
                    found.add(tid)
        return found


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
        self._pieces = tokenizer._pieces[not skip_special]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._clean = tokenizer.clean_spaces
        self._pending = ""  # clean_spaces only: text not yet emitted
        self._has_ctx = False  # clean_spaces only: _pending[0] was emitted already

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe "")."""
        piece = self._pieces[self._tok._check_id(token_id)]
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
        out = _clean_spaces(pending)
        if self._has_ctx:
            out = out[1:]
        self._has_ctx = False
        return out

    def _emit(self, text: str) -> str:
        # clean_spaces looks at most a few characters around a space or an apostrophe:
        # emit up to the last two neighbouring characters that are neither, keep the rest.
        p = self._pending + text
        k = len(p) - 1
        while k >= 1 and not (_inert(p[k]) and _inert(p[k - 1])):
            k -= 1
        if k < 1:
            self._pending = p
            return ""
        out = _clean_spaces(p[: k + 1])
        if self._has_ctx:
            out = out[1:]
        self._pending = p[k:]
        self._has_ctx = True
        return out
