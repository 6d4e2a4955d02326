"""API keys: made here, stored only as hashes, looked up in O(1).

A key is ``realm-`` and 32 random bytes (URL-safe base64), so a plain SHA-256 is enough to
store it (nothing to brute-force) and lets the lookup be one dictionary probe. The config
holds ``sha256:<hex>``; the comparison of the found hash is constant-time anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from realm.errors import InvalidArgument

PREFIX = "realm-"


def new_key() -> str:
    """A fresh API key; show it once and store only `hash_key(key)`."""
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """``sha256:<64 hex>`` of the key's UTF-8 bytes: what the config stores."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRing:
    """Key hash -> tenant name: one dictionary probe per request."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._by_hash = {h: (h, tenant) for h, tenant in hashes.items()}

    def tenant_of(self, key: str) -> str | None:
        """The tenant that owns `key`, or None. The probe is on a hash of the key (which
        leaks nothing about stored keys); the final check is constant-time."""
        digest = hash_key(key)
        stored, tenant = self._by_hash.get(digest, ("", None))
        return tenant if tenant is not None and hmac.compare_digest(stored, digest) else None

    def __len__(self) -> int:
        return len(self._by_hash)


def add_key_to_config(path: Path, tenant: str, key_hash: str) -> bool:
    """Insert `key_hash` into tenant `tenant`'s `keys` in the TOML file at `path`, keeping
    the rest of the file as it is. Returns False (the file untouched) when the tenant is not
    in the file or the edit cannot be made safely; the caller then prints the line to add."""
    from realm.server.settings import field_lines, load_settings

    text = path.read_text(encoding="utf-8")
    try:
        settings = load_settings(path, env={})
    except InvalidArgument:
        return False
    index = next((i for i, t in enumerate(settings.tenants) if t.name == tenant), None)
    if index is None:
        return False
    lines = text.splitlines(keepends=True)
    where = field_lines(text)
    keys_line = where.get(("tenants", index, "keys"))
    header = where.get(("tenants", index))
    entry = f'"{key_hash}"'
    if keys_line is not None:
        line = lines[keys_line - 1]
        m = re.match(r"^(\s*keys\s*=\s*\[)(.*)\]\s*(#.*)?$", line.rstrip("\n"))
        if m:  # keys = [ ... ] on one line
            inner = m.group(2).strip().rstrip(",").strip()
            new_inner = f"{inner}, {entry}" if inner else entry
            lines[keys_line - 1] = f"{m.group(1)}{new_inner}]" + (f" {m.group(3)}" if m.group(3) else "") + "\n"
        elif re.match(r"^\s*keys\s*=\s*\[\s*(#.*)?$", line):  # a multi-line array: add a line
            lines.insert(keys_line, f"    {entry},\n")
        else:
            return False
    elif header is not None and lines[header - 1].strip().startswith("[[tenants]]"):
        lines.insert(header, f"keys = [{entry}]\n")
    else:
        return False
    new_text = "".join(lines)
    try:
        path.write_text(new_text, encoding="utf-8")
        check = load_settings(path, env={})
        ok = key_hash in next(t for t in check.tenants if t.name == tenant).keys
    except (InvalidArgument, StopIteration, OSError):
        ok = False
    if not ok:
        path.write_text(text, encoding="utf-8")
    return ok
