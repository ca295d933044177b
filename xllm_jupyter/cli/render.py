"""Small formatting helpers the CLI commands share (times, digests, rich consoles; sizes are in client/units.py)."""

from __future__ import annotations

import datetime as _dt
import re
import shutil
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.text import Text

#: characters a terminal acts on instead of showing: C0 but tab and newline, DEL, C1. From a model's reply
#: or a stored manifest they could clear the screen, retitle the window, write the clipboard (OSC 52), hide
#: text (CR, backspace) or spell a hyperlink (OSC 8)
_CONTROL = re.compile(r"\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _shown(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\r\n":
        return "\n"
    code = ord(char)
    return chr(0x2400 + code) if code < 0x20 else "\u2421" if code == 0x7F else "\ufffd"  # ␛ ␍ ␈ ... ␡, C1: �


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on shown as a visible symbol (``\\x1b`` as ␛)."""
    return _CONTROL.sub(_shown, text)


def echo(text: Any = "", *, nl: bool = True, err: bool = False) -> None:
    """``click.echo`` of untrusted text: made ``terminal_safe`` when it goes to a terminal, kept as is into a
    file or pipe (``xllm show --modelfile > Modelfile`` keeps every byte)."""
    stream = sys.stderr if err else sys.stdout
    text = str(text)
    click.echo(terminal_safe(text) if stream is not None and stream.isatty() else text, nl=nl, err=err)


def cell(value: Any) -> Text:
    """A table cell holding ``value`` as plain text: rich reads no markup in it (``[/x]`` raised MarkupError,
    ``[link=...]`` made a hyperlink) and no control character reaches the terminal."""
    return Text(terminal_safe(str(value)))


def markup_safe(value: Any) -> str:
    """``value`` for a rich markup string (a progress label): markup escaped, control characters shown."""
    return escape(terminal_safe(str(value)))


def stdout_console() -> Console:
    """A console on stdout; never narrower than 100 columns so tables stay readable in pipes."""
    return Console(width=max(shutil.get_terminal_size((100, 24)).columns, 100), highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    """A console on stderr, for progress bars and notes that must not mix into piped output.

    Off a terminal (a log file, CI, Binder's build log) rich assumes 80 columns, and a pull's final bars
    wrapped their sizes onto a second line ("90.9/90.9" above "MB"): such a console gets at least 120.
    """
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal and console.width < 120:
        console = Console(stderr=True, highlight=False, width=120)
    return console


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


def until(expires_at: object, now: float) -> str:
    """When a loaded model's keep_alive runs out, as ``ollama ps`` says it ("4 minutes from now", "forever")."""
    if expires_at is None:
        return "forever"
    if not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool):
        return "-"
    left = expires_at - now
    if left < 1:
        return "now"
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if left >= size:
            n = int(left // size)
            return f"{n} {unit}{'s' if n != 1 else ''} from now"
    return "now"
