"""One ``%%xllm`` question: build the messages, stream (or not) into the cell, finish with provenance."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from IPython.display import display

from ..client.thinking import delta_thinking, message_thinking
from ..core.errors import XllmError
from .render import (
    BLANK,
    EMPTY,
    INTERRUPTED,
    Reply,
    error,
    extract_code,
    parse_json,
    rich_frontend,
    thought_only,
)
from .session import MagicState, provenance

UPDATE_INTERVAL = 0.05  # seconds between display updates: smooth, without flooding the front-end


@dataclass
class Question:
    """A cell's request, options already merged with the kernel's defaults."""

    prompt: str
    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    fmt: str = "markdown"
    stream: bool = True
    chat: bool = False
    new: bool = False


@dataclass
class Answer:
    """What came back, and how it ended."""

    text: str = ""
    #: a reasoning model's thinking (``reasoning_content``): shown above the answer, never kept as the answer
    thinking: str = ""
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    fingerprint: str | None = None
    interrupted: bool = False


class Output:
    """The cell's answer display: shown with the first text, updated in place at most every UPDATE_INTERVAL."""

    def __init__(self, shell: Any, reply: Reply):
        self.reply = reply
        self.rich = rich_frontend(shell)
        self.handle: Any = None
        self._last = 0.0

    def grow(self, text: str) -> None:
        """The answer so far is ``text``."""
        self.reply.text = text
        now = time.monotonic()
        if self.handle is None:
            self.handle = display(self.reply, display_id=True)
            self._last = now
        elif now - self._last >= UPDATE_INTERVAL:
            self.handle.update(self.reply)
            self._last = now

    def flush(self) -> None:
        """Show the text received so far (a throttled update may be pending when the stream fails)."""
        if self.handle is not None:
            self.handle.update(self.reply)
            self._last = time.monotonic()

    def final(self, metadata: dict[str, Any]) -> None:
        """The finished answer with its provenance."""
        md = {"xllm": metadata}
        if self.handle is None:
            display(self.reply, metadata=md)
        else:
            self.handle.update(self.reply, metadata=md)


def ask(shell: Any, state: MagicState, q: Question) -> tuple[Answer, Any]:
    """Ask, show the answer in the cell, and return it with the value ``--out`` stores."""
    client = state.client()
    conversation = state.chat
    if q.new:
        conversation.clear()
    in_chat = q.chat or q.new
    model = q.model or (conversation.model if in_chat else None) or state.default_model()
    if not model:
        raise XllmError("the server has no model loaded — pass -m MODEL (see `%xllm list`)")
    system = q.system if q.system is not None else (conversation.system if in_chat and conversation.system else state.defaults.system)
    history = list(conversation.messages) if in_chat else []
    messages = ([{"role": "system", "content": system}] if system else []) + history + [{"role": "user", "content": q.prompt}]
    params: dict[str, Any] = {
        "temperature": q.temperature,
        "max_tokens": q.max_tokens,
        # a seed is always sent (and recorded), so a sampled answer can be reproduced from its metadata; not drawn from
        # the global `random`, which the notebook seeds for its own draws (one taken here shifted all of them)
        "seed": q.seed if q.seed is not None else secrets.randbelow(2**31),
    }
    if q.fmt == "json":
        params["response_format"] = {"type": "json_object"}
    reply = Reply(q.fmt)
    out = Output(shell, reply)
    if q.stream and out.rich:
        answer = _stream(client, state, messages, model, params, out)
    elif q.stream:
        answer = _print_stream(client, state, messages, model, params)
    else:
        answer = _whole(state, messages, model, params)
    reply.text, reply.thinking = answer.text, answer.thinking
    value: Any = answer.text
    if answer.interrupted:
        reply.note = INTERRUPTED
        # `--out` gets what the format promises, from what arrived: the code so far; JSON only if it parses (an
        # interrupted `-f json` stored its partial text, a str where the notebook expects a dict)
        if q.fmt == "code":
            value = extract_code(answer.text)[1]
        elif q.fmt == "json":
            try:
                value = parse_json(answer.text)
            except ValueError:
                value = None
    elif not answer.text.strip():
        reply.note = BLANK if answer.text else thought_only(answer.finish_reason, answer.usage) if answer.thinking else EMPTY
    elif q.fmt == "json":
        try:
            value = parse_json(answer.text)
            reply.value, reply.parsed = value, True
        except ValueError as exc:
            hint = " (it was cut off at max_tokens: raise --max-tokens)" if answer.finish_reason == "length" else ""
            value = None
            error(f"the model's answer is not valid JSON: {exc}{hint}")
    elif q.fmt == "code":
        value = extract_code(answer.text)[1]
    # a turn stopped before its first word is left out: kept, its question and an empty answer went with every later
    # turn (as `xllm run`, ChatWidget and the JupyterLab panel leave it out)
    if in_chat and answer.text:
        if q.system is not None:
            conversation.system = q.system
        conversation.model = model
        conversation.messages += [{"role": "user", "content": q.prompt}, {"role": "assistant", "content": answer.text}]
    meta = provenance(state, model=answer.model or model, params=params, finish_reason=answer.finish_reason,
                      usage=answer.usage, fingerprint=answer.fingerprint, fmt=q.fmt,
                      chat_turn=conversation.turns if in_chat else None, interrupted=answer.interrupted)
    if out.rich:
        out.final(meta)
    elif not q.stream:
        print(repr(reply))
    elif reply.note and not answer.interrupted:  # a terminal's streamed answer was printed: its note goes below
        print(reply.note.strip("*"))
    return answer, value


