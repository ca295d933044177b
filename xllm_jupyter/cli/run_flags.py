"""``xllm run``'s Ollama flags: ``--format``, ``--keepalive`` and ``--verbose``'s timings after each answer."""

from __future__ import annotations

import json
import time
from typing import Any, Iterator

import click

#: what `--format` takes besides a JSON schema, as `ollama run --format json`
FORMAT_HELP = "Answer in JSON: 'json' (any JSON object) or a JSON schema the answer must match."
KEEPALIVE_HELP = "How long the model stays loaded once idle (e.g. 5m, 1h; 0 unloads it after the answer, negative: forever)."


def response_format(value: str | None) -> dict[str, Any] | None:
    """``--format``'s value as an OpenAI ``response_format``: ``json`` is any object, ``{...}`` a JSON schema."""
    if value is None:
        return None
    if value.strip().lower() == "json":
        return {"type": "json_object"}
    try:
        schema = json.loads(value)
    except ValueError:
        schema = None
    if not isinstance(schema, dict):
        raise click.BadParameter(f"{value[:60]!r}: give 'json' or a JSON schema (an object)", param_hint="'--format'")
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}


def keep_alive(value: str | None) -> str | None:
    """``--keepalive``'s value, checked here (a usage error) as the server will read it: ``5m``, ``1h30m``, ``300``."""
    if value is None:
        return None
    from ..core.errors import InvalidRequest
    from ..engine.manager import parse_keep_alive

    try:
        parse_keep_alive(value, param="--keepalive")
    except InvalidRequest as exc:
        raise click.BadParameter(exc.message, param_hint="'--keepalive'") from None
    return value.strip()


def set_command(words: list[str], params: dict[str, Any], verbose: bool) -> bool:
    """The chat's ``/set verbose|quiet|format json|noformat``, as in `ollama run` (``params`` takes the format);
    returns whether timings show after each answer now."""
    if words in (["verbose"], ["quiet"]):
        click.echo(f"Set '{words[0]}' mode.", err=True)
        return words == ["verbose"]
    if words[:1] == ["format"]:
        if words[1:] != ["json"]:
            click.echo("Invalid or missing format. For 'json' mode use '/set format json'", err=True)
        else:
            params["response_format"] = {"type": "json_object"}
            click.echo("Set format to 'json' mode.", err=True)
    elif words == ["noformat"]:
        params["response_format"] = None
        click.echo("Disabled format.", err=True)
    else:
        click.echo("Use /set verbose (timings after each answer), /set quiet, /set format json, /set noformat, /set think, "
                   "/set nothink, /set parameter NAME VALUE or /set system TEXT (/? set: more)", err=True)
    return verbose


def go_duration(seconds: float) -> str:
    """``seconds`` as Go prints a time.Duration (``1.5s``, ``512.25ms``, ``80µs``, ``2m3.5s``), as `ollama run --verbose` shows them."""
    ns = max(int(round(seconds * 1e9)), 0)
    if ns == 0:
        return "0s"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return _trimmed(ns / 1_000, 3) + "µs"
    if ns < 1_000_000_000:
        return _trimmed(ns / 1_000_000, 6) + "ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    head = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return head + _trimmed(rest / 1e9, 9) + "s"


