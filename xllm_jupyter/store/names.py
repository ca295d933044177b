"""Model names: validation, normalisation, and the one safe mapping from a name to a directory.

A name is ``base`` or ``base:tag``; both parts are lower-case ASCII letters, digits,
``.``, ``_`` and ``-``, starting with a letter or digit and not ending with ``.``; as in
Ollama, ``base:latest`` is ``base``. Input is matched before it is lower-cased, so Unicode
that lower-cases into ASCII (the Kelvin sign, dotted capital I) never slips through. On disk ``:`` becomes ``@``, a character no name may contain, so
the mapping is one-to-one and the directory can never be ``.``, ``..`` or contain a
separator.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ..core.errors import InvalidModelName, StoreError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(?::[A-Za-z0-9][A-Za-z0-9._-]{0,31})?", re.ASCII)
_DIRNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}(?:@[a-z0-9][a-z0-9._-]{0,31})?", re.ASCII)
# Device names Windows refuses as file names, whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
TAG_SEPARATOR_ON_DISK = "@"
#: the tag a name without one stands for; validate_name drops it (``llama3:latest`` is ``llama3``)
LATEST_TAG = ":latest"
#: no valid name is longer (base 64, ":" and tag 32): canonical_name remembers no longer spelling
_LONGEST_NAME = 64 + 1 + 32


def validate_name(name: object) -> str:
    """The normalised (lower-case) form of ``name``; InvalidModelName if it is not allowed."""
    if not isinstance(name, str) or not name.isascii() or not _NAME.fullmatch(name):
        raise InvalidModelName(str(name)[:100])
    if ".." in name or any(part.endswith(".") for part in name.split(":")):
        # Windows drops a trailing dot from a file name: "x." and "x" would share one directory there
        raise InvalidModelName(name)
    base = name.split(":", 1)[0].lower()
    if base.split(".", 1)[0] in _RESERVED:
        raise InvalidModelName(name)
    # as in Ollama, a name without a tag is its ":latest": one spelling, so both reach the same model
    return name.lower().removesuffix(LATEST_TAG)


def canonical_name(name: str) -> str:
    """The one spelling of ``name`` (names are case-insensitive); a name that is not valid comes back as is,
    for the lookup to fail with "not found"."""
    # only exact str short enough to be valid is remembered: a request's model field may hold megabytes,
    # and 1,024 remembered ones would keep gigabytes alive
    if type(name) is str and len(name) <= _LONGEST_NAME:
        return _canonical_str(name)
    try:
        return validate_name(name)
    except InvalidModelName:
        return name


@functools.lru_cache(maxsize=1024)  # bounded: every request's own spelling passes here
def _canonical_str(name: str) -> str:
    # a request's model name is canonicalised ~9 times on its way to the runner (serving, engine,
    # loading, validation), 3-5 µs each through the regex and the checks: ~40 µs of IOLoop per request
    try:
        return validate_name(name)
    except InvalidModelName:
        return name


def is_valid_name(name: object) -> bool:
    """True when ``validate_name`` accepts ``name``."""
    try:
        validate_name(name)
    except InvalidModelName:
        return False
    return True


def default_name(raw: str) -> str:
    """A valid name made from a repo, directory or file name (``My Model.v2`` -> ``my-model.v2``)."""
    text = raw.encode("ascii", "ignore").decode().lower()
    text = re.sub(r"[^a-z0-9._-]+", "-", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = text.lstrip("._-")[:64].rstrip("._-")
    try:
        return validate_name(text)
    except InvalidModelName:
        raise StoreError(f"Cannot derive a model name from {raw[:80]!r}: pass one with name=...", param="name") from None


def name_to_dirname(name: str) -> str:
    """The directory name a (valid) model name is stored under."""
    return validate_name(name).replace(":", TAG_SEPARATOR_ON_DISK)


def dirname_to_name(dirname: str) -> str | None:
    """The model name stored in directory ``dirname``, or None if it is not a model directory name."""
    if not _DIRNAME.fullmatch(dirname):
        return None
    name = dirname.replace(TAG_SEPARATOR_ON_DISK, ":")
    return name if is_valid_name(name) and name_to_dirname(name) == dirname else None


def contained(root: Path, path: Path) -> Path:
    """``path`` resolved, after checking it stays inside ``root`` (resolved); StoreError otherwise."""
    real_root = root.resolve()
    real = path.resolve()
    if real == real_root or not real.is_relative_to(real_root):
        raise StoreError("Refusing a path that leaves the model store")
    return real


def child_dir(root: Path, dirname: str) -> Path:
    """``root/dirname``, checked to be a direct child of ``root`` that is not a symbolic link."""
    if not dirname or "/" in dirname or "\\" in dirname or dirname in (".", "..") or "\x00" in dirname:
        raise StoreError("Refusing a path that leaves the model store")
    path = root / dirname
    if path.is_symlink():
        raise StoreError(f"The store entry '{dirname}' is a symbolic link; refusing to follow it")
    real = contained(root, path)
    if real.parent != root.resolve():
        raise StoreError("Refusing a path that leaves the model store")
    return path


def safe_relpath(rel: str) -> str:
    """``rel`` if it is a clean relative POSIX path (no ``..``, no absolute, no backslash); else StoreError."""
    parts = rel.split("/")
    if (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or any(p in ("", ".", "..") for p in parts)
        or re.match(r"^[A-Za-z]:", rel)
    ):
        raise StoreError(f"Unsafe file path in model: {rel[:100]!r}")
    return rel
