"""Small formatting helpers the CLI commands share (times, digests, rich consoles; sizes are in client/units.py)."""

from __future__ import annotations

import datetime as _dt
import shutil

from rich.console import Console


def stdout_console() -> Console:
    """A console on stdout; never narrower than 100 columns so tables stay readable in pipes."""
    return Console(width=max(shutil.get_terminal_size((100, 24)).columns, 100), highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    """A console on stderr, for progress bars and notes that must not mix into piped output."""
    return Console(stderr=True, highlight=False)


def human_time(value: object) -> str:
    """A timestamp (epoch seconds, datetime or ISO string) as "YYYY-MM-DD HH:MM"."""
    if value in (None, "", 0):
        return "-"
    try:
        if isinstance(value, (int, float)):
            when = _dt.datetime.fromtimestamp(value)
        elif isinstance(value, _dt.datetime):
            when = value
        else:
            when = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return str(value)
    if when.tzinfo is not None:
        when = when.astimezone()
    return when.strftime("%Y-%m-%d %H:%M")


def short_digest(digest: str | None, n: int = 12) -> str:
    """The first ``n`` hex digits of a digest (``sha256:`` prefix dropped)."""
    if not digest:
        return "-"
    return digest.split(":", 1)[-1][:n]
