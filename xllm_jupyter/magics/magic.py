"""``%%xllm`` / ``%xllm``: ask the shared engine from a notebook, and manage its models.

The magics are a thin front-end: they find the server through ``client.discovery``
(the extension's ``XLLM_BASE_URL``, the JupyterHub service, ``%xllm connect``, else a
private server for this kernel) and talk to it over HTTP. They never import the server
or the engine. Every failure is one short ``xllm: ...`` line on stderr.
"""

from __future__ import annotations

import keyword
import logging
import math
import re
import textwrap
from argparse import ArgumentTypeError
from typing import Any

from IPython.core.error import UsageError
from IPython.core.inputtransformer2 import make_tokens_by_line
from IPython.core.magic import Magics, line_cell_magic, magics_class, needs_local_scope, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ..client.base import can_chat, listed
from ..core.errors import AuthenticationError, ModelNotFound, XllmError
from .ask import Question, ask
from .commands import Commands
from .interp import Filler, interpolate
from .line import Word, join, words
from .render import FORMATS, Reply, error
from .session import MagicState
from .verbs import SHAPES, is_command, split

log = logging.getLogger("xllm_jupyter.magics")


def _finite(text: str) -> float:
    """``-t``'s value: a finite number (``float`` takes "nan" and "inf", which no request can carry)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def _whole(text: str) -> int:
    """``--max-tokens``' and ``--seed``'s value: an integer (quoted or not: the line's split takes quotes off)."""
    try:
        return int(text)
    except ValueError:
        raise ArgumentTypeError(f"invalid int value: {text!r}") from None


def _at_least_one(text: str) -> int:
    """``--max-tokens``' value: a whole number of at least 1, refused on the spot as ``config max_tokens=0`` is
    (0 or -1 went to the server, whose 400 came only after the request)."""
    value = _whole(text)
    if value < 1:
        raise ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


@magics_class
class XllmMagics(Magics):
    """``%%xllm`` (cell) and ``%xllm`` (line): chat with the shared xllm engine, manage its models."""

    def __init__(self, shell: Any = None, **kw: Any):
        super().__init__(shell, **kw)
        self.state = MagicState()
        self.commands = Commands(shell, self.state)

    # IPython's own expansion of the line ate a prompt's `$` ("$20" became "20", "$HOME" a variable) and split a
    # `-s {persona}` into words: `{name}` is filled here instead, in each option value and the prompt, from the
    # notebook's variables and (a `%xllm` line in a function) the caller's locals
    @no_var_expand
    @needs_local_scope
    @magic_arguments()
    @argument("-m", "--model", help="Model name (default: %%xllm use / XLLM_MODEL, else a loaded chat model, else the server's default).")
    @argument("-s", "--system", help="System prompt.")
    @argument("-t", "--temperature", type=_finite, help="Sampling temperature (0 = greedy).")
    @argument("--max-tokens", type=_at_least_one, help="Most tokens to generate.")
    @argument("-f", "--format", choices=FORMATS, help="How to show the answer: markdown (default), code, json (constrained and validated) or text.")
    @argument("-o", "--out", metavar="VAR", help="Also store the answer in this variable (json: the parsed value; code: the code).")
    @argument("--no-stream", action="store_true", help="Show the answer once it is complete.")
    @argument("--seed", type=_whole, help="Sampling seed (default: a random one, recorded in the output's metadata).")
    @argument("--chat", action="store_true", help="Continue this notebook's conversation.")
    @argument("--new", action="store_true", help="Start a new conversation with this cell (continue it with --chat).")
    @argument("prompt", nargs="*", help="Prompt (line magic); in %%xllm it leads the cell body.")
    @line_cell_magic
    def xllm(self, line: str, cell: str | None = None, local_ns: dict[str, Any] | None = None) -> None:
        """Ask the model (``{var}`` is filled from the notebook), or run ``%xllm <command>`` (``%xllm help``)."""
        # each `{name}` looked up once, however often the line is read (as a command, then as a question)
        fill = Filler({**(self.shell.user_ns if self.shell else {}), **(local_ns or {})})
        try:
            command = None if cell is not None else _command_line(line, fill)
            if command is None and cell is None and line.strip() in ("-h", "--help"):
                command = "help"  # as `%xllm help` (argparse's own help is off: `-h` was an unknown option)
            # `%xllm pull 'unclosed`: a verb's line with an open quote gets the verb's error, not an answer
            if command is not None and (is_command(command) or _open_quote(line)):
                self.commands.run(command)
                return
            try:
                args = self.xllm.parser.parse_args(self._argv(line, fill))
            except UsageError as exc:  # argparse's usage problems: keep them short
                if command is not None and _meant_as_command(command, exc):
                    self.commands.run(command)
                    return
                message = str(exc).strip() or "bad options (see %xllm help)"
                if "unrecognized arguments" in message:  # `%xllm what does ls -la do?`: a prompt's word, not an option
                    message += " (`%xllm help` lists the options; a prompt with words that start with `-`: `%xllm -- PROMPT`)"
                raise XllmError(message) from None
            try:
                self._ask(args, fill(_typed(line, args.prompt)), None if cell is None else fill(cell))
            except ModelNotFound as exc:  # `-m nosuch`, a `use` model since removed: name what there is
                raise XllmError(exc.message + self._chat_models()) from None
        except AuthenticationError as exc:  # a wrong key: say where this kernel's came from, and how to give another
            # `%xllm connect URL --token T` says whose token itself; a prompt such as "connect the dots" gets the hint
            connecting = cell is None and split(line)[:1] == ["connect"] and is_command(line)
            error(exc.message + ("" if connecting else self._key_hint()))
        except XllmError as exc:
            error(exc.message)
        except KeyboardInterrupt:
            error("interrupted")
        except UnicodeEncodeError as exc:  # `%xllm use {name}` whose text has a lone surrogate: no URL can carry it
            error(f"the line has text that is not valid Unicode ({exc.object[exc.start:exc.end]!r}, an undecodable "
                  "byte kept by errors='surrogateescape'?): decode it as UTF-8 first")
        except Exception as exc:  # a bug or an unexpected reply: one line here, the traceback in the log
            log.debug("xllm magic failed", exc_info=True)
            error(f"unexpected error ({type(exc).__name__}): {exc}")

    def _key_hint(self) -> str:
        """`` (the key came from XLLM_API_KEY: ...)`` for a 401's error line."""
        where = {"extension": "XLLM_API_KEY", "hub": "this kernel's JupyterHub token (JUPYTERHUB_API_TOKEN)",
                 "connect": "%xllm connect / xllm_jupyter.connect()"}.get(self.state.location.source if self.state.location else "")
        came = f"the key came from {where}; " if where else ""
        return f" ({came}`%xllm connect URL --token` asks for another)"

    def _chat_models(self) -> str:
        """`` — chat models: a, b (...)`` for an error line; empty when the server cannot say."""
        try:
            names = [str(m["id"]) for m in self.state.client().models() if m.get("id") and can_chat(m)]
        except XllmError:
            return ""
        if not names:
            return " — the server has no chat model: `%xllm pull smollm2` adds one"
        return f" — chat models: {listed(names)} (`%xllm use MODEL` picks one for this notebook)"

    def _argv(self, line: str, fill: Filler) -> list[str]:
        """The line's words for argparse: each option's value without its quotes and filled on its own (`-s {persona}`
        stays one value, `--max-tokens {n}` a number); every other word as typed (the prompt is filled whole)."""
        table = self.xllm.parser._option_string_actions
        argv: list[str] = []
        flag = ""  # an option whose value is the next word
        prompt_only = False
        for word in words(line):
            if flag:
                _closed(flag, word)
                value = word.but(fill(word))
                if value.startswith("-"):  # one word for argparse (`--system=-x`, `-s-x`), or it reads an option
                    argv[-1] = value.but(flag + ("=" if flag.startswith("--") else "") + value)
                else:  # `-m ''` stays two words: joined, `-m` took the next word as its value
                    argv.append(value)
                flag = ""
                continue
            attached = None  # `-s{persona}`, `-s"terse"`, `-m''`, `-t0`: a short option's value typed onto it
            if not prompt_only and len(word.raw) > 2 and word.raw[0] == "-" and word.raw[1] != "-" and word.raw[2] != "=":
                attached = table.get(word.raw[:2])
            # a quoted word is never an option: `%xllm what does '-s' mean` asks that, as IPython's split had it
            action = None if prompt_only or not word.raw.startswith("-") else _option(table, word.partition("=")[0])
            if attached is not None and attached.nargs is None:
                _closed(word.raw[:2], word)
                argv.append(word.but(f"{word[:2]}={fill(word[2:])}"))
            elif action is None or action.nargs == 0:
                prompt_only = prompt_only or word.raw == "--"  # after `--` every word is the prompt's
                argv.append(word.but(word.raw))
            elif "=" in word:  # `--system="a b"`
                name, _, value = word.partition("=")
                _closed(name, word)
                argv.append(word.but(f"{name}={fill(value)}"))
            else:
                flag = str(word)
                argv.append(word)
        return argv

    def _ask(self, args: Any, line_prompt: str, body: str | None) -> None:
        if args.chat and args.new:
            raise XllmError("use --chat (continue) or --new (start over), not both")
        # a keyword, or a dunder (`-o __builtins__` made the namespace's builtins a string: every later cell broke)
        if args.out is not None and not (args.out.isidentifier() and not keyword.iskeyword(args.out)
                                         and not (args.out.startswith("__") and args.out.endswith("__"))):
            raise XllmError(f"--out needs a variable name, not {args.out!r}")  # checked before asking: no wasted answer
        # words after %%xllm on the first line lead the cell body rather than being dropped
        prompt = _trimmed("\n".join(part for part in (line_prompt, body or "") if part.strip()))
        if not prompt:  # a `%xllm` line has no cell body to write it in
            raise XllmError("nothing to ask — write the prompt in the cell body" if body is not None else
                            "nothing to ask — write the prompt after the options: %xllm [options] PROMPT")
        d = self.state.defaults
        question = Question(
            prompt=prompt,
            model=args.model,
            system=args.system,
            temperature=args.temperature if args.temperature is not None else d.temperature,
            max_tokens=args.max_tokens if args.max_tokens is not None else d.max_tokens,
            seed=args.seed,
            fmt=args.format or d.format,
            stream=d.stream and not args.no_stream,
            chat=args.chat,
            new=args.new,
        )
        _, value = ask(self.shell, self.state, question)
        if args.out and not (question.fmt == "json" and value is None):  # JSON that does not parse: left unset
            self.shell.user_ns[args.out] = value


def _trimmed(text: str) -> str:
    """``text`` without blank lines at either end and without the indentation every line shares: a body that starts
    with indented code (a method pasted from a class) keeps each line's indentation relative to the others, where
    ``strip()`` took the first line's alone (``x = 1\\n    y = 2`` reached the model)."""
    return textwrap.dedent(text.rstrip()).strip("\n")


def _closed(option: str, value: Word) -> None:
    """Refuse an option value whose opening quote never closes (`-s "You are terse. Say hi` was a system prompt `"You`
    and a prompt of the rest, where IPython's splitter said the quote did not close)."""
    if value.unclosed:
        raise XllmError(f"the quote that opens the value of {option} ({value.raw}…) never closes")


def _option(table: dict[str, Any], name: str) -> Any:
    """The option ``name`` stands for (argparse takes an unambiguous prefix: ``--max 3``), else None."""
    if name in table:
        return table[name]
    found = {id(action): action for flag, action in table.items() if name.startswith("--") and flag.startswith(name)}
    return next(iter(found.values())) if len(found) == 1 else None


#: the quotes that open a value, straight and typographic
_OPENING = "'\"\u201c\u2018"


def _open_quote(line: str) -> bool:
    """Whether a verb's line opens a quote that does not close where the verb takes a word (``pull 'my dir``,
    ``config system='a b``): the command's error. Elsewhere it is prose: "list 'em all", "help me with 'quotes"
    (a command error too, before), and ``config system='a b`` a prompt for the model."""
    typed = words(line, settings=True)
    for k, word in enumerate(typed):
        if word.unclosed:  # `'my dir`, `“my dir`, `system='a b`, `--name="x y`
            at = 0 if word.raw[0] in _OPENING else word.raw.find("=") + 1
            shape = SHAPES.get(typed[0]) if typed else None
            # the words before it, and it as a stand-in word (a `{name}`, which every operand takes)
            return shape is not None and shape.fits([w.raw for w in typed[1:k]] + [word.raw[:at] + "{quoted}"])
    return False


def _typed(line: str, prompt: list[str] | None) -> str:
    """The line's prompt words as they were typed, spaces and quotes included (``'tis a fine day``)."""
    if not prompt:
        return ""
    first, last = prompt[0], prompt[-1]
    if isinstance(first, Word) and isinstance(last, Word):
        return line[first.start:last.end]
    return " ".join(prompt)


def _command_line(line: str, fill: Filler) -> str | None:
    """A ``%xllm`` line as a command would read it, each word's ``{name}`` filled; None when no verb starts it.

    Each word is filled after the line is split, as an option value of a question is: `config system={persona}`
    stays one setting however many words the persona has (filled first, it was split and went to the model as a
    prompt). ``fill`` looks each `{name}` up once, so a line that turns out to be a prompt does not run a property
    with side effects again when the question fills it. A line with an open quote is left as written: only its
    error is shown.
    """
    typed = words(line, settings=True)  # `pull C:\\models\\x` keeps its backslashes (a shell's split dropped them)
    if typed and typed[0] not in SHAPES:
        return None
    if any(word.unclosed for word in typed):  # `'tis a fine day` is a prompt; `pull 'my dir` the command's error
        return line
    return join([fill(word) for word in typed])


def _meant_as_command(line: str, problem: Exception) -> bool:
    """Whether a line that is no question either (an option the question does not take) starts with a verb.

    ``%xllm ps --bogus`` then gets the verb's own error rather than the question's.
    """
    verb = split(line)[:1]
    return bool(verb) and verb[0] in SHAPES and "unrecognized arguments" in str(problem)


#: ``%xllm <words>?`` on a line of its own; ``%xllm?`` alone (help) does not match
_QUESTION = re.compile(r"^(?P<indent>[ \t]*)%xllm(?P<args>[ \t]+\S.*\?)[ \t]*(?P<eol>\r?\n?)$")


def ask_questions(lines: list[str]) -> list[str]:
    """Input transformer: ``%xllm ... question?`` runs the magic rather than IPython's ``obj?`` help.

    It runs among the cleanup transforms, before IPython's help transform would turn the
    line into ``pinfo`` of its last word. A ``%%`` cell is left alone: its body is a prompt.
    """
    if not lines or lines[0].lstrip().startswith("%%"):
        return lines
    text = _in_strings(lines) if any(_QUESTION.match(line) for line in lines) else set()
    out: list[str] = []
    for k, line in enumerate(lines):
        m = _QUESTION.match(line)
        continued = bool(out) and out[-1].rstrip("\r\n").endswith("\\")
        if m and not continued and k not in text:
            # what IPython itself makes of `%xllm args` (the magic fills {x} itself, as for any line)
            line = f"{m['indent']}get_ipython().run_line_magic('xllm', {m['args'].strip()!r}){m['eol']}"
        out.append(line)
    return out


def _in_strings(lines: list[str]) -> set[int]:
    """The indexes of the lines that start inside a text opened on a line above (a triple-quoted string): a line
    `%xllm ...?` there is the string's, as IPython's own transforms leave it (rewritten, it changed the string)."""
    inside: set[int] = set()
    # a question's own quotes open no text (`%xllm what does """ mean?`): blank, each keeps its row
    code = ["\n" if _QUESTION.match(line) else line for line in lines]
    try:
        for logical in make_tokens_by_line(code):
            for token in logical:
                inside.update(range(token.start[0], token.end[0]))  # 1-based rows: the lines after its first
    except Exception:  # a cell the tokenizer gives up on (IPython then reports it): no line is known to be text
        log.debug("could not tokenize a cell", exc_info=True)
    return inside


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext xllm_jupyter``: register ``%%xllm`` and ``%xllm`` (and let ``%xllm`` questions end in ``?``)."""
    ipython.register_magics(XllmMagics)
    cleanup = getattr(ipython, "input_transformers_cleanup", None)
    if cleanup is not None and ask_questions not in cleanup:
        cleanup.append(ask_questions)


__all__ = ["Reply", "XllmMagics", "interpolate", "load_ipython_extension"]
