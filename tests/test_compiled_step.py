"""The compiled decode step's artifacts: keyed by what makes them invalid, checked before
they load, rebuilt rather than trusted when anything is wrong with them."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import pytest
import torch

from realm.backends import compiled
from realm.engine import compiled_step
from realm.engine.model import load_model


@pytest.fixture
def home_with_artifacts(smollm2_compiled, smollm2_path, tmp_path, monkeypatch):
    """A $REALM_HOME of the test's own holding a copy of smollm2's artifacts."""
    source = compiled.artifact_dir(smollm2_compiled.sha256)
    monkeypatch.setenv("REALM_HOME", str(tmp_path))
    target = compiled.artifact_dir(smollm2_compiled.sha256)
    shutil.copytree(source, target)
    return target


def test_the_key_changes_with_torch_the_cpu_the_code_and_the_model(monkeypatch):
    sha = "ab" * 32
    key = compiled.artifact_key(sha)
    assert compiled.artifact_key(sha) == key
    assert compiled.artifact_key("cd" * 32) != key
    for name, value in (
        ("FORMAT", compiled.FORMAT + 1),
        ("_cpu_features", lambda: "another cpu"),
        ("_code_version", lambda: "other code"),
    ):
        with monkeypatch.context() as m:
            m.setattr(compiled, name, value)
            assert compiled.artifact_key(sha) != key, name
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "0.0.1")
        assert compiled.artifact_key(sha) != key


def test_artifacts_load_and_decode_like_the_built_ones(
    home_with_artifacts, smollm2_compiled, smollm2_path, cpu_backend
):
    model = load_model(smollm2_path, cpu_backend, compile_mode="cached")
    assert model.transformer.compiled and model.decode_step == "compiled"
    a, b = model.new_session(), smollm2_compiled.new_session()
    assert torch.equal(a.feed([1, 504, 3458]), b.feed([1, 504, 3458]))
    assert torch.equal(a.feed([282]), b.feed([282]))


@pytest.mark.parametrize("damage", ["truncated", "altered", "manifest"])
def test_a_damaged_artifact_is_a_warning_and_a_rebuild_not_a_crash(
    damage, home_with_artifacts, smollm2_path, cpu_backend, caplog
):
    lone = next(home_with_artifacts.glob("lone-*.pt2"))
    data = lone.read_bytes()
    if damage == "truncated":
        lone.write_bytes(data[: len(data) // 2])
    elif damage == "altered":
        lone.write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    else:
        (home_with_artifacts / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="realm.backends.compiled"):
        model = load_model(smollm2_path, cpu_backend, compile_mode="cached")
    assert not model.transformer.compiled and model.decode_step == "eager"
    assert "will be built again" in caplog.text
    assert not home_with_artifacts.exists()  # gone, so that the next build starts clean
    assert "".join(p.text for p in model.generate("The capital of France is", 4)) != ""


def test_artifacts_for_other_weights_are_refused(home_with_artifacts, smollm2_compiled):
    manifest = json.loads((home_with_artifacts / "manifest.json").read_text())
    layers = smollm2_compiled.transformer.weights.layers
    per = compiled.layers_per_graph(smollm2_compiled.config)
    assert compiled.load(home_with_artifacts, layers, per) is not None
    manifest["runs"][0] = "0" * 16
    (home_with_artifacts / "manifest.json").write_text(json.dumps(manifest))
    assert compiled.load(home_with_artifacts, layers, per) is None


def test_status_tells_compiled_building_and_none(home_with_artifacts, smollm2_compiled):
    sha = smollm2_compiled.sha256
    assert compiled_step.status(sha) == "compiled"
    shutil.rmtree(home_with_artifacts)
    assert compiled_step.status(sha) == "none"
    with compiled_step.build_lock(sha):  # what a build holds while it runs
        assert compiled_step.status(sha) == "building"
    assert compiled_step.status(sha) == "none"


def test_runs_keep_the_sliding_pattern_and_each_kind_of_run_gets_its_own_graph(smollm2, gemma3):
    assert compiled.layers_per_graph(smollm2.config) == 6  # 30 layers, none sliding
    per = compiled.layers_per_graph(gemma3.config)  # 18 layers, every 6th global
    assert gemma3.config.n_layers % per == 0
    assert all(gemma3.config.is_sliding(i) == gemma3.config.is_sliding(i % per) for i in range(gemma3.config.n_layers))
    smollm2_runs = compiled.runs_of(smollm2.transformer.weights.layers, 6)
    assert len({compiled.weights_signature(r) for r in smollm2_runs}) == 1  # Q4_1 throughout
    gemma3_runs = compiled.runs_of(gemma3.transformer.weights.layers, per)
    assert len({compiled.weights_signature(r) for r in gemma3_runs}) == 3  # Q4_K_M: layers of two kinds


def test_compile_mode_reads_realm_compile(monkeypatch):
    for raw, mode in (
        ("", "auto"),
        ("1", "auto"),
        ("auto", "auto"),
        ("cached", "cached"),
        ("0", "off"),
        ("OFF", "off"),
    ):
        monkeypatch.setenv("REALM_COMPILE", raw)
        assert compiled.compile_mode() == mode, raw


def test_a_compiled_step_leaves_the_gil_to_other_threads(smollm2_compiled, monkeypatch):
    """While the model computes, the server's event loop and guests run: a thread counting
    in Python advances during the compiled graphs' calls, not only between them."""
    count, stop, advanced = [0], threading.Event(), []

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    def watched(path):
        graph = load_package(path)

        def run(inputs):
            before = count[0]
            out = graph(inputs)
            advanced.append(count[0] > before)
            return out

        return run

    load_package = compiled._load_package
    monkeypatch.setattr(compiled, "_load_package", watched)
    model = smollm2_compiled
    step = compiled.load(compiled.artifact_dir(model.sha256), model.transformer.weights.layers, 6)
    monkeypatch.setattr(model.transformer, "decode_graph", step)
    spinner = threading.Thread(target=spin)
    spinner.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a core for the counting thread: the test is of the GIL, not of the CPU
    try:
        session = model.new_session()
        for token in [1, 504, 3458, 282, 253, 1345, 314, 260]:
            session.feed([token])
    finally:
        torch.set_num_threads(threads)
        stop.set()
        spinner.join()
    assert len(advanced) == 8 * 5  # 30 layers, 6 a graph
    # a graph that held the GIL would let the counter advance in none of its calls; a busy
    # machine delays the counting thread's wake-up in some (a fresh-clone CI run: 27 of 40;
    # beside two CPU-bound processes: 19)
    assert sum(advanced) >= 0.25 * len(advanced)
