"""C++ libraries that Realm builds once from its own sources (`make setup` does): the CPU
kernels (backends/native.py) and the SentencePiece tokenizer's merge loop (models/spm.py).

A library lives in `<package dir>/_build/<key>/` (or `<fallback>/<key>/` where the package
is read-only), the key hashing its sources, the compiler's version and whatever else it
is built against. It is written whole and renamed into place, then its SHA-256 is recorded
beside it: a library without that record is not built, and one that does not match it
(a build killed half way, a disk error) is not loaded, since dlopen of a truncated file
is a crash, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from realm.errors import InternalError
from realm.files import sha256_file


def compiler() -> str | None:
    """The C++ compiler: $CXX, else c++, else g++."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@functools.cache
def _compiler_version(path: str) -> str:
    return subprocess.run([path, "--version"], capture_output=True, text=True).stdout


@dataclass(frozen=True)
class NativeLibrary:
    """One shared library: `sources` compiled together with `flags` (besides `-O3 -shared
    -fPIC`), its key also hashing `headers` and `depends_on` (a version it links against)."""

    name: str  # the file's name, e.g. librealm_spm.so
    sources: tuple[Path, ...]
    fallback: Callable[[], Path]  # where to build when the package's folder is read-only
    headers: tuple[Path, ...] = ()
    flags: Callable[[], Sequence[str]] = field(default=lambda: ())
    depends_on: str = ""

    @functools.cached_property
    def key(self) -> str:
        """Hashes the sources and the compiler: once a process, as `path()` is asked often."""
        path = compiler()
        digest = hashlib.sha256()
        for source in (*self.sources, *self.headers):
            digest.update(source.read_bytes())
        digest.update(f"{self.depends_on}\n{_compiler_version(path) if path else 'none'}".encode())
        return digest.hexdigest()[:24]

    def places(self) -> list[Path]:
        """Where the library may be, in order: beside its first source (shared by every
        REALM_HOME), then the fallback folder."""
        key = self.key
        return [self.sources[0].parent / "_build" / key / self.name, self.fallback() / key / self.name]

    def path(self) -> Path | None:
        """The built library, if there is one."""
        return next((place for place in self.places() if digest_path(place).is_file()), None)

    def check(self, path: Path) -> None:
        """OSError unless `path` holds the bytes recorded when it was built."""
        if sha256_file(path) != digest_path(path).read_text().strip():
            raise OSError("it does not match its recorded SHA-256 (truncated or altered)")

    def build(self, force: bool = False) -> Path:
        """Compile the library into `path()`, unless it is built already."""
        built = self.path()
        if built is not None and not force:
            return built
        target = built or self._target()
        cxx = compiler()
        if cxx is None:
            raise InternalError(f"no C++ compiler (c++ or g++) to build {self.name}; set CXX")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / self.name
            cmd = [
                cxx,
                "-O3",
                "-std=c++20",
                "-shared",
                "-fPIC",
                "-w",
                *map(str, self.sources),
                *self.flags(),
                "-o",
                str(out),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise InternalError(f"building {self.name} failed:\n{done.stderr[-3000:]}")
            digest = Path(tmp) / "digest"
            digest.write_text(sha256_file(out))
            os.replace(out, target)
            os.replace(digest, digest_path(target))  # last: a library without it is not built
        return target

    def _target(self) -> Path:
        """The first place a build can write to."""
        for place in self.places():
            try:
                place.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(place.parent, os.W_OK):
                return place
        raise InternalError(f"nowhere to build {self.name}: {', '.join(str(p.parent) for p in self.places())}")


def digest_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")
