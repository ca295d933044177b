"""``xllm run``'s thinking, as ``ollama run`` has it: ``--think``/``--hidethinking``, ``/set think|nothink``, and a
reasoning model's thinking shown before its answer between "Thinking..." and "...done thinking." (dim on a terminal)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..client.thinking import Thinking
from .render import echo, terminal_safe

THINK_HELP = ("Turn a reasoning model's thinking on (--think, --think=true), off (--think=false: the template's "
              "enable_thinking false) or set its effort (--think=high|medium|low); else the model's default. A word after "
              "a bare --think that is none of these begins the prompt.")
HIDE_HELP = "Do not show the model's thinking (the answer alone)."
OPENING, CLOSING = "Thinking...\n", "...done thinking.\n\n"
LEVELS = ("high", "medium", "low")
#: what ``--think VALUE`` (a space, no ``=``) takes as its value; any other word there is the prompt's
VALUES = ("", "true", "false", *LEVELS)


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
    raise click.BadParameter(f"{value[:60]!r} is not true, false, high, medium or low", param_hint="'--think'")


def bare_think(args: list[str], params: list[click.Parameter]) -> list[str]:
    """``args`` with each bare ``--think`` followed by a word that is no value of it (``--think why?``) made
    ``--think=true``, so the word stays the prompt's, as in `ollama run` (click took it as the value: a usage error).

    ``params`` are the command's: the word after an option that takes a value is that value (``-s --think``), and
    everything after ``--`` is the prompt's."""
    valued = {opt for p in params if isinstance(p, click.Option) and not p.is_flag and p.name != "think" for opt in p.opts}
    out, i = list(args), 0
    while i < len(out) and out[i] != "--":
        if out[i] in valued:
            i += 1  # its value, whatever it reads
        elif out[i] == "--think" and (i + 1 == len(out) or out[i + 1].strip().lower() not in VALUES):
            out[i] = "--think=true"
        i += 1
    return out


class ThinkCommand(click.Command):
    """A command with ``--think``, an option whose value is optional: see ``bare_think``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse ``args`` once a bare ``--think`` has left the prompt's first word alone."""
        return super().parse_args(ctx, bare_think(args, self.params))


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
