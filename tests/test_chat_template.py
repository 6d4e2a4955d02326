"""Chat templates from GGUF metadata, rendered in the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import metadata_of

from realm.errors import InvalidArgument
from realm.models.chat_template import ChatTemplate, chat_template_from_fields
from realm.models.tokenizer import Tokenizer


def gguf_fields(path: Path) -> dict[str, Any]:
    """GGUF metadata as plain Python values, as the engine's loader gives it (read once)."""
    return metadata_of(path)


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> tuple[dict[str, Any], Tokenizer]:
    fields = gguf_fields(smollm2_path)
    return fields, Tokenizer.from_gguf_fields(fields)


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_smollm2_renders_chatml(smollm2: tuple[dict[str, Any], Tokenizer]) -> None:
    fields, tok = smollm2
    template = chat_template_from_fields(fields, tok)
    assert template is not None
    assert template.bos_token == "<|im_start|>" and template.eos_token == "<|im_end|>"
    text = template.render([{"role": "user", "content": "What is 2+2?"}])
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    # the special tokens in it are single tokens when parsed
    ids = tok.encode(text, parse_special=True)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_smollm2_own_system_no_generation_prompt(smollm2: tuple[dict[str, Any], Tokenizer]) -> None:
    template = chat_template_from_fields(*smollm2)
    assert template is not None
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert template.render(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_gemma3_has_no_template(gemma3_path: Path) -> None:
    fields = gguf_fields(gemma3_path)
    assert "tokenizer.chat_template" not in fields
    assert chat_template_from_fields(fields, Tokenizer.from_gguf_fields(fields)) is None


def test_no_template_field_gives_none(smollm2: tuple[dict[str, Any], Tokenizer]) -> None:
    fields, tok = smollm2
    without = {k: v for k, v in fields.items() if k != "tokenizer.chat_template"}
    assert chat_template_from_fields(without, tok) is None
    assert chat_template_from_fields({**without, "tokenizer.chat_template": ""}, tok) is None


def _render(source: str, **kw: Any) -> str:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>").render([{"role": "user", "content": "hi"}], **kw)


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% set x = messages.append({'role': 'x'}) %}",
        "{{ messages[0].update({'role': 'x'}) }}",
    ],
)
def test_sandbox_refuses_escapes(source: str) -> None:
    with pytest.raises(InvalidArgument, match="sandbox"):
        _render(source)


def test_template_errors_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="syntax"):
        ChatTemplate("{% for m in messages %}", bos_token="", eos_token="")
    with pytest.raises(InvalidArgument, match="Only user and assistant"):
        _render("{{ raise_exception('Only user and assistant roles are supported!') }}")
    with pytest.raises(InvalidArgument):
        _render("{{ undefined_thing.attr }}")
    with pytest.raises(InvalidArgument):
        _render("{{ 1 / 0 }}")
    with pytest.raises(InvalidArgument):
        ChatTemplate("", bos_token="", eos_token="")
    template = ChatTemplate("{{ messages[0].content }}", bos_token="", eos_token="")
    with pytest.raises(InvalidArgument):
        template.render([{"content": "no role"}])
    with pytest.raises(InvalidArgument):
        template.render("not a list")  # type: ignore[arg-type]


def test_hf_template_features() -> None:
    assert _render("{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}") == "<s>hi</s>"
    assert _render("{{ messages|tojson }}") == '[{"role": "user", "content": "hi"}]'
    assert _render("{{ '<é>'|tojson }}") == '"<é>"'  # no HTML escaping, no \\u escapes
    assert len(_render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert _render("{% if add_generation_prompt %}G{% endif %}") == "G"
    assert _render("{% if add_generation_prompt %}G{% endif %}", add_generation_prompt=False) == ""
    assert _render("{% for m in messages %}{% break %}{% endfor %}x") == "x"
    assert _render("{% generation %}g{% endgeneration %}") == "g"
    # trim_blocks / lstrip_blocks, as HF renders
    assert _render("  {% if true %}\nA\n  {% endif %}\nB") == "A\nB"
    ns = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}"
    assert _render(ns) == "1"
