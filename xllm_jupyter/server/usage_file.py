"""Per-user usage kept across restarts: ``UsageTracker`` records in a JSON file.

Without it a restart would reset every ``tokens_per_day`` count, so waiting for one
would bypass a daily quota. The file (config ``quotas.usage_file``) is read once at
start and rewritten atomically (temp file + ``os.replace``) by a daemon thread every
few seconds while something changed, and once more when the server stops: charging
a generation only sets a flag, so nothing is written on the IOLoop. A missing or
unreadable file starts the server with no recorded usage (a warning, never a crash).

Several servers may share one file (``xllm serve`` and the Jupyter extension on one
home): each save takes a lock beside it, reads it, and writes what is there plus this
server's counts since its last save (``merge_usage``), which the server adopts too, so
neither loses the other's counts and each sees the other's at its next save or tick.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.config import XllmConfig
from ..store.atomic import FileLock, atomic_write_text

log = logging.getLogger("xllm_jupyter.server")

#: the file's ``version``; a file of another version is ignored with a warning
VERSION = 1
#: seconds between saves while usage changes
SAVE_INTERVAL = 5.0
#: seconds a save waits for another process's save to let go of the file's lock: a holder stuck for good (a hung
#: process, a dead NFS server) must not hang this server's saves, nor its shutdown; the counts wait for the next save
LOCK_WAIT = 10.0
#: the file name under ``store.home`` that ``usage_file: auto`` uses
DEFAULT_NAME = "usage.json"


def usage_path(config: XllmConfig, *, shared: bool = False) -> Path | None:
    """Where this server keeps its usage, or None when it keeps none.

    ``auto`` persists when a daily token quota is configured or the server is ``shared``
    (the hub service); ``off`` or "" never does; anything else is the file's path.
    """
    value = config.quotas.usage_file.strip()
    if value.lower() in ("", "off"):
        return None
    if value.lower() != "auto":
        return Path(value).expanduser()
    q = config.quotas
    daily = bool(q.tokens_per_day or q.user_tokens_per_day or q.group_tokens_per_day)
    return config.store.home / DEFAULT_NAME if daily or shared else None


#: the counts a record adds up (``rejected`` too, per reason); ``tokens_today`` counts for its ``day`` only
COUNTS = ("requests", "prompt_tokens", "completion_tokens")
Records = dict[str, dict[str, Any]]


def read_usage(path: Path) -> Records:
    """The per-user records saved in ``path``; {} when it is missing or unreadable (logged)."""
    saved = read_saved(path)
    return {} if saved is None else saved


def read_saved(path: Path) -> Records | None:
    """The per-user records saved in ``path``; None when it is missing or unreadable (logged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("users"), dict):
            raise ValueError("not an xllm usage file of version %d" % VERSION)
        users = data["users"]
        if not all(isinstance(k, str) and isinstance(v, dict) for k, v in users.items()):
            raise ValueError("malformed user records")
        return users
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("usage file %s is unreadable (%s): this server's counts replace it", path, exc)
        return None


def _count(rec: dict[str, Any] | None, key: str) -> int:
    value = (rec or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _today(rec: dict[str, Any] | None, today: str) -> int:
    return _count(rec, "tokens_today") if (rec or {}).get("day") == today else 0


def _rejected(rec: dict[str, Any] | None) -> dict[str, int]:
    value = (rec or {}).get("rejected")
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, int)} if isinstance(value, dict) else {}


