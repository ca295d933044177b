"""``xllm run``: one-shot or interactive streaming chat with a model.

Talks to a running server through the client; when none answers, runs the engine
in this process (and says so on stderr) so ``xllm run`` works on a bare machine.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import click

from ..client.base import ServerUnavailable
from ..core.errors import XllmError

EXIT_WORDS = {"/bye", "/exit", "/quit"}
HELP = "Type a message. /clear forgets the conversation, /bye or Ctrl-D exits."


class ChatBackend(Protocol):
    """What `run` needs: XllmClient and LocalChat both fit."""

    def load(self, name: str) -> Any:
        """Make ``name`` ready (errors early for unknown models)."""

    def stream_chat(self, messages: list[dict[str, str]], model: str | None = None, **params: Any) -> Any:
        """Iterator of reply text pieces; closing it cancels the generation."""

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
        except ServerUnavailable:
            _note(f"No xllm server at {client.root_url}; running the model in this process.")
    from ..client.local import LocalChat

    return LocalChat()


def load_with_status(backend: ChatBackend, model: str) -> None:
    """Load ``model`` behind a rich spinner on stderr (loads can take many seconds)."""
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        backend.load(model)
        return
    with console.status(f"Loading {model}…", spinner="dots"):
        backend.load(model)


def stream_reply(backend: ChatBackend, messages: list[dict[str, str]], model: str, params: dict[str, Any]) -> tuple[str, bool]:
    """Print the reply as it streams; returns (text, interrupted)."""
    pieces: list[str] = []
    stream = backend.stream_chat(messages, model, **params)
    interrupted = False
    try:
        for piece in stream:
            click.echo(piece, nl=False)  # click.echo flushes, so tokens show as they come
            pieces.append(piece)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        stream.close()  # closes the HTTP response: the server cancels the job
    click.echo()
    if interrupted:
        _note("(interrupted)")
    return "".join(pieces), interrupted


def _read_line() -> str | None:
    """One line from the user, or None on EOF / Ctrl-C at the prompt."""
    try:
        return input(">>> ")
    except (EOFError, KeyboardInterrupt):
        click.echo()
        return None


def interactive(backend: ChatBackend, model: str, history: list[dict[str, str]], params: dict[str, Any]) -> None:
    """A terminal chat that keeps the conversation until /bye or EOF."""
    system = list(history)
    _note(HELP)
    while True:
        line = _read_line()
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return
        if text == "/clear":
            history[:] = system
            _note("(conversation cleared)")
            continue
        history.append({"role": "user", "content": text})
        try:
            reply, _ = stream_reply(backend, history, model, params)
        except ServerUnavailable:
            raise
        except XllmError as exc:
            # A bad turn should not end the session; drop it and let the user go on.
            history.pop()
            _note(f"Error: {exc.message}")
            continue
        history.append({"role": "assistant", "content": reply})


@click.command("run")
@click.argument("model")
@click.argument("prompt", nargs=-1)
@click.option("-s", "--system", metavar="TEXT", help="System prompt.")
@click.option("-t", "--temperature", type=click.FloatRange(0, 2), help="Sampling temperature (0 = greedy).")
@click.option("--max-tokens", type=click.IntRange(1), help="Most tokens to generate per reply.")
@click.option("--local", is_flag=True, help="Do not look for a server; run the model in this process.")
@click.pass_obj
def run_command(settings: Any, model: str, prompt: tuple[str, ...], system: str | None, temperature: float | None, max_tokens: int | None, local: bool) -> None:
    """Chat with MODEL, one-shot or interactively.

    With PROMPT, stream one answer and exit; without it, chat in the terminal
    (/clear forgets the conversation, /bye or Ctrl-D exits). Uses a running server
    when one answers, else runs the model in this process.
    """
    backend = connect(settings, local)
    params = {"temperature": temperature, "max_tokens": max_tokens}
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    try:
        load_with_status(backend, model)  # fail early if the model does not exist
        if prompt:
            history.append({"role": "user", "content": " ".join(prompt)})
            _, interrupted = stream_reply(backend, history, model, params)
            if interrupted:
                sys.exit(130)
            return
        interactive(backend, model, history, params)
    finally:
        backend.close()
