"""The naive backend (`--backend naive`, `realm_get_backend_type()` = 2): guests get no host
kernel per operation, and the model-level calls run what docs/ABI.md says they run, the
host's float32 reference (plain PyTorch on dequantized weights, nothing compiled)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import wasmtime
from sandbox_helpers import greedy_request, host_direct

from realm.backends.devices import BackendKind, BackendRegistry
from realm.backends.linear import DenseLinear
from realm.engine.model_store import ModelStore
from realm.errors import BackendUnavailable
from realm.sandbox.runtime import ModuleCache, Runtime

SMOL = "smollm2-135m"

# Emits, as tokens: the backend type; 0 - the result of realm_matmul_cpu on a 2x2 product
# ([[1, 2], [3, 4]] @ [[5, 6], [7, 8]]); the product's first element (19 when it ran, 0
# when refused); 0 - the result of realm_matmul_gpu on the same operands.
PROBE = r"""
(module
  (import "env" "realm_abi_version" (func $abi (result i32)))
  (import "env" "realm_get_backend_type" (func $backend (result i32)))
  (import "env" "realm_matmul_cpu" (func $cpu (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "realm_matmul_gpu" (func $gpu (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "realm_emit" (func $emit (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\00\00\80\3f\00\00\00\40\00\00\40\40\00\00\80\40")
  (data (i32.const 16) "\00\00\a0\40\00\00\c0\40\00\00\e0\40\00\00\00\41")
  (func (export "realm_guest_abi") (result i32) (call $abi))
  (func $say (param $token i32) (drop (call $emit (local.get $token) (i32.const 0) (i32.const 0))))
  (func (export "generate") (result i32)
    (call $say (call $backend))
    (call $say (i32.sub (i32.const 0)
      (call $cpu (i32.const 0) (i32.const 16) (i32.const 2) (i32.const 2) (i32.const 2) (i32.const 32))))
    (call $say (i32.trunc_f32_s (f32.load (i32.const 32))))
    (call $say (i32.sub (i32.const 0)
      (call $gpu (i32.const 0) (i32.const 16) (i32.const 2) (i32.const 2) (i32.const 2) (i32.const 32))))
    (i32.const 0)))
"""
UNAVAILABLE = 11  # REALM_E_BACKEND_UNAVAILABLE, negated


def test_each_choice_offers_guests_its_backend_and_those_after_it_in_the_chain():
    naive = BackendRegistry("naive")
    assert naive.active.kind == BackendKind.NONE and naive.chain == [naive.active]
    for kind in (BackendKind.CPU, BackendKind.GPU):
        with pytest.raises(BackendUnavailable, match="compute this product in WebAssembly"):
            naive.offered(kind)
    cpu = BackendRegistry("cpu")
    assert cpu.offered(BackendKind.CPU) is cpu.active
    with pytest.raises(BackendUnavailable, match="no GPU backend"):
        cpu.offered(BackendKind.GPU)  # even where the machine has one: the operator chose the CPU
    auto = BackendRegistry("auto")
    assert auto.offered(BackendKind.CPU).kind == BackendKind.CPU
    assert auto.chain[-1].kind == BackendKind.NONE


def runtime_on(backend: str, home) -> Runtime:
    registry = BackendRegistry(backend)
    return Runtime(ModelStore(registry.active, home=home), registry, modules=ModuleCache(home / "modules"))


@pytest.fixture(scope="module")
def naive_runtime(tmp_path_factory) -> Runtime:
    return runtime_on("naive", tmp_path_factory.mktemp("naive_home"))


def probe(runtime: Runtime) -> tuple[list[int], str | None]:
    module = runtime.load_module(wasmtime.wat2wasm(PROBE), name="probe")
    with runtime.instance(module, tenant="probe") as inst:
        result = inst.generate({})
        return result.tokens, inst.state.last_error


def test_under_naive_the_matmul_host_calls_refuse(naive_runtime, tmp_path):
    tokens, error = probe(naive_runtime)
    assert tokens == [2, UNAVAILABLE, 0, UNAVAILABLE]
    assert "realm_matmul_gpu: no GPU backend for guests: the host runs the naive backend" in error
    # the same probe on the CPU backend: the CPU product runs
    tokens, _ = probe(runtime_on("cpu", tmp_path))
    assert tokens[:3] == [0, 0, 19]


@pytest.fixture(scope="module")
def naive_smollm2(naive_runtime, smollm2_path):
    return naive_runtime.models.store_path(smollm2_path, name=SMOL)


def test_under_naive_the_model_runs_the_float32_reference(naive_smollm2):
    model = naive_smollm2.model
    assert naive_smollm2.info()["backend"] == "naive"
    assert not model.transformer.compiled
    weights = model.transformer.weights
    matrices = [weights.output] + [
        m for layer in weights.layers for m in (layer.qkv, layer.attn_out, layer.gate_up, layer.down)
    ]
    for matrix in matrices:  # no quantized kernel, no screened output: dense float32 on the CPU
        assert isinstance(matrix, DenseLinear)
        assert matrix.weight.dtype == torch.float32 and matrix.weight.device.type == "cpu"


def test_under_naive_the_default_guest_gives_the_float32_reference_tokens(naive_runtime, naive_smollm2):
    prompt = "The capital of France is"
    expected, _ = host_direct(naive_smollm2.model, prompt, 8)
    with naive_runtime.instance(naive_runtime.default_module(), tenant="naive") as inst:
        result = inst.generate(greedy_request(naive_runtime, SMOL, prompt, 8))
    assert result.tokens == expected.tokens and result.text == expected.text


@pytest.mark.slow  # a CLI process loading the model afresh
def test_realm_run_with_the_naive_backend_runs_the_default_guest(naive_smollm2):
    expected, _ = host_direct(naive_smollm2.model, "The capital of France is", 4)
    done = subprocess.run(
        [sys.executable, "-m", "realm.cli", "run", "The capital of France is", "-n", "4", "--temperature", "0"]
        + ["--backend", "naive"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected.text + "\n"
