"""Host-side generation on the real models: streaming, stops, seeds, limits, errors."""

from __future__ import annotations

import pytest
from conftest import load_reference

from realm.engine.sampling import SamplingParams
from realm.errors import ContextOverflow, Unsupported


def test_greedy_continuation_starts_like_llama_cpp(smollm2):
    reference, meta = load_reference("smollm2")
    prompt = reference["p0_tokens"].tolist()
    gen = smollm2.generate(prompt, max_tokens=4, params=SamplingParams.greedy())
    list(gen)
    assert gen.tokens == reference["p0_greedy"][:4].tolist()
    assert meta["prompts"][0]["greedy_text"].startswith(gen.text)


def test_streamed_pieces_make_the_final_text(smollm2):
    gen = smollm2.generate("Write a haiku about the sea:", max_tokens=24, params=SamplingParams(seed=1))
    pieces = [p.text for p in gen]
    assert "".join(pieces) == gen.text
    assert gen.text == smollm2.tokenizer.decode(gen.tokens)
    assert gen.finish_reason in ("stop", "length")


def test_multibyte_text_never_streams_a_broken_character(gemma3):
    gen = gemma3.generate("Les élèves français écrivent: «", max_tokens=16, params=SamplingParams.greedy())
    pieces = [p.text for p in gen]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == gemma3.tokenizer.decode(gen.tokens)


def test_same_seed_same_output_at_temperature(smollm2):
    params = SamplingParams(temperature=1.0, seed=1234)
    first = smollm2.generate("Once upon a time", max_tokens=16, params=params)
    second = smollm2.generate("Once upon a time", max_tokens=16, params=params)
    list(first), list(second)
    assert first.tokens == second.tokens


def test_stop_string_ends_generation_before_it(smollm2):
    free = smollm2.generate("The capital of France is", max_tokens=12, params=SamplingParams.greedy())
    list(free)
    stop = free.text.strip().split()[1]  # a word the model will produce
    gen = smollm2.generate("The capital of France is", max_tokens=12, params=SamplingParams.greedy(), stop=[stop])
    pieces = [p.text for p in gen]
    assert gen.finish_reason == "stop"
    assert stop not in gen.text and free.text.startswith(gen.text)
    assert "".join(pieces) == gen.text


def test_max_tokens_is_length(smollm2):
    gen = smollm2.generate("Count: 1, 2, 3,", max_tokens=5, params=SamplingParams.greedy())
    list(gen)
    assert (len(gen.tokens), gen.finish_reason) == (5, "length")


def test_chat_template_and_end_of_turn(smollm2):
    gen = smollm2.generate("What is the capital of Japan?", max_tokens=40, params=SamplingParams.greedy(), chat=True)
    list(gen)
    assert "Tokyo" in gen.text and gen.finish_reason == "stop"


def test_chat_on_a_base_model_is_a_clear_error(gemma3):
    with pytest.raises(Unsupported, match="cannot chat: it has no chat template"):
        gemma3.generate("hello", chat=True)


def test_prompt_longer_than_the_context_is_refused(smollm2):
    session = smollm2.new_session(64)
    with pytest.raises(ContextOverflow):
        session.feed(list(range(100, 200)))
    assert session.tokens == []  # nothing half-done


def test_batched_forward_equals_one_at_a_time(smollm2):
    """Two sessions in one forward call give the logits each gets alone."""
    from largest_logits import assert_largest_close

    a, b = smollm2.new_session(), smollm2.new_session()
    alone_a = smollm2.new_session().feed([1, 504, 3458, 282])
    alone_b = smollm2.new_session().feed([1, 9690, 11])
    chunks = [a.chunk([1, 504, 3458, 282]), b.chunk([1, 9690, 11])]
    smollm2.transformer.forward(chunks)
    assert_largest_close(chunks[0].logits, alone_a, atol=2e-2)
    assert_largest_close(chunks[1].logits, alone_b, atol=2e-2)
