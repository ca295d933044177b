"""A store's identity: a random id written once into its root, so two stores holding the same files are told apart.

``xllm rm`` asks whether the running server serves a model from the very store it removes it from (then the
requests the removal cuts hear that the model is gone). The same digest made in the same second is no answer: two
stores pulling one packaged model at once have that too. The id is random, made on first ask and never changed;
it says nothing about where the store is (a server reports it, never a path).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from .atomic import fsync_dir

log = logging.getLogger(__name__)

#: the file at the store root that holds its id
STORE_ID_NAME = "store-id"
#: 128 random bits as hex: what a valid id file holds
ID_CHARS = 32


def _valid(text: str) -> str | None:
    """The id in ``text`` (the file's content), or None when it is not one."""
    value = text.strip()
    if len(value) == ID_CHARS and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def read_store_id(home: Path) -> str | None:
    """The id recorded in store ``home``; None when it has none yet, or an unreadable or damaged one."""
    try:
        text = (Path(home) / STORE_ID_NAME).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    value = _valid(text)
    if value is None:
        log.warning("the store id file in %s is damaged: the store is taken to have no id", home)
    return value


def store_id(home: Path) -> str | None:
    """The id of the store at ``home``, made now if it has none (once: of two processes making it at the same time,
    the first to link its file wins and both return that id). None where the store cannot take one (not created
    yet, read-only, or a file system without hard links): its users then cannot tell it from another store."""
    home = Path(home)
    target = home / STORE_ID_NAME
    if target.exists():
        return read_store_id(home)
    if not home.is_dir():
        return None  # no store yet: nothing in it to compare, and asking must not create it
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{STORE_ID_NAME}.", suffix=".tmp", dir=home)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(ID_CHARS // 2) + "\n")
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from another user sharing the store
            os.fsync(f.fileno())
        # a link never replaces (a rename would: two makers would each return their own id); readers see the whole
        # file or none, as it was written and flushed under the temporary name
        os.link(tmp, target)
        fsync_dir(home)
    except FileExistsError:
        pass  # another process made it first: its id is the store's
    except OSError as exc:
        log.debug("could not give the store at %s an id: %s", home, exc)
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return read_store_id(home)


__all__ = ["STORE_ID_NAME", "read_store_id", "store_id"]