def _chunks(client: Any, messages: list[dict[str, str]], model: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return client.stream_chunks(messages, model, stream_options={"include_usage": True}, **params)


def _take(answer: Answer, chunk: dict[str, Any]) -> str:
    """Record a chunk's facts on ``answer`` (its thinking too); return the answer text it adds."""
    answer.model = chunk.get("model") or answer.model
    answer.fingerprint = chunk.get("system_fingerprint") or answer.fingerprint
    if chunk.get("usage"):
        answer.usage = chunk["usage"]
    choices = chunk.get("choices") or ()
    if not choices:
        return ""
    choice = choices[0]
    if choice.get("finish_reason"):
        answer.finish_reason = choice["finish_reason"]
    answer.thinking += delta_thinking(chunk)
    return (choice.get("delta") or {}).get("content") or ""


def _close(stream: Iterator[dict[str, Any]], state: MagicState) -> None:
    """Close an answer's stream, so the server cancels its job. A second Ctrl-C while it closes (pressed again, as
    people do) cut the close short and lost the answer so far to "xllm: interrupted": the client's connections are
    dropped instead, which closes the stream's too."""
    try:
        stream.close()
    except KeyboardInterrupt:
        try:
            state.drop_client()
        except KeyboardInterrupt:  # a third press: the client is let go of already, its sockets close as it is freed
            pass


def _stream(client: Any, state: MagicState, messages: list[dict[str, str]], model: str, params: dict[str, Any],
            out: Output) -> Answer:
    """Stream into the cell's display; Ctrl-C (kernel interrupt) closes the stream, so the server cancels."""
    answer = Answer()
    pieces: list[str] = []
    stream = _chunks(client, messages, model, params)
    try:
        for chunk in stream:
            thought = len(answer.thinking)
            text = _take(answer, chunk)
            if text:
                pieces.append(text)
            if text or len(answer.thinking) > thought:  # the thinking shows while it comes, above the answer
                out.reply.thinking = answer.thinking
                out.grow("".join(pieces))
    except KeyboardInterrupt:
        answer.interrupted = True
    except BaseException:
        out.flush()  # the error line goes below all the text that came, not a throttled prefix of it
        raise
    finally:
        _close(stream, state)  # closes the HTTP response: the server sees the disconnect and cancels the job
    answer.text = "".join(pieces)
    return answer


def _print_stream(client: Any, state: MagicState, messages: list[dict[str, str]], model: str, params: dict[str, Any]) -> Answer:
    """Terminal IPython: print tokens as they come (a reasoning model's thinking first, as `xllm run` prints it)."""
    answer = Answer()
    pieces: list[str] = []
    stream = _chunks(client, messages, model, params)
    ended = False
    try:
        for chunk in stream:
            thought = len(answer.thinking)
            text = _take(answer, chunk)
            if len(answer.thinking) > thought:
                sys.stdout.write(("" if thought else "Thinking...\n") + answer.thinking[thought:])
            if text and answer.thinking and not pieces:
                sys.stdout.write(("" if answer.thinking.endswith("\n") else "\n") + "...done thinking.\n\n")
            if text:
                pieces.append(text)
                sys.stdout.write(text)
            sys.stdout.flush()
        ended = True
    except KeyboardInterrupt:
        answer.interrupted = ended = True
        sys.stdout.write("\n" + INTERRUPTED.strip("*"))
    finally:
        _close(stream, state)
        if ended or pieces or answer.thinking:  # an error before any text: no blank line above its message
            sys.stdout.write("\n")
        sys.stdout.flush()
    answer.text = "".join(pieces)
    return answer


def _whole(state: MagicState, messages: list[dict[str, str]], model: str, params: dict[str, Any]) -> Answer:
    """``--no-stream``: one request; an interrupt drops the connection, which cancels it on the server."""
    answer = Answer()
    try:
        body = state.client().chat_completion(messages, model, **params)
    except KeyboardInterrupt:
        state.drop_client()
        answer.interrupted = True
        return answer
    choice = (body.get("choices") or [{}])[0]
    answer.text = (choice.get("message") or {}).get("content") or ""
    answer.thinking = message_thinking(body)
    answer.finish_reason = choice.get("finish_reason")
    answer.model = body.get("model")
    answer.usage = body.get("usage")
    answer.fingerprint = body.get("system_fingerprint")
    return answer
