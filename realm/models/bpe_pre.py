"""BPE pre-tokenizers by name (`tokenizer.ggml.pre`), as llama.cpp's `llm_tokenizer_bpe` has them.

A GPT-2 byte-level vocabulary names the regexes that cut text into words before BPE runs
on each word; the name also sets a few of llama.cpp's per-vocabulary defaults (whether to
add BOS, whether detokenized text gets its `clean_spaces` pass, ...). The table is copied
from llama.cpp; an unknown name is a ModelFormatError.
"""

from __future__ import annotations

from dataclasses import dataclass

from realm.errors import ModelFormatError

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


@dataclass(frozen=True)
class BpePre:
    """How one BPE pre-tokenizer name behaves in llama.cpp."""

    regexes: tuple[str, ...]  # applied in turn, each match isolated as a word
    clean_spaces: bool = True  # detokenized text gets llama.cpp's clean_spaces pass
    ignore_merges: bool = False  # a word that is a token is that token, whatever the merges say
    add_bos: bool = False  # the default of tokenizer.ggml.add_bos_token
    bos_none: bool = False  # no default BOS id


def _pre_table() -> dict[str, BpePre]:
    table: dict[str, BpePre] = {"": BpePre(_DEFAULT), "default": BpePre(_DEFAULT)}
    for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                 "midm-2.0", "lfm2", "jina-v5-nano"):  # fmt: skip
        table[name] = BpePre(_LLAMA3, ignore_merges=True, add_bos=True)
    for name in ("dbrx", "smaug-bpe"):
        table[name] = BpePre(_LLAMA3)
    for name in ("glm4", "chatglm-bpe"):
        table[name] = BpePre(_LLAMA3, bos_none=True)
    for name in ("gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                 "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "exaone4", "mpt", "olmo",
                 "jais"):  # fmt: skip
        table[name] = BpePre(_GPT2)
    for name in ("trillion", "granite-docling"):
        table[name] = BpePre(_GPT2, clean_spaces=False)
    for name in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"):
        table[name] = BpePre(_STARCODER)
    for name in ("smollm", "command-r"):
        table[name] = BpePre(_STARCODER, clean_spaces=False)
    for name in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open"):
        table[name] = BpePre(_QWEN2, clean_spaces=False)
    for name in ("stablelm2", "megrez"):
        table[name] = BpePre(_QWEN2)
    table["falcon"] = BpePre(_FALCON)
    table["tekken"] = BpePre((_RE_TEKKEN,), clean_spaces=False, ignore_merges=True, add_bos=True)
    for name in ("gpt-4o", "llama4", "kanana2", "talkie"):
        table[name] = BpePre((_RE_GPT4O,), clean_spaces=False)
    table["minicpm5"] = BpePre((r"\p{N}{1,3}", _RE_MINICPM5), ignore_merges=True)
    return table


_BPE_PRE = _pre_table()
SUPPORTED_BPE_PRE = frozenset(name for name in _BPE_PRE if name)


def bpe_pre(name: str) -> BpePre:
    """The pre-tokenizer called `name` ("" is llama.cpp's default); unknown: ModelFormatError."""
    pre = _BPE_PRE.get(name)
    if pre is None:
        raise ModelFormatError(
            f"unknown pre-tokenizer type {name!r} (tokenizer.ggml.pre); "
            f"supported: {', '.join(sorted(SUPPORTED_BPE_PRE))}"
        )
    return pre
