"""Which ``%xllm`` lines are commands: each verb's shape, and its lines of ``%xllm help``.

Every verb also begins everyday prompts ("help me write…", "use a metaphor…", "list three colours…"), so a
line is a command only when what follows the verb has that verb's shape: its options, and at most its
number of operands, each of its kind (a model name, a pull source, a server address, ``key=value``). Any
other line is a prompt. ``%xllm -- TEXT`` (and a ``%%xllm`` cell) is always a prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .line import words
from .session import CONFIG_KEYS

#: `name` or `name:tag`, as the store spells model names (README); nothing with spaces, quotes or `?`. A `/` is
#: taken too: `use HuggingFaceTB/SmolLM2-135M-Instruct` (a pull's source, not the name it was stored under) is meant
#: as a command, and its error names `%xllm list`, where the model went to the model as a prompt
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*(:[A-Za-z0-9._-]+)?")
#: what `pull` takes: a packaged name, a Hugging Face repo id or URL, a path (a quoted one may hold spaces); one word
#: with `?` or a quote in it is prose ("pull Bob's?"); a quoted path with spaces starts as a path does (`./`, `~/`, `/`,
#: `C:\\`, `\\`)
_SOURCE = re.compile(r"[^\s?'\"]+|([~./\\]|[A-Za-z]:[\\/])[^?]*")
#: what `connect` takes: a URL, `host:port`, `localhost`, an IP address (a bare DNS name needs a scheme or a
#: port, so "connect everything" stays a prompt); a URL of another scheme too, which connect refuses by name
_ADDRESS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|(localhost|[\w-]+(\.[\w-]+)*:\d+|\d{1,3}(\.\d{1,3}){3}(:\d+)?|\[[0-9A-Fa-f:.]+\]:\d+)(/\S*)?")
#: `key=value` of `config` (the key is checked by the command, which names the settings)
_SETTING = re.compile(r"[A-Za-z_][\w-]*=.*", re.S)
_HELP = frozenset({"-h", "--help"})
#: a `{name}` the notebook lacks, left as written (`use {model}` after a kernel restart): the operand it stands for,
#: so the command says what it got, where the line went to the model as a prompt
_UNFILLED = re.compile(r"\{[A-Za-z_][^{}\s]*\}")
#: the terminal-only verbs take the terminal's global options: a line with `--api-key KEY` that missed the
#: shape went to the model, key and all
_TERMINAL = frozenset({"--url", "--api-key"})


@dataclass(frozen=True)
class Shape:
    """What may follow a verb for the line to be that command."""

    operands: int  # most operands; -1: any number
    operand: re.Pattern[str] | None = None  # what each operand must fully match
    options: frozenset[str] = frozenset()  # options that take a value (`--name N`, `--name=N`)
    flags: frozenset[str] = frozenset()  # options without one
    optional: frozenset[str] = frozenset()  # options whose value may be left out (`--token [TOKEN]`)

    def fits(self, words: list[str]) -> bool:
        """Whether ``words`` (the line after the verb) are this shape's options and operands."""
        left = self.operands
        i = 0
        while i < len(words):
            word = words[i]
            name, eq, _ = word.partition("=")
            if word in self.flags or word in _HELP or (eq and name in self.options | self.optional):
                i += 1
            elif word in self.options and i + 1 < len(words):
                i += 2
            elif word in self.optional:
                i += 2 if i + 1 < len(words) else 1  # as argparse reads it: the next word is the value
            # `use ''`: an empty operand is the command's (its usage error), not a prompt "use ''" for the model
            elif left != 0 and self.operand is not None and (not word or self.operand.fullmatch(word) or _UNFILLED.fullmatch(word)):
                left -= 1
                i += 1
            else:
                return False
        return True


#: every verb `%xllm` knows
VERBS = ("list", "ps", "status", "load", "unload", "stop", "show", "run", "rm", "use", "pull", "connect", "config", "help",
         "create", "cp", "serve", "hub-service")
_MODEL = Shape(1, MODEL_NAME)
_ALONE = Shape(0)

