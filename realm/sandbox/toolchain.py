"""Building guests: C sources compiled to WebAssembly by zig from the `ziglang` PyPI package.

No other toolchain is needed. Guests are built freestanding (no libc, no WASI): the only
imports a built guest has are the `env.realm_*` functions it declares through
guest/include/realm.h. zig links its compiler runtime, which supplies memcpy, memset,
memmove, memcmp, strlen and the float math functions (expf, logf, ...).

`build` compiles one source; `build_all` builds every guest shipped in guest/ into
guest/build/<name>.wasm, skipping those that are up to date (so `realm guest build --all`
is quick to repeat). A source is built for wasm64 (memory64) when its first lines say
``realm-target: wasm64`` or its name ends in "64" (e.g. dispatch64.c), else for wasm32.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from realm.errors import GuestFault, InvalidArgument

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "guest"
INCLUDE_DIR = GUEST_DIR / "include"
BUILD_DIR = GUEST_DIR / "build"
DEFAULT_SOURCE = GUEST_DIR / "default.c"
EXAMPLES_DIR = GUEST_DIR / "examples"  # example guests; they may #include "../default.c"
TARGETS = ("wasm32", "wasm64")
STACK_BYTES = 1 << 20
EXPORTS = ("generate", "realm_guest_abi")

_TARGET_LINE = re.compile(r"realm-target:\s*(wasm32|wasm64)")


def zig() -> list[str]:
    """The zig command of the `ziglang` package, run with this interpreter."""
    return [sys.executable, "-m", "ziglang"]


def target_of(source: Path) -> str:
    """wasm64 if the source's first lines say `realm-target: wasm64` or its stem ends in 64."""
    try:
        with open(source, encoding="utf-8", errors="replace") as f:
            head = "".join(f.readline() for _ in range(20))
    except OSError:
        head = ""
    m = _TARGET_LINE.search(head)
    if m:
        return m.group(1)
    return "wasm64" if source.stem.endswith("64") else "wasm32"


def command(source: Path, output: Path, target: str) -> list[str]:
    """The zig cc command line that builds `source` into `output`."""
    if target not in TARGETS:
        raise InvalidArgument(f"unknown guest target {target!r} (choose {' or '.join(TARGETS)})")
    return [
        *zig(), "cc",
        "-target", f"{target}-freestanding",
        "-O2", "-s", "-msimd128", "-mbulk-memory",
        "-std=c11", "-Wall", "-Wno-unused-function", "-Werror=implicit-function-declaration",
        "-I", str(INCLUDE_DIR),
        "-Wl,--no-entry",
        f"-Wl,-z,stack-size={STACK_BYTES}",
        *(f"-Wl,--export={name}" for name in EXPORTS),
        "-o", str(output),
        str(source),
    ]  # fmt: skip


def build(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    target: str | None = None,
    force: bool = False,
) -> Path:
    """Compile one guest; returns the .wasm path (guest/build/<stem>.wasm by default).

    Skipped when the output is newer than the source and every SDK header, unless `force`.
    Raises GuestFault with zig's messages when the build fails."""
    source = Path(source)
    if not source.is_file():
        raise InvalidArgument(f"guest source {source} does not exist")
    target = target or target_of(source)
    out = Path(output) if output else BUILD_DIR / f"{source.stem}.wasm"
    if not force and _up_to_date(source, out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        r = subprocess.run(command(source, tmp, target), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise GuestFault(f"cannot run zig ({' '.join(zig())}): {e}") from e
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        detail = (r.stderr or r.stdout).strip()
        raise GuestFault(f"building guest {source} for {target} failed:\n{detail}")
    os.replace(tmp, out)
    return out


def shipped_sources() -> list[Path]:
    """Every guest shipped in guest/ (a .c file at its top level) and in guest/examples/."""
    return sorted(GUEST_DIR.glob("*.c")) + sorted(EXAMPLES_DIR.glob("*.c"))


def build_all(force: bool = False) -> list[Path]:
    """Build every shipped guest into guest/build/."""
    return [build(src, force=force) for src in shipped_sources()]


def default_guest() -> Path:
    """guest/build/default.wasm, built now if missing or older than its sources."""
    return build(DEFAULT_SOURCE)


_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _inputs(source: Path) -> set[Path]:
    """The source and every file it includes with #include "...", transitively."""
    seen: set[Path] = set()
    todo = [source.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for name in _INCLUDE.findall(text):
            for base in (path.parent, INCLUDE_DIR):
                candidate = (base / name).resolve()
                if candidate.is_file():
                    todo.append(candidate)
                    break
    return seen


def _up_to_date(source: Path, out: Path) -> bool:
    """The output is newer than the source, everything it includes, and this builder."""
    try:
        built = out.stat().st_mtime_ns
    except OSError:
        return False
    inputs = [*_inputs(source), Path(__file__)]
    return all(p.stat().st_mtime_ns <= built for p in inputs if p.exists())
