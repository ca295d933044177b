"""``xllm run``'s thinking, as ``ollama run`` has it: ``--think``/``--hidethinking``, ``/set think|nothink``, and a
reasoning model's thinking shown before its answer between "Thinking..." and "...done thinking." (dim on a terminal)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..client.thinking import Thinking
from .render import echo, terminal_safe

THINK_HELP = ("Turn a reasoning model's thinking on (--think, --think=true), off (--think=false: the template's "
              "enable_thinking false) or set its effort (--think=high|medium|low); else the model's default.")
HIDE_HELP = "Do not show the model's thinking (the answer alone)."
OPENING, CLOSING = "Thinking...\n", "...done thinking.\n\n"
LEVELS = ("high", "medium", "low")


def think_kwargs(value: str | None) -> dict[str, Any] | None:
    """``--think``'s value as the ``chat_template_kwargs`` the server passes to the template (None: not given).

    ``enable_thinking`` is what Qwen3-style templates read; an effort level is gpt-oss's ``reasoning_effort``."""
    if value is None:
        return None
    word = value.strip().lower()
    if word in ("", "true"):
        return {"enable_thinking": True}
    if word == "false":
        return {"enable_thinking": False}
    if word in LEVELS:
        return {"enable_thinking": True, "reasoning_effort": word}
    # `--think why?` reads the prompt as the value (as `--format` would): say how the flag takes one
    raise click.BadParameter(f"{value[:60]!r} is not true, false, high, medium or low: write --think=VALUE, and a bare "
                             "--think last or before another option", param_hint="'--think'")


def set_think(words: list[str], params: dict[str, Any]) -> bool:
    """The chat's ``/set think [LEVEL]`` and ``/set nothink`` (True where ``words`` were one of them)."""
    if words[:1] == ["nothink"] and len(words) == 1:
        params["chat_template_kwargs"] = think_kwargs("false")
        click.echo("Set 'nothink' mode.", err=True)
        return True
    if words[:1] != ["think"] or len(words) > 2 or words[1:] and words[1] not in LEVELS:
        return False
    params["chat_template_kwargs"] = think_kwargs(words[1] if words[1:] else "true")
    click.echo(f"Set 'think' mode to '{words[1]}'." if words[1:] else "Set 'think' mode.", err=True)
    return True


class ThinkingView:
    """Writes one reply's pieces: its thinking under "Thinking..." (or not at all, ``hide``), then its answer."""

    def __init__(self, hide: bool = False):
        self.hide = hide
        self.styled = sys.stdout is not None and sys.stdout.isatty()  # off a terminal: plain text, as Ollama's
        self.open = False  # inside the thinking block: the next answer piece closes it first
        self.ends_line = True
        self.wrote = False  # anything on screen yet: an error line then goes under it

    def show(self, piece: str) -> None:
        """Write ``piece``: a ``Thinking`` piece inside the block (opened at its first), an answer piece after it."""
        if not piece:
            return
        if isinstance(piece, Thinking):
            if not self.hide:
                if not self.open:
                    self.open = True
                    self._write(OPENING, bold=True)
                self._write(piece)
                self.ends_line = piece.endswith("\n")
            return
        self.close()
        self.wrote = True
        echo(piece, nl=False)  # flushes, so tokens show as they come; on a tty no escape sequence acts

    def close(self) -> None:
        """End an open thinking block (the answer begins), on a line of its own."""
        if self.open:
            self._write(("" if self.ends_line else "\n") + CLOSING, bold=True)
            self.open = False

    def _write(self, text: str, bold: bool = False) -> None:
        self.wrote = True
        if self.styled:  # each piece styled and reset: Ctrl-C or an error line never inherits the dim
            click.echo(click.style(terminal_safe(text), dim=True, bold=bold or None), nl=False)
        else:
            click.echo(text, nl=False)
