"""SentencePiece BPE in Realm's own small library (spm.cpp), merged exactly as llama.cpp
merges it: the vocabulary in one buffer and a table of ids, built in tens of milliseconds.

`make setup` builds the library (`python -m realm.models.spm`, about a second; see
native_build.py). Where it is not built or does not load, SPM vocabularies are encoded by
`tokenizers`' BPE over merges derived from the scores instead (encoders.py), with a
warning: the same tokens on both reference models, but gemma3 takes 1.3-1.6 s more to
load and 61 MiB more to hold (AMD EPYC, 2 cores).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from realm.errors import InvalidArgument, ModelFormatError
from realm.models.catalogue import realm_home
from realm.native_build import NativeLibrary

log = logging.getLogger(__name__)

SPM_SPACE = "\u2581"
"""SentencePiece's visible space, `▁`."""

LIBRARY = NativeLibrary(
    "librealm_spm.so", (Path(__file__).with_name("spm.cpp"),), fallback=lambda: realm_home() / "native"
)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, or None (and one warning) where it is not built or is damaged."""
    path = LIBRARY.path()
    if path is None:
        log.warning(
            "Realm's SentencePiece library is not built: SentencePiece vocabularies load slower and "
            "take more memory. Build it with `python -m realm.models.spm` (make setup does)."
        )
        return None
    try:
        LIBRARY.check(path)
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        log.warning(
            "Realm's SentencePiece library in %s does not load (%s): rebuild it with "
            "`python -m realm.models.spm --force`.",
            path,
            e,
        )
        return None
    lib.realm_spm_new.restype = ctypes.c_void_p
    lib.realm_spm_new.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    lib.realm_spm_free.restype = None
    lib.realm_spm_free.argtypes = [ctypes.c_void_p]
    lib.realm_spm_find.restype = ctypes.c_int32
    lib.realm_spm_find.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64]
    lib.realm_spm_text.restype = ctypes.c_int64
    lib.realm_spm_text.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.realm_spm_encode.restype = ctypes.c_int64
    pointer = ctypes.c_void_p
    lib.realm_spm_encode.argtypes = [pointer, ctypes.c_char_p, pointer, ctypes.c_int64, pointer, pointer]
    return lib


class SpmEncoder:
    """A SentencePiece vocabulary's fragment encoder (encoders.FragmentEncoder): llama.cpp's
    merge loop on each fragment, after its spaces become `▁` (and one goes in front of it,
    with `add_space_prefix`). Thread-safe: the library keeps no state between calls."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        texts: Sequence[str],
        scores: Sequence[float],
        unk_id: int | None,
        add_space_prefix: bool,
    ) -> None:
        encoded = [t.encode() for t in texts]
        offsets = _offsets(encoded)
        # a NaN score would break the merge order: such a token never wins a merge
        weights = np.nan_to_num(np.asarray(scores[: len(encoded)], dtype=np.float32), nan=-np.inf)
        self._lib = lib
        self._vocabulary = lib.realm_spm_new(
            b"".join(encoded), offsets.ctypes.data, weights.ctypes.data, len(encoded), -1 if unk_id is None else unk_id
        )
        self._prefix = SPM_SPACE if add_space_prefix else ""

    def __del__(self) -> None:
        if getattr(self, "_vocabulary", None):
            self._lib.realm_spm_free(self._vocabulary)

    def encode(self, fragments: Sequence[str]) -> list[list[int]]:
        try:
            pieces = [(self._prefix + f).replace(" ", SPM_SPACE).encode() for f in fragments]
        except UnicodeEncodeError as e:  # a lone surrogate
            raise InvalidArgument(f"cannot tokenize the text: {e}") from None
        bounds = _offsets(pieces)
        out = np.empty(int(bounds[-1]), dtype=np.int32)
        ends = np.zeros(len(pieces), dtype=np.int64)
        n = self._lib.realm_spm_encode(
            self._vocabulary, b"".join(pieces), bounds.ctypes.data, len(pieces), out.ctypes.data, ends.ctypes.data
        )
        if n < 0:
            raise ModelFormatError("the vocabulary has no token for a byte of the text (no <0xNN> token, no unknown)")
        tokens, stops = out[:n].tolist(), ends.tolist()
        return [tokens[a:b] for a, b in zip([0, *stops], stops, strict=False)]

    def text(self, token_id: int) -> str:
        start = ctypes.c_void_p()
        n = self._lib.realm_spm_text(self._vocabulary, token_id, ctypes.byref(start))
        return ctypes.string_at(start, n).decode()

    def id(self, text: str) -> int | None:
        raw = text.encode(errors="surrogatepass")
        found = self._lib.realm_spm_find(self._vocabulary, raw, len(raw))
        return None if found < 0 else int(found)


def _offsets(pieces: Sequence[bytes]) -> np.ndarray:
    """Where each piece starts in their concatenation, and where the last ends: (n + 1,) int64."""
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), out=offsets[1:])
    return offsets


if __name__ == "__main__":
    print(LIBRARY.build(force="--force" in sys.argv))