def _trimmed(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return text or "0"


class ReplyStats:
    """One answer's timings and token counts, as the server reports them (its ``usage`` and llama.cpp's ``timings``).

    The prompt's and the answer's durations are the engine's (``timings``: from the request's admission into the batch
    to its first token, and from there to its last), so the network and the wait in the queue are not in them. A server
    that sends no ``timings`` (an older one) leaves them to this clock: the prompt's part from sending the request to
    the first piece of the answer, the answer's from there to the last, its rate counting the tokens after the first.
    The total is this clock's either way.
    """

    def __init__(self, load_seconds: float | None = None):
        self.load_seconds = load_seconds  # the load this command waited for before the answer (the first answer only)
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.start = self.first = self.end = 0.0

    def watch(self, backend: Any, messages: list[dict[str, str]], model: str, params: dict[str, Any]) -> Iterator[str]:
        """The answer's text pieces from ``backend`` (its thinking's as ``Thinking`` pieces), timed, with the usage
        and timings the server (or the in-process engine) reports."""
        self.start = time.perf_counter()
        if hasattr(backend, "stream_chunks"):  # a server: its usage and timings come in the stream's last chunk
            pieces = backend.stream_chunks(messages, model, stream_options={"include_usage": True}, **params)
            texts = (text for chunk in pieces for text in self._texts_of(chunk))
        else:
            pieces = texts = backend.stream_chat(messages, model, thinking=True, **params)
        try:
            for text in texts:
                if text:
                    self.first = self.first or time.perf_counter()
                    yield text
        finally:
            pieces.close()
        self.end = time.perf_counter()
        if not self.usage:
            self.usage = dict(getattr(backend, "last_usage", None) or {})
            self.timings = dict(getattr(backend, "last_timings", None) or {})

    def _texts_of(self, chunk: dict[str, Any]) -> tuple[str, str]:
        from ..client.base import delta_text
        from ..client.thinking import Thinking, delta_thinking

        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        return Thinking(delta_thinking(chunk)), delta_text(chunk)  # the first piece, thinking or not, ends the prompt's part

    def _cached(self) -> int:
        """Prompt tokens the server's cache held (llama.cpp's ``cache_n``, OpenAI's ``cached_tokens``)."""
        details = self.usage.get("prompt_tokens_details")
        return _count(self.timings["cache_n"] if "cache_n" in self.timings
                      else details.get("cached_tokens") if isinstance(details, dict) else 0)

    def _parts(self) -> tuple[float, int, float, int]:
        """(prompt seconds, prompt tokens processed, answer seconds, answer tokens timed): the server's where it timed
        them, else this clock's."""
        t = self.timings
        if _number(t.get("prompt_ms")) and _number(t.get("predicted_ms")):
            return t["prompt_ms"] / 1e3, _count(t.get("prompt_n")), t["predicted_ms"] / 1e3, _count(t.get("predicted_n"))
        first = (self.first or self.end) - self.start
        answer = self.end - self.first if self.first else 0.0
        prompt, completion = _count(self.usage.get("prompt_tokens")), _count(self.usage.get("completion_tokens"))
        return first, prompt - self._cached(), answer, completion - 1

    def lines(self) -> list[str]:
        """The summary, in `ollama run --verbose`'s words and order; a figure not measured is left out."""
        load = self.load_seconds or 0.0
        rows = [("total duration", go_duration(load + self.end - self.start))]
        if self.load_seconds is not None:
            rows.append(("load duration", go_duration(self.load_seconds)))
        prompt, completion = _count(self.usage.get("prompt_tokens")), _count(self.usage.get("completion_tokens"))
        prompt_s, prompt_n, answer_s, answer_n = self._parts()
        if prompt > 0:
            rows.append(("prompt eval count", f"{prompt} token(s)"))  # the whole prompt, cached tokens too, as Ollama's
            if self._cached():
                rows.append(("prompt eval cached", f"{self._cached()} token(s)"))
        if prompt_s > 0:
            rows.append(("prompt eval duration", go_duration(prompt_s)))
            if prompt_n > 0:  # the rate of the tokens it processed: cached ones took no time
                rows.append(("prompt eval rate", f"{prompt_n / prompt_s:.2f} tokens/s"))
        if completion > 0:
            rows.append(("eval count", f"{completion} token(s)"))
        if answer_s > 0:
            rows.append(("eval duration", go_duration(answer_s)))
            if answer_n > 0:
                rows.append(("eval rate", f"{answer_n / answer_s:.2f} tokens/s"))
        return [f"{name + ':':<22}{value}" for name, value in rows]

    def report(self) -> None:
        """Print the summary on stderr, as Ollama does (stdout keeps the answer alone)."""
        for line in self.lines():
            click.echo(line, err=True)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _count(value: Any) -> int:
    """A token count from the wire; anything else (missing, null, a string) is 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
