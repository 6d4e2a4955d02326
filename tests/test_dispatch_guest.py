"""The dispatch guest (guest/dispatch.c; dispatch64.c is the same source built for wasm64):
greedy generation whose forward pass goes through the lower ABI levels ("layer", "op",
"naive"), run in the real sandbox and checked against the host's own greedy generation
(`Model.generate`) on the very model the guest stored.

* Tiny float32 models (tests/tiny_model.py): the host runs them dense in float32 and the
  guest computes in float32, so every level gives exactly the host's tokens.
* Quantized weights (a Q8_0 tiny model, smollm2-135m): "layer" runs the host's own layers,
  so its tokens are exactly the host's. "naive" computes everything in float32 from the
  dequantized weights: it is checked against the host's float32 reference backend, to
  within float32 rounding. "op" mixes the two, the host's CPU kernels for the weight
  products and float32 in the guest for the rest; the CPU kernels differ from float32 by
  up to a few tenths of a logit on smollm2 (measured: 0.15 to 0.45), so an "op" token may
  differ from the host's at a near tie. Each "op" token is therefore checked against the
  host's logits along the guest's own path: it is the host's argmax or within twice the
  host-vs-float32 difference of it at that step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import wasmtime
from sandbox_helpers import greedy_request, host_direct, make_runtime
from tiny_model import write_tiny_gemma3, write_tiny_llama

from realm.backends.devices import BackendRegistry
from realm.engine.model import load_model
from realm.sandbox import abi, toolchain
from realm.sandbox.runtime import Limits, Runtime

GUEST_DIR = Path(__file__).resolve().parents[1] / "guest"
HEADER = GUEST_DIR / "include" / "realm.h"
PROMPTS = ["the cat sat on the mat", "Hello world", "in a hole in the ground there lived"]
TINY_TOKENS = 16
SMOLLM2_TOKENS = 4
F32_TOL = 0.01  # logits: float32 against float32, summed in another order
COUNTS = re.compile(
    r"dispatch: level (\w+): weight products (\d+) host, (\d+) guest; "
    r"activation products (\d+) host, (\d+) guest"
)


@pytest.fixture(scope="module")
def guests(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("guests")
    return {
        "wasm32": toolchain.build(GUEST_DIR / "dispatch.c", out / "dispatch.wasm", force=True),
        "wasm64": toolchain.build(GUEST_DIR / "dispatch64.c", out / "dispatch64.wasm", force=True),
    }


@pytest.fixture(scope="module")
def runtime(tmp_path_factory, cpu_backend) -> Runtime:
    tiny = tmp_path_factory.mktemp("tiny")
    paths = {
        "tiny-llama": write_tiny_llama(tiny / "tiny-llama.gguf"),
        "tiny-llama-q8": write_tiny_llama(tiny / "tiny-llama-q8.gguf", seed=1, qtype="Q8_0"),
        "tiny-gemma3": write_tiny_gemma3(tiny / "tiny-gemma3.gguf"),
    }
    models = {name: (path, load_model(path, cpu_backend, name=name)) for name, path in paths.items()}
    return make_runtime(models, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def smollm2_runtime(tmp_path_factory, smollm2_path, smollm2) -> Runtime:
    # "naive" holds the model's weights in guest memory: about 540 MiB for smollm2
    models = {"smollm2-135m": (smollm2_path, smollm2)}
    return make_runtime(models, tmp_path_factory.mktemp("home"), Limits(memory_bytes=1 << 30))


def run_guest(runtime: Runtime, wasm: Path, model: str, prompt: str, max_tokens: int, level: str):
    """The guest's result, and the host's model it ran on."""
    request = greedy_request(runtime, model, prompt, max_tokens) | {"level": level}
    with runtime.instance(runtime.load_module(wasm)) as guest:
        result = guest.generate(request)
    entry = runtime.models.by_name(model)
    runtime.models.release(entry.id)  # only looked up: the store's own reference stays
    return result, entry.model


def host_greedy(model, prompt: str, max_tokens: int):
    return host_direct(model, prompt, max_tokens)[0]


def assert_near_greedy(result, prompt: str, max_tokens: int, host, reference, level: str) -> None:
    """Each guest token is the greedy choice, up to a near tie, after the same tokens, and the
    guest stopped where greedy would. "naive" is held to the float32 `reference` (F32_TOL);
    "op" and "layer" to `host`, within twice the host's distance from float32 at that step
    (the host decodes through its compiled step, whose fused kernels round differently from
    the eager layer-by-layer path: on quantized weights a near tie can go either way)."""
    s_host, s_ref = host.new_session(), reference.new_session()
    feed = host.encode_prompt(prompt)
    for i, token in enumerate([*result.tokens, None]):
        lh, lr = s_host.feed(feed)[-1], s_ref.feed(feed)[-1]
        if level == "naive":
            logits, tol = lr, F32_TOL
        else:
            logits, tol = lh, 2 * float((lh - lr).abs().max()) + F32_TOL
        if token is None:  # after the last token: why the guest stopped
            if result.finish_reason == "stop":
                assert any(logits[e] >= logits.max() - tol for e in host.tokenizer.eot_ids)
            else:
                assert len(result.tokens) == max_tokens
            return
        best = int(torch.argmax(logits))
        assert logits[token] >= logits[best] - tol, (
            f"token {i}: the guest chose {token} (logit {float(logits[token]):.4f}); greedy is "
            f"{best} (logit {float(logits[best]):.4f}, tolerance {tol:.4f})"
        )
        feed = [token]


def level_counts(caplog) -> tuple[str, list[int]]:
    """What the guest's closing log line says ran where."""
    found = [COUNTS.search(r.getMessage()) for r in caplog.records]
    found = [m for m in found if m]
    assert found, "the dispatch guest logged no summary line"
    return found[-1].group(1), [int(x) for x in found[-1].groups()[1:]]


