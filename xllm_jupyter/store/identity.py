"""A store's identity: a random id written into its root, so two stores holding the same files are told apart.

``xllm rm`` asks whether the running server serves a model from the very store it removes it from (then the
requests the removal cuts hear that the model is gone). The same digest made in the same second is no answer: two
stores pulling one packaged model at once have that too. The id is random, made on first ask; it says nothing
about where the store is (a server reports it, never a path).

A copy of a store (``cp -r``, rsync, a backup restored) must not keep the id, or ``xllm rm`` in one would take a
server on the other for its own. So the id file records, beside the id, the inode numbers of itself and of the
store's directory as they were when it was made: a copy's are new, a store moved (``mv`` on one file system) or
reached through a symlink, a bind mount or another NFS client keeps them. The device number is not recorded: NFS
clients, remounts and containers number one device differently, and processes that saw one file under two numbers
would take turns remaking the id. Where the numbers do not match, the id is remade, the file replaced only if it is
still the one judged a copy. When unsure (an id file from before these numbers, a file system whose inode numbers
are not stable), a fresh id only means ``xllm rm`` tells a server on this store "retry" instead of "removed".
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .atomic import FileLock, fsync_dir

log = logging.getLogger(__name__)

#: the file at the store root that holds its id
STORE_ID_NAME = "store-id"
#: 128 random bits as hex: what a valid id is
ID_CHARS = 32
#: the second line's first word: the inode numbers of the id file and of the store directory follow
WHERE = "inodes"
#: how many times a look-up re-reads an id file that other processes replace under it
ATTEMPTS = 4


@dataclass(frozen=True)
class IdFile:
    """What a store's id file holds: the id and where it was made (None in a file from before those were written)."""

    store_id: str
    where: tuple[int, int] | None


def _valid(text: str) -> str | None:
    """The id ``text`` is, or None when it is not one."""
    value = text.strip()
    if len(value) == ID_CHARS and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def parse_id_file(text: str) -> IdFile | None:
    """The content of an id file, or None when it is damaged."""
    lines = text.splitlines()
    value = _valid(lines[0]) if lines else None
    if value is None or len(lines) > 2:
        return None
    if len(lines) == 1:
        return IdFile(value, None)  # written before the inode numbers were
    words = lines[1].split()
    if len(words) != 3 or words[0] != WHERE or not all(w.isdigit() for w in words[1:]):
        return None
    return IdFile(value, (int(words[1]), int(words[2])))


def _read(target: Path) -> tuple[IdFile | None, int | None]:
    """(the id file at ``target``, its inode number); (None, None) when there is none; (None, ino) when damaged."""
    try:
        ino = os.lstat(target).st_ino
        text = target.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, -1  # unreadable: no id, and not ours to replace
    return parse_id_file(text), ino


def read_store_id(home: Path) -> str | None:
    """The id recorded in store ``home`` (whatever made it); None when it has none yet, or an unreadable or damaged
    one."""
    found, ino = _read(Path(home) / STORE_ID_NAME)
    if found is None and ino is not None:
        log.warning("the store id file in %s is damaged: the store is taken to have no id", home)
    return found.store_id if found is not None else None


def store_id(home: Path) -> str | None:
    """The id of the store at ``home``, made now if it has none or its id file is a copy's; every process asking at
    the same time gets the one the file ends up holding. None where the store cannot take one (not created yet,
    read-only, or a file system without hard links): its users then cannot tell it from another store."""
    home = Path(home)
    target = home / STORE_ID_NAME
    for _ in range(ATTEMPTS):
        found, ino = _read(target)
        if found is None and ino is not None:
            log.warning("the store id file in %s is damaged: the store is taken to have no id", home)
            return None  # never taken for another store's, never silently replaced
        if found is None:
            if not home.is_dir():
                return None  # no store yet: nothing in it to compare, and asking must not create it
            if not _write(home, target, None):
                return None
            continue  # read back what the first maker linked
        try:
            here = (ino, home.stat().st_ino)
        except OSError:
            return None
        if found.where == here:
            return found.store_id
        # a copy's file (or one from before the inode numbers): this store takes an id of its own
        log.info("the store at %s is a copy, or its id file predates copy detection: it takes a new id", home)
        if not _write(home, target, ino):
            return None  # read-only: no telling this copy from its original
    return None  # replaced under us at every look: no id to trust now


def _write(home: Path, target: Path, stale: int | None) -> bool:
    """Make a new id file: linked in when there is none (``stale`` None: a link never replaces, so of two makers the
    first wins), else replacing the file of inode ``stale`` if it is still there; False when it cannot be written."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{STORE_ID_NAME}.", suffix=".tmp", dir=home)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            # the file's own inode number, kept by the link or rename that puts it in place
            where = (os.fstat(f.fileno()).st_ino, home.stat().st_ino)
            f.write(f"{secrets.token_hex(ID_CHARS // 2)}\n{WHERE} {where[0]} {where[1]}\n")
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide it from another user sharing the store
            os.fsync(f.fileno())
        if stale is None:
            # readers see the whole file or none, as it was written and flushed under the temporary name
            os.link(tmp, target)
        else:
            # replacers take turns: two that both saw the stale file would otherwise both replace it, and the first
            # could read back and report its id just before the second's replaced it
            with FileLock(home / "locks" / f".{STORE_ID_NAME}.lock"):  # (a dot: no model name takes it)
                if os.lstat(target).st_ino == stale:  # not replaced by another process since it was read
                    os.replace(tmp, target)
        fsync_dir(home)
    except FileExistsError:
        pass  # another process made it first: its id is the store's
    except FileNotFoundError:
        pass  # another process is replacing it: the caller reads again
    except OSError as exc:
        log.debug("could not give the store at %s an id: %s", home, exc)
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


__all__ = ["STORE_ID_NAME", "IdFile", "parse_id_file", "read_store_id", "store_id"]