def merge_usage(disk: Records, base: Records, mine: Records, today: str) -> Records:
    """``disk`` plus what ``mine`` added to ``base`` (what this server last saved or read), per user.

    Counts add up (a day's tokens only within ``today``: an older day's are dropped); a user's
    groups and name are this server's where they changed here, else the file's. A user in
    ``base`` and no longer in ``mine`` was moved to another key here (``UsageTracker.admit``); one in
    ``base`` and no longer on ``disk`` was moved by another server, and stays gone unless it was counted here since.
    """
    out: Records = {}
    for user in disk.keys() | mine.keys():
        d, b, m = disk.get(user), base.get(user), mine.get(user)
        if m is None and b is not None:
            continue
        rec = dict(d if m is None else m)
        for key in COUNTS:
            rec[key] = max(0, _count(d, key) + _count(m, key) - _count(b, key))
        tokens = max(0, _today(d, today) + _today(m, today) - _today(b, today))
        rec["day"], rec["tokens_today"] = (today, tokens) if tokens else ("", 0)
        rejected = _rejected(d)
        for reason, n in _rejected(m).items():
            rejected[reason] = max(0, rejected.get(reason, 0) + n - _rejected(b).get(reason, 0))
        rec["rejected"] = rejected
        for key in ("groups", "name"):
            if d is not None and (m is None or m.get(key) == (b or {}).get(key)):
                rec[key] = d.get(key)  # not changed here: another server may have seen the user since
        if d is None and b is not None and not (any(rec[k] for k in COUNTS) or rec["tokens_today"] or any(rejected.values())):
            continue
        out[user] = rec
    return out


def write_usage(path: Path, users: dict[str, dict[str, Any]]) -> None:
    """Replace ``path`` with ``users`` at once (readers see the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # owner-only: it names every user and their groups and usage (what /admin/usage keeps to admins)
    atomic_write_text(path, json.dumps({"version": VERSION, "users": users}, indent=1, sort_keys=True), mode=0o600)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """Which version of ``path`` is there (a replace makes a new inode), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class UsageSaver:
    """Saves ``records()`` to ``path`` from a daemon thread while ``mark()`` says it changed, merged with the file.

    ``adopt(disk, base)`` makes the server's counts the file's plus its own since ``base`` (its
    last save); a tick with nothing to save still adopts the file when another server replaced it.
    """

    def __init__(self, path: Path, records: Callable[[], Records], adopt: Callable[[Records, Records], None],
                 stamp: tuple[int, int, int] | None = None, interval: float = SAVE_INTERVAL):
        self.path = path
        self._records = records
        self._adopt = adopt
        self._base = records()  # what the server read at start
        self._stamp = stamp  # the file's version it read then
        self._lock_path = path.with_name(f".{path.name}.lock")
        self._interval = interval
        self._dirty = False
        self._flag_lock = threading.Lock()  # mark() and flush()'s taking of the flag
        self._write_lock = threading.Lock()  # the timer and close() never write at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xllm-usage-saver", daemon=True)
        self._thread.start()

    def mark(self) -> None:
        """Usage changed: save it with the next tick (cheap, any thread)."""
        with self._flag_lock:
            self._dirty = True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        """Save now if anything changed since the last save (or adopt another server's save); failures are logged."""
        with self._write_lock:
            if not self._dirty and file_stamp(self.path) in (self._stamp, None):
                return
            with self._flag_lock:  # (a mark() after the check above is taken here and saved, never cleared unsaved)
                dirty, self._dirty = self._dirty, False
            lock = FileLock(self._lock_path)  # another server's save waits: neither writes over the other's counts
            try:
                if not lock.acquire(timeout=LOCK_WAIT):
                    raise TimeoutError(f"another process has held {self._lock_path.name} for {LOCK_WAIT:g} s")
                try:
                    disk = read_saved(self.path)
                    if disk is not None:  # missing or corrupt: this server's counts replace it, as they always did
                        self._adopt(disk, self._base)
                        self._base = disk  # (the server's counts less it: what it has not saved yet)
                    if dirty:
                        saved = self._records()
                        write_usage(self.path, saved)
                        self._base = saved
                    self._stamp = file_stamp(self.path)
                finally:
                    lock.release()
            except OSError as exc:  # (TimeoutError too) kept: the next save merges them
                with self._flag_lock:
                    self._dirty = self._dirty or dirty
                log.warning("could not save usage to %s: %s", self.path, exc)

    def close(self) -> None:
        """Stop the timer and save what is left (blocking: call it off the IOLoop)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.flush()
        if self._dirty:  # (the warning said why): no later save will merge them now
            log.error("the usage counts since the last save to %s were not saved", self.path)


__all__ = ["UsageSaver", "file_stamp", "merge_usage", "read_saved", "read_usage", "usage_path", "write_usage"]