# ---------------------------------------------------------------------------- tiny float32 models


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("level", ["layer", "op", "naive"])
def test_every_level_gives_the_host_greedy_tokens(runtime, guests, model, level, caplog):
    caplog.set_level(logging.INFO, logger="realm.guest")
    for prompt in PROMPTS:
        result, m = run_guest(runtime, guests["wasm32"], model, prompt, TINY_TOKENS, level)
        expected = host_greedy(m, prompt, TINY_TOKENS)
        assert result.tokens == expected.tokens, prompt
        assert result.finish_reason == expected.finish_reason
        assert result.prompt_tokens == len(m.encode_prompt(prompt))
        assert result.completion_tokens == len(expected.tokens)
        assert result.text == expected.text
    ran, (host_w, guest_w, host_mm, guest_mm) = level_counts(caplog)
    assert ran == level
    if level == "layer":
        assert host_w == guest_w == host_mm == guest_mm == 0
    elif level == "op":  # weights on the host; q.k^T and attention.v on the host's CPU backend
        assert host_w > 0 and host_mm > 0 and guest_w == guest_mm == 0
    else:
        assert guest_w > 0 and guest_mm > 0 and host_w == host_mm == 0


def test_auto_is_op_on_a_host_with_a_backend(runtime, guests, caplog):
    caplog.set_level(logging.INFO, logger="realm.guest")
    result, m = run_guest(runtime, guests["wasm32"], "tiny-llama", PROMPTS[0], TINY_TOKENS, "auto")
    assert result.tokens == host_greedy(m, PROMPTS[0], TINY_TOKENS).tokens
    assert level_counts(caplog)[0] == "op"


@pytest.mark.parametrize("level", ["layer", "op", "naive"])
def test_wasm64_build_gives_the_wasm32_tokens(runtime, guests, level):
    for prompt in PROMPTS:
        r32, _ = run_guest(runtime, guests["wasm32"], "tiny-llama", prompt, TINY_TOKENS, level)
        r64, _ = run_guest(runtime, guests["wasm64"], "tiny-llama", prompt, TINY_TOKENS, level)
        assert r64.tokens == r32.tokens and r64.text == r32.text


# ---------------------------------------------------------------------------- quantized weights


@pytest.fixture(scope="module")
def float32_reference():
    """Models loaded on the host's float32 reference backend (dense, dequantized), by path."""
    backend = BackendRegistry("naive").active
    loaded = {}

    def get(model):
        if model.path not in loaded:
            loaded[model.path] = load_model(model.path, backend, name=model.name)
        return loaded[model.path]

    return get


@pytest.mark.parametrize("level", ["layer", "op", "naive"])
def test_quantized_tiny_model(runtime, guests, float32_reference, level):
    for prompt in PROMPTS:
        result, m = run_guest(runtime, guests["wasm32"], "tiny-llama-q8", prompt, TINY_TOKENS, level)
        assert_near_greedy(result, prompt, TINY_TOKENS, m, float32_reference(m), level)


@pytest.mark.parametrize("level", ["layer", "op", "naive"])
def test_smollm2(smollm2_runtime, guests, float32_reference, level):
    prompt = "The capital of France is"
    result, m = run_guest(smollm2_runtime, guests["wasm32"], "smollm2-135m", prompt, SMOLLM2_TOKENS, level)
    assert_near_greedy(result, prompt, SMOLLM2_TOKENS, m, float32_reference(m), level)


# ---------------------------------------------------------------------------- the module


def declared_functions() -> set[str]:
    """Every function realm.h declares: `REALM_IMPORT(name) int32_t name(...)`."""
    found = re.findall(r"REALM_IMPORT\((\w+)\)\s+int32_t\s+(\w+)\(", HEADER.read_text())
    assert found and all(a == b for a, b in found)
    return {name for name, _ in found}


@pytest.mark.parametrize("target", ["wasm32", "wasm64"])
def test_imports_are_realm_h_functions_from_env(guests, target):
    config = wasmtime.Config()
    config.wasm_memory64 = True
    module = wasmtime.Module.from_file(wasmtime.Engine(config), str(guests[target]))
    imports = [(i.module, i.name) for i in module.imports]
    assert imports and all(mod == "env" for mod, _ in imports)
    assert {name for _, name in imports} <= declared_functions() <= set(abi.BY_NAME)
    memory = next(e.type for e in module.exports if e.name == "memory")
    assert memory.is_64 == (target == "wasm64")
    assert {"generate", "realm_guest_abi", "memory"} <= {e.name for e in module.exports}
