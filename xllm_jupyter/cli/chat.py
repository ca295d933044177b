"""``xllm run``: one-shot or interactive streaming chat with a model.

Talks to a running server through the client; when none answers, runs the engine
in this process (and says so on stderr) so ``xllm run`` works on a bare machine.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol

import click

from ..client.base import ServerUnavailable, WrongScheme
from ..client.thinking import no_answer_note
from ..core.errors import ContextLengthExceeded, XllmError
from .render import markup_safe, terminal_safe
from .chat_commands import BLOCK, HELP, ChatSession, slash_command
from .run_flags import FORMAT_HELP, KEEPALIVE_HELP, ReplyStats, keep_alive, response_format
from .settings import server_options
from .thinking import HIDE_HELP, THINK_HELP, Thinking, ThinkCommand, ThinkingView, think_kwargs

EXIT_WORDS = {"/bye", "/exit", "/quit"}
EXIT_HINT = "(Ctrl-C clears the line; /bye or Ctrl-D exits)"


class ChatBackend(Protocol):
    """What `run` needs: XllmClient and LocalChat both fit."""

    def load(self, name: str, **options: Any) -> Any:
        """Make ``name`` ready (errors early for unknown models); XllmClient takes ``keep_alive``."""

    def stream_chat(self, messages: list[dict[str, str]], model: str | None = None, **params: Any) -> Any:
        """Iterator of reply text pieces (``thinking``: a reasoning model's thinking too, as ``Thinking`` pieces);
        closing it cancels the generation."""

    def close(self) -> None:
        """Release connections or the in-process engine."""


def _note(message: str) -> None:
    click.echo(message, err=True)


def connect(settings: Any, local: bool) -> ChatBackend:
    """The server's client when one answers, else an in-process engine."""
    if not local:
        client = settings.client()
        try:
            client.health()
            return client
        except WrongScheme as exc:  # something answers there, not in the URL's scheme: say what to change
            _note(f"{exc.message[:1].upper()}{exc.message[1:]}; running the model in this process.")
        except ServerUnavailable:
            _note(f"No xllm server at {client.root_url}; running the model in this process.")
    from ..client.local import LocalChat

    return LocalChat()


def load_with_status(backend: ChatBackend, model: str, **options: Any) -> float:
    """Load ``model`` behind a rich spinner on stderr (loads can take many seconds); the seconds it took."""
    from rich.console import Console

    start = time.perf_counter()
    console = Console(stderr=True)
    if not console.is_terminal:
        backend.load(model, **options)
        return time.perf_counter() - start
    # the name as typed, never rich markup: `xllm run '[/x]'` raised MarkupError before the server was asked
    with console.status(f"Loading {markup_safe(model)}…", spinner="dots"):
        backend.load(model, **options)
    return time.perf_counter() - start


def stream_reply(backend: ChatBackend, messages: list[dict[str, str]], model: str, params: dict[str, Any],
                 stats: ReplyStats | None = None, hide_thinking: bool = False) -> tuple[str, bool]:
    """Print the reply as it streams (a reasoning model's thinking first, as ``ollama run`` shows it, unless
    ``hide_thinking``), then ``stats``' timings when given; returns (the answer's text, interrupted). The thinking is
    not in that text: the conversation sends the answers back, as Ollama's and the OpenAI clients' do."""
    pieces: list[str] = []
    thought = False  # the reply had thinking: with no answer after it, a note says why (max tokens, most often)
    view = ThinkingView(hide_thinking)
    stream = (stats.watch(backend, messages, model, params) if stats
              else backend.stream_chat(messages, model, thinking=True, **params))
    interrupted = False
    try:
        for piece in stream:
            view.show(piece)
            if isinstance(piece, Thinking):
                thought = thought or bool(piece.strip())
            else:
                pieces.append(piece)
    except KeyboardInterrupt:
        interrupted = True
    except Exception:
        if view.wrote:  # the error line is written next: under the partial reply, not at the end of its last line
            click.echo()
        raise
    finally:
        stream.close()  # closes the HTTP response: the server cancels the job
    click.echo()
    if interrupted:
        _note("(interrupted)")
        return "".join(pieces), interrupted
    if thought and not "".join(pieces).strip():
        # (as %%xllm and ChatWidget say it: a reply cut while it thought printed its thinking and ended there)
        usage = (stats.usage if stats else None) or getattr(backend, "last_usage", None) or {}
        _note(f"({no_answer_note(getattr(backend, 'last_finish_reason', None), usage.get('completion_tokens'), '--max-tokens')})")
    if stats:
        stats.report()
    return "".join(pieces), interrupted


def _is_tty(stream: Any) -> bool:
    return stream is not None and stream.isatty()


def valid_text(text: str) -> str:
    """``text`` with the bytes a command line held that were not UTF-8 (surrogate escapes) as U+FFFD."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that was no escaped byte
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def read_piped() -> str:
    """All of piped stdin as text; bytes that are not UTF-8 become U+FFFD (as surrogates they failed the
    tokenizer or the JSON encoder with a traceback)."""
    if sys.stdin is None:
        return ""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return sys.stdin.read()
    return buffer.read().decode("utf-8", errors="replace")


def stdin_is_tty() -> bool:
    """True when a person types at stdin (interactive chat); piped input is read in one go."""
    return _is_tty(sys.stdin)


def _read_line(prompt: str = ">>> ") -> str | None:
    """One line from the user, or None on EOF; Ctrl-C at the prompt raises KeyboardInterrupt."""
    try:
        if _is_tty(sys.stdout):
            return input(prompt)  # readline draws the prompt, so line editing keeps it
        click.echo(prompt, nl=False, err=True)  # stdout is a file or pipe: keep the prompt out of it
        return input()
    except EOFError:
        click.echo(err=True)
        return None


def read_message() -> tuple[str, bool] | None:
    """The user's next message and whether it was a \"\"\" block (sent as typed, never a /command); None on EOF.

    A line that starts with \"\"\" opens a block that runs to the line ending in \"\"\", so pasted text of
    several lines is one message instead of one per line; so does one after ``/set system``, as in `ollama run` (the
    command comes back with the block's text).
    """
    line = _read_line()
    if line is None:
        return None
    first, command = line.lstrip(), ""
    if first.startswith("/set system ") and first[len("/set system "):].lstrip().startswith(BLOCK):
        command, first = "/set system ", first[len("/set system "):].lstrip()
    elif not first.startswith(BLOCK):
        return line.strip(), False
    lines = [first[len(BLOCK):]]
    while not lines[-1].rstrip().endswith(BLOCK) or len(lines) == 1 and not lines[0].strip():
        more = _read_line("... ")
        if more is None:
            return None
        lines.append(more)
    lines[-1] = lines[-1].rstrip()[:-len(BLOCK)]
    text = "\n".join(lines).strip("\n")
    return (command + text, False) if command else (text, True)


def interactive(backend: ChatBackend, model: str, history: list[dict[str, str]], params: dict[str, Any],
                verbose: bool = False, load_seconds: float | None = None, hide_thinking: bool = False) -> None:
    """A terminal chat that keeps the conversation until /bye or EOF (``verbose``: timings after each answer, the
    first with the ``load_seconds`` the model's load took; ``hide_thinking``: answers without their thinking). Its
    commands (/set, /show, /load, /save, /clear, /?) are chat_commands.py's."""
    s = ChatSession(backend, model, history, params, verbose, load_seconds, system=list(history))
    _note(HELP)
    while True:
        try:
            message = read_message()
        except KeyboardInterrupt:
            # Ctrl-C at the prompt drops the line typed so far, as a shell does; pressed a moment too late
            # to stop a reply, it must not end the session and lose the conversation
            click.echo(err=True)
            _note(EXIT_HINT)
            continue
        if message is None:
            return
        text, block = message
        if not text.strip():
            continue
        if not block and text.startswith("/"):  # a block is the user's text, even one that starts with "/"
            if text in EXIT_WORDS:
                return
            slash_command(text, s)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply, interrupted = stream_reply(backend, history, s.model, params,
                                              ReplyStats(s.load_seconds) if s.verbose else None, hide_thinking)
            s.load_seconds = None  # the load was before the first answer only
        except XllmError as exc:
            # A bad turn should not end the session, nor a server that stopped or restarted (ServerUnavailable, the
            # reply cut off or never begun): the conversation waits for it to be back. The turn is dropped, a partial
            # reply too (it stays on screen): sent with the next turns it would pass for the model's whole answer.
            history.pop()
            # "reduce the length of the messages": here the conversation is what grew, which only /clear shortens
            hint = " (/clear forgets the conversation so far)" if isinstance(exc, ContextLengthExceeded) and history != s.system else ""
            _note(f"Error: {terminal_safe(exc.message)}{hint}")  # the server's words: no escape acts (as on main's error line)
            continue
        if interrupted and not reply:
            history.pop()  # stopped before a word came: an empty assistant turn would only confuse the next one
            continue
        history.append({"role": "assistant", "content": reply})


@click.command("run", cls=ThinkCommand)
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("-s", "--system", metavar="TEXT", help="System prompt.")
@click.option("-t", "--temperature", type=click.FloatRange(0, 2), help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=click.IntRange(1), help="Most tokens to generate per reply.")
@click.option("--format", "format_", metavar="json|SCHEMA", help=FORMAT_HELP)
@click.option("--keepalive", metavar="DURATION", help=KEEPALIVE_HELP)
@click.option("--think", is_flag=False, flag_value="true", default=None, metavar="[=true|false|high|medium|low]",
              help=THINK_HELP)
@click.option("--hidethinking", is_flag=True, help=HIDE_HELP)
@click.option("--verbose", is_flag=True, help="Show timings and token counts after each answer (on stderr).")
@click.option("--local", is_flag=True, help="Do not look for a server; run the model in this process.")
@server_options
@click.pass_obj
def run_command(settings: Any, model: str, prompt: tuple[str, ...], system: str | None, temperature: float | None,
                max_tokens: int | None, format_: str | None, keepalive: str | None, think: str | None, hidethinking: bool,
                verbose: bool, local: bool) -> None:
    """Chat with MODEL, one-shot or interactively.

    With PROMPT, stream one answer and exit; without it, chat in the terminal
    (/clear forgets the conversation, /bye or Ctrl-D exits, /? lists the commands, \"\"\" begins and
    ends a message of several lines, Ctrl-C stops a reply).
    Piped stdin is read whole and put before PROMPT, for one answer. Uses a running
    server when one answers, else runs the model in this process.
    """
    model, text = valid_text(model), valid_text(" ".join(prompt))
    system = valid_text(system) if system else system
    # usage errors before anything loads
    answer_format, keep, template_kwargs = response_format(format_), keep_alive(keepalive), think_kwargs(think)
    one_shot = bool(prompt) or not stdin_is_tty()
    if not stdin_is_tty():
        text = one_shot_prompt(read_piped(), text)
    backend = connect(settings, local)
    params = {"temperature": temperature, "max_tokens": max_tokens, "response_format": answer_format,
              "chat_template_kwargs": template_kwargs}
    if keep is not None and getattr(backend, "in_process", False):
        _note("Note: --keepalive is for a server; the model in this process goes when this command ends.")
        keep = None
    if keep is not None:
        params["keep_alive"] = keep  # each answer restarts the model's idle timer with it, as Ollama's requests do
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    try:
        # fail early if the model does not exist; the load's keep_alive holds it until the first answer too
        load_seconds = load_with_status(backend, model, **({"keep_alive": keep} if keep is not None else {}))
        if not one_shot:
            interactive(backend, model, history, params, verbose, load_seconds, hidethinking)
            return
        if not text:
            return  # nothing piped and no prompt: the model is loaded, as `ollama run M < /dev/null` does
        history.append({"role": "user", "content": text})
        _, interrupted = stream_reply(backend, history, model, params, ReplyStats(load_seconds) if verbose else None,
                                      hidethinking)
        if interrupted:
            sys.exit(130)
    finally:
        backend.close()


def one_shot_prompt(piped: str, prompt: str) -> str:
    """Piped text in front of the prompt, a blank line between them (Ollama prepends stdin too)."""
    piped = piped.rstrip()  # the trailing newline; leading indentation may matter (code)
    return f"{piped}\n\n{prompt}" if piped and prompt else piped or prompt
