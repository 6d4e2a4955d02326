"""Special token ids and attributes, set the way llama.cpp's `llama_vocab::impl::load` sets them.

The GGUF names some ids (`tokenizer.ggml.bos_token_id`, ...); the rest llama.cpp finds by
their text: end-of-turn and fill-in-the-middle tokens, and the end-of-generation set
(`<|im_end|>`, `<end_of_turn>`, ...). Tokens found this way become control tokens, and a
few families get the fix-ups llama.cpp gives them (gpt-oss, gemma4, phi-3). This module
writes those attributes into the vocabulary and returns the ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from realm.errors import ModelFormatError
from realm.models.vocabulary import (
    ATTR_CONTROL,
    ATTR_NORMAL,
    ATTR_RSTRIP,
    ATTR_SPECIAL,
    ATTR_UNUSED,
    ATTR_USER_DEFINED,
    Vocabulary,
    bool_field,
    id_field,
)

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
_FIM_END_OF_GENERATION = ("fim_pad", "fim_rep", "fim_sep")
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss


@dataclass(frozen=True)
class SpecialDefaults:
    """llama.cpp's defaults for one vocabulary kind, used where the GGUF says nothing."""

    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool


@dataclass(frozen=True)
class SpecialTokens:
    """The ids a tokenizer treats specially, and whether a prompt gets BOS / EOS."""

    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eot_id: int | None
    eog_ids: frozenset[int]  # every id that ends generation
    add_bos: bool
    add_eos: bool


def resolve_special_tokens(fields: Mapping[str, Any], vocab: Vocabulary, defaults: SpecialDefaults) -> SpecialTokens:
    """The special ids from the fields, else found by text, else the defaults; marks the
    tokens found by text (and the families llama.cpp fixes up) in `vocab.attrs`."""
    n = vocab.size
    bos_id = _special_id(fields, "bos_token_id", n, defaults.bos_id)
    eos_id = _special_id(fields, "eos_token_id", n, defaults.eos_id)
    unk_id = _special_id(fields, "unknown_token_id", n, defaults.unk_id)
    eot_id = _special_id(fields, "eot_token_id", n, None)
    eom_id = _special_id(fields, "eom_token_id", n, None)
    fim = {name: _fim_key_id(fields, name, n) for name in _FIM_TEXTS}
    add_bos, add_eos = _add_flags(fields, defaults.add_bos, bos_id, eos_id)
    if eot_id is None:
        eot_id = _find_control(vocab, _EOT_TEXTS)
    for name, tid in fim.items():
        if tid is None:
            fim[name] = _find_control(vocab, _FIM_TEXTS[name])
    _mark_unused(vocab)
    eog = {i for name in _FIM_END_OF_GENERATION if (i := fim[name]) is not None}
    eog |= _end_of_generation_by_text(vocab)
    eog.update(i for i in (eos_id, eot_id, eom_id) if i is not None)
    _fix_up_families(fields, vocab, eog)
    return SpecialTokens(
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=unk_id,
        eot_id=eot_id,
        eog_ids=frozenset(eog),
        add_bos=add_bos,
        add_eos=add_eos,
    )


def _special_id(fields: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    """The id in `tokenizer.ggml.<key>` if it is in the vocabulary, else `default` if that is."""
    if default is not None and not 0 <= default < n:
        default = None
    value = id_field(fields, key)
    if value is None or not 0 <= value < n:
        return default
    return value


def _add_flags(fields: Mapping[str, Any], add_bos: bool, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """(add BOS, add EOS): the fields' word, else the kind's default (BOS) or False (EOS)."""
    flag = bool_field(fields, "add_bos_token")
    if flag is not None:
        add_bos = flag
    add_eos = bool_field(fields, "add_eos_token") or False
    if add_bos and bos_id is None:
        raise ModelFormatError("tokenizer.ggml.add_bos_token is true, but there is no BOS id")
    if add_eos and eos_id is None:
        raise ModelFormatError("tokenizer.ggml.add_eos_token is true, but there is no EOS id")
    return add_bos, add_eos


def _find_control(vocab: Vocabulary, candidates: tuple[str, ...]) -> int | None:
    """The lowest id among the texts that are tokens, made a control token; None if none is."""
    found = [vocab.ids[t] for t in candidates if t in vocab.ids]
    if not found:
        return None
    tid = min(found)
    vocab.attrs[tid] |= ATTR_CONTROL
    return tid


def _fim_key_id(fields: Mapping[str, Any], name: str, n: int) -> int | None:
    """A fill-in-the-middle token's id by its key, else by its deprecated key."""
    tid = _special_id(fields, f"{name}_token_id", n, None)
    if tid is None and name in _FIM_DEPRECATED_KEYS:
        tid = _special_id(fields, f"{_FIM_DEPRECATED_KEYS[name]}_token_id", n, None)
    return tid


def _mark_unused(vocab: Vocabulary) -> None:
    """Control tokens named "unused" are unused (Gemma's reserved slots)."""
    texts, attrs = vocab.texts, vocab.attrs
    for i, a in enumerate(attrs):
        if a & ATTR_CONTROL and "unused" in texts[i]:
            attrs[i] |= ATTR_UNUSED


def _end_of_generation_by_text(vocab: Vocabulary) -> set[int]:
    """The tokens that end generation by their text, made control tokens; gpt-oss's channel
    tokens are always rendered."""
    eog: set[int] = set()
    for t in _EOG_TEXTS:
        i = vocab.ids.get(t)
        if i is not None:
            eog.add(i)
            vocab.attrs[i] |= ATTR_CONTROL
    for t in _ALWAYS_RENDERED:
        if t in vocab.ids:
            vocab.attrs[vocab.ids[t]] = ATTR_USER_DEFINED
    return eog


def _fix_up_families(fields: Mapping[str, Any], vocab: Vocabulary, eog: set[int]) -> None:
    """llama.cpp's per-family corrections of the end-of-generation set and of attributes."""
    texts, ids, attrs = vocab.texts, vocab.ids, vocab.attrs
    eog_texts = {texts[i] for i in eog}
    if "<|end|>" in eog_texts and (
        {"<|return|>", "<|call|>"} <= eog_texts or {"<|calls|>", "<|flush|>"} <= eog_texts
    ):  # gpt-oss: <|end|> ends a message, not the generation
        end = ids["<|end|>"]
        eog.discard(end)
        attrs[end] = ATTR_USER_DEFINED
    if "<|tool_response>" in eog_texts and "</s>" in eog_texts:  # gemma4
        s = ids["</s>"]
        eog.discard(s)
        attrs[s] = ATTR_NORMAL
    name = str(fields.get("general.name") or "").lower()
    if "phi-3" in name or "phi3" in name:
        for i, a in enumerate(attrs):
            if a & ATTR_SPECIAL:
                attrs[i] |= ATTR_RSTRIP
        if "</s>" in ids:
            attrs[ids["</s>"]] |= ATTR_RSTRIP
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in ids:
                attrs[ids[t]] &= ~ATTR_RSTRIP
