"""Per-user usage kept across restarts: ``UsageTracker`` records in a JSON file.

Without it a restart would reset every ``tokens_per_day`` count, so waiting for one
would bypass a daily quota. The file (config ``quotas.usage_file``) is read once at
start and rewritten atomically (temp file + ``os.replace``) by a daemon thread every
few seconds while something changed, and once more when the server stops: charging
a generation only sets a flag, so nothing is written on the IOLoop. A missing or
unreadable file starts the server with no recorded usage (a warning, never a crash).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.config import XllmConfig
from ..store.atomic import atomic_write_text

log = logging.getLogger("xllm_jupyter.server")

#: the file's ``version``; a file of another version is ignored with a warning
VERSION = 1
#: seconds between saves while usage changes
SAVE_INTERVAL = 5.0
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


def read_usage(path: Path) -> dict[str, dict[str, Any]]:
    """The per-user records saved in ``path``; {} when it is missing or unreadable (logged)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("users"), dict):
            raise ValueError("not an xllm usage file of version %d" % VERSION)
        users = data["users"]
        if not all(isinstance(k, str) and isinstance(v, dict) for k, v in users.items()):
            raise ValueError("malformed user records")
        return users
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("usage file %s is unreadable (%s): starting with no recorded usage", path, exc)
        return {}


def write_usage(path: Path, users: dict[str, dict[str, Any]]) -> None:
    """Replace ``path`` with ``users`` at once (readers see the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # owner-only: it names every user and their groups and usage (what /admin/usage keeps to admins)
    atomic_write_text(path, json.dumps({"version": VERSION, "users": users}, indent=1, sort_keys=True), mode=0o600)


class UsageSaver:
    """Writes ``records()`` to ``path`` from a daemon thread while ``mark()`` says it changed."""

    def __init__(self, path: Path, records: Callable[[], dict[str, dict[str, Any]]], interval: float = SAVE_INTERVAL):
        self.path = path
        self._records = records
        self._interval = interval
        self._dirty = False
        self._write_lock = threading.Lock()  # the timer and close() never write at once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xllm-usage-saver", daemon=True)
        self._thread.start()

    def mark(self) -> None:
        """Usage changed: save it with the next tick (cheap, any thread)."""
        self._dirty = True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        """Save now if anything changed since the last save; a failed write is logged and retried."""
        with self._write_lock:
            if not self._dirty:
                return
            self._dirty = False
            try:
                write_usage(self.path, self._records())
            except OSError as exc:
                self._dirty = True
                log.warning("could not save usage to %s: %s", self.path, exc)

    def close(self) -> None:
        """Stop the timer and save what is left (blocking: call it off the IOLoop)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.flush()


__all__ = ["UsageSaver", "read_usage", "usage_path", "write_usage"]