#: what follows each verb on a command line
SHAPES: dict[str, Shape] = {
    "list": _ALONE, "ps": _ALONE, "status": _ALONE,
    "load": _MODEL, "unload": _MODEL, "stop": _MODEL, "show": _MODEL, "run": _MODEL, "use": _MODEL,
    "rm": Shape(-1, MODEL_NAME),  # several, as `xllm rm A B C`
    "pull": Shape(1, _SOURCE, frozenset({"--name", "--revision", "--base"}), frozenset({"--force", "--convert"})),
    "connect": Shape(1, _ADDRESS, optional=frozenset({"--token"})),
    "config": Shape(-1, _SETTING),
    "help": Shape(1, re.compile("|".join(map(re.escape, VERBS)))),
    "create": Shape(1, MODEL_NAME, frozenset({"-f", "--file"}) | _TERMINAL),
    "cp": Shape(2, MODEL_NAME, _TERMINAL),
    "serve": Shape(0, None, frozenset({"--host", "--port", "-m", "--model", "--api-key"})),
    "hub-service": _ALONE,
}
#: verbs whose command only says what to run at a terminal instead (their --help is the terminal's)
TERMINAL_ONLY = frozenset({"create", "cp", "serve", "hub-service"})

#: (the verbs an entry is about, its lines)
_ENTRIES: tuple[tuple[tuple[str, ...], str], ...] = (
    ((), "%%xllm [-m MODEL] [-s SYSTEM] [-t TEMPERATURE] [--max-tokens N] [-f markdown|code|json|text]\n"
         "       [--out VAR] [--no-stream] [--seed N] [--chat | --new]      ask; {var} is filled from the notebook"),
    ((), "%xllm [options] PROMPT                  the same on one line\n"
         "%xllm [options] -- PROMPT               always a prompt, even one that starts with a command"),
    (("list",), "%xllm list                              models the server can serve"),
    (("ps",), "%xllm ps                                models in memory now"),
    (("load", "unload", "stop"), "%xllm load MODEL / unload MODEL         load or unload on the server (stop MODEL: unload, "
                                 "as xllm stop)"),
    (("show",), "%xllm show MODEL                        one model's details: task, backend, digest, source, how it runs"),
    (("pull",), "%xllm pull SOURCE [--name N] [--force] [--revision R] [--convert] [--base MODEL]\n"
                "                                        add a model to the server's store (progress bar;\n"
                "                                        --base: the stored model a LoRA adapter applies to)\n"
                "                                        a path unquoted keeps its backslashes (C:\\models\\x); quote\n"
                "                                        one with spaces (\"C:\\my models\\x\"; in quotes \\\" is a quote)"),
    (("rm",), "%xllm rm MODEL...                       remove models from the server's store, in order (admins; as\n"
              "                                        xllm rm, the first that fails stops it; a name the server\n"
              "                                        does not know stops it before any goes)"),
    (("create", "cp", "serve", "run", "hub-service"),
     "%xllm create / cp / serve / run         terminal-only: says what to run instead (hub-service too)"),
    (("use",), "%xllm use [MODEL]                       default model for this notebook (no MODEL: show it)"),
    (("status",), "%xllm status                            which server, how it was found, what is loaded"),
    (("connect",), "%xllm connect [URL] [--token [TOKEN]]   use another server (no TOKEN after --token: asked for)"),
    (("config",), "%xllm config [key=value ...]            show or set defaults: " + ", ".join(CONFIG_KEYS)),
    (("help",), "%xllm help [COMMAND]                    this help, or one command's\n"
                "A line is a command only in that command's shape (`use MODEL`, `help`, `connect URL`...); "
                "any other line is a prompt."),
)
HELP = "\n".join(text for _, text in _ENTRIES)


def help_for(verb: str) -> str:
    """The help lines about ``verb`` (all of them for an unknown one)."""
    lines = [text for verbs, text in _ENTRIES if verb in verbs]
    return "\n".join(lines) if lines else HELP


def split(line: str) -> list[str]:
    """A line's words as the command reads them (`-f 'my dir/Modelfile'` is one, `C:\\models\\x` keeps its
    backslashes); an apostrophe in a prompt ("show me Bob's poem") is a letter."""
    return [str(word) for word in words(line, settings=True)]


def is_command(line: str) -> bool:
    """Whether a ``%xllm`` line (no cell) runs a command rather than asking the model."""
    words = split(line)
    if not words:
        return True  # an empty line shows the help
    shape = SHAPES.get(words[0])
    return shape is not None and shape.fits(words[1:])
