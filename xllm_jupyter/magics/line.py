"""How a ``%xllm`` line splits into words: option values may be quoted, everything else stays as typed.

IPython's own splitter (``arg_split``) took ``'tis a fine day`` for an unclosed quote (an error, the model never
asked) and cut ``-s "say \\"hi\\""`` in two. Here a quote only groups when it closes: an apostrophe in prose is
a letter. Inside a quoted value ``\\"`` (or ``\\'``) is the quote itself and ``\\\\`` a backslash; any other
backslash stays as written (``"C:\\temp"``), and where that reading never closes the quote, a backslash before it
is a backslash too (``"C:\\temp\\"``, a Windows folder). Typographic quotes (``“…”``, ``‘…’``, as a text pasted
from a document has them) group a value too.

A word outside quotes is taken exactly as typed: a backslash there is a character, never an escape, so a Windows
path needs no quotes (``pull C:\\models\\x``; a POSIX shell's split made it ``C:modelsx``). A command's words are
split the same way (``key="a b"`` groups too), and a quote that opens one of its words and never closes, straight
or typographic, is the command's usage error. One exception, in a command's words: where IPython's Tab completion
writes a path with a backslash before a space or a character a shell would take (``pull ~/my\\ models``, on Linux
and macOS; on Windows it quotes the path instead), that backslash escapes the character, as a shell's split had it.
A backslash before a backslash or a letter stays (``\\\\server\\share``, ``C:\\models``).
"""

from __future__ import annotations

import os

from ..core.errors import XllmError

#: what a backslash outside quotes escapes in a command's words, on Linux and macOS: a space and each other character
#: IPython's completer protects so (``my\\ \\(copy\\)``), but the backslash itself (``\\\\server\\share`` stays
#: a UNC path); on Windows none (``pull C:\\models\\x\\ --name x``: a folder, then an option)
_ESCAPED = frozenset("" if os.name == "nt" else " \t()[]{}?=|;:'#*\"^&")

_QUOTES = "'\""
#: each opening quote and the quote that closes it
_CLOSING = {"'": "'", '"': '"', "\u201c": "\u201d", "\u2018": "\u2019"}


class Word(str):
    """One word of a line: its value, with the text it was typed as (``raw``) and where (``start``, ``end``)."""

    raw: str
    start: int
    end: int
    unclosed: bool  # it opens with a quote that the rest of the line never closes

    def __new__(cls, value: str, raw: str, start: int, end: int, unclosed: bool = False) -> Word:
        word = super().__new__(cls, value)
        word.raw, word.start, word.end, word.unclosed = raw, start, end, unclosed
        return word

    def but(self, value: str) -> Word:
        """The same typed word standing for ``value`` (a filled ``{name}``, its quotes taken off)."""
        return Word(value, self.raw, self.start, self.end, self.unclosed)


def _quoted(line: str, i: int, escapes: bool = True) -> tuple[str, int] | None:
    """(value, end) of the quoted text at ``line[i]``, when its quote closes before a space or the end."""
    quote, j, value = _CLOSING[line[i]], i + 1, []
    while j < len(line):
        c = line[j]
        if escapes and c == "\\" and j + 1 < len(line) and line[j + 1] in (quote, "\\"):
            value.append(line[j + 1])
            j += 2
        elif c == quote:
            if j + 1 == len(line) or line[j + 1].isspace():
                return "".join(value), j + 1
            return None  # `"a"b`: not one quoted value; the word is taken as typed
        else:
            value.append(c)
            j += 1
    return None


def words(line: str, settings: bool = False) -> list[Word]:
    """The line's words; a quoted word's value is its text without the quotes (``--opt="a b"`` too, and with
    ``settings`` a command's ``key="a b"``)."""
    out: list[Word] = []
    i, n = 0, len(line)
    while i < n:
        if line[i].isspace():
            i += 1
            continue
        start = i
        # `--system="a b"`, `-s"terse"`: the quoted part may follow an option's `=`, or a short option's letter
        # (a word that opens with a quote is that quote's: `"a='b c'"`, as join writes a value with `='` in it)
        if (line[i] == "-" or settings and line[i] not in _CLOSING) and (eq := line.find("=", i, _plain_end(line, i))) > 0 and eq + 1 < n and line[eq + 1] in _CLOSING:
            prefix, i = line[start:eq + 1], eq + 1
        elif line[i] == "-" and i + 2 < n and line[i + 1] not in "-" + _QUOTES and not line[i + 1].isspace() and line[i + 2] in _CLOSING:
            prefix, i = line[start:i + 2], i + 2
        else:
            prefix = ""
        found = (_quoted(line, i) or _quoted(line, i, escapes=False)) if line[i] in _CLOSING else None
        if found is not None:
            value, end = found
            out.append(Word(prefix + value, line[start:end], start, end))
        else:
            end = _plain_end(line, i, settings)
            # a typographic quote too: `-s “Be brief. Hi` is as open as `-s "Be brief. Hi`
            unclosed = line[i] in _CLOSING and line.find(_CLOSING[line[i]], i + 1) < 0
            value = _unescaped(line[start:end]) if settings else line[start:end]
            out.append(Word(value, line[start:end], start, end, unclosed))
        i = end
    return out


def command_words(line: str) -> list[str]:
    """A command line's words (``pull C:\\models\\x``, ``pull "my dir"``, ``config system='a b'``); a quote that
    opens a word and never closes is a usage error (XllmError)."""
    found = words(line, settings=True)
    for word in found:
        if word.unclosed:
            raise XllmError(f"cannot parse the command: the quote that opens {word.raw}… never closes")
    return [str(word) for word in found]


def quote(word: str) -> str:
    """``word`` as :func:`command_words` reads it back: as typed where it can be (``C:\\models\\x`` keeps its
    backslashes), else in double quotes with ``\\`` and ``\"`` escaped."""
    if word and not any(c.isspace() or c in _CLOSING for c in word) and _unescaped(word) == word and not word.endswith("\\"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def join(words: list[str]) -> str:
    """A command line whose :func:`command_words` are ``words``."""
    return " ".join(quote(word) for word in words)


def _plain_end(line: str, i: int, escapes: bool = False) -> int:
    """Where the unquoted word at ``line[i]`` ends (with ``escapes``, ``\\ `` does not end it)."""
    while i < len(line) and not line[i].isspace():
        i += 2 if escapes and line[i] == "\\" and line[i + 1:i + 2] in _ESCAPED else 1
    return i


def _unescaped(text: str) -> str:
    """A command's unquoted word without the backslashes that escape a character (``my\\ models``)."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in _ESCAPED:
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)
