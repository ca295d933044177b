"""In-process shortcut: the engine and the store in this process, for when no server runs.

Used by ``xllm run`` (and anything else) that wants an answer without starting a
server. It drives ``Engine.generate`` on a private event loop so callers stay sync.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, Iterable, Iterator, Mapping

from ..core.config import XllmConfig, load_config
from ..core.errors import InvalidRequest
from ..core.types import ChatMessage, Constraint, GenerationParams, GenerationRequest, SamplingParams
from ..openai.harmony import MARKERS, STOP_EXEMPT, HarmonySplit, in_final, is_harmony
from ..openai.model_defaults import ModelDefaults
from ..openai.reasoning import Reasoning
from ..openai.template_kwargs import PARAM, chat_template_kwargs
from ..openai.timings import timings_wire
from .thinking import Thinking

_SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed"}


def to_chat_messages(messages: Iterable[Mapping[str, Any]] | str) -> list[ChatMessage]:
    """OpenAI-style message dicts (or one user string) as ChatMessages."""
    if isinstance(messages, str):
        return [ChatMessage(role="user", content=messages)]
    return [ChatMessage(role=m["role"], content=m.get("content"), reasoning_content=_thinking(m)) for m in messages]


def _thinking(message: Mapping[str, Any]) -> str | None:
    """An assistant turn's thinking sent back (``reasoning_content``, else vLLM's ``reasoning``), as the server reads it."""
    if message.get("role") != "assistant":
        return None
    for key in ("reasoning_content", "reasoning"):
        if isinstance(message.get(key), str):
            return message[key]
    return None


def generation_params(default_max_tokens: int, **params: Any) -> GenerationParams:
    """OpenAI-style keyword parameters (max_tokens, temperature, stop, ...) as GenerationParams."""
    sampling = {k: v for k, v in params.items() if k in _SAMPLING_KEYS and v is not None}
    stop = params.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    unknown = set(params) - _SAMPLING_KEYS - {"max_tokens", "max_completion_tokens", "stop", "ignore_eos", "response_format"}
    if unknown:
        raise InvalidRequest(f"Unsupported parameter for in-process chat: {sorted(unknown)[0]}", param=sorted(unknown)[0])
    max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or default_max_tokens
    return GenerationParams(
        max_tokens=int(max_tokens),
        sampling=SamplingParams(**sampling),
        stop=tuple(stop),
        ignore_eos=bool(params.get("ignore_eos", False)),
        constraint=format_constraint(params.get("response_format")),
    )


def format_constraint(response_format: Mapping[str, Any] | None) -> Constraint | None:
    """An OpenAI ``response_format`` (``json_object``, ``json_schema``; ``text`` or None: none) as the engine's Constraint."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}  # type: ignore[union-attr]
        return Constraint("json_schema", json.dumps(schema, sort_keys=True))
    raise InvalidRequest(f"Unsupported response_format type for in-process chat: {kind!r}", param="response_format")


def with_model_defaults(defaults: ModelDefaults, params: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """``params`` with a created model's Modelfile settings filled in, as the server does: the caller's values win."""
    filled = defaults.fill(params)
    if not (filled.get("max_tokens") or filled.get("max_completion_tokens")):
        filled["max_tokens"] = defaults.max_tokens(default_max_tokens)  # num_predict, else the engine's default
    return filled


def _pieces(split: tuple[str, str], thinking: bool) -> Iterator[str]:
    """A ``(thinking, answer)`` pair of new text as reply pieces: the thinking as ``Thinking`` (only if asked for)."""
    thought, answer = split
    if thought and thinking:
        yield Thinking(thought)
    if answer:
        yield answer


class LocalChat:
    """Chat with a model from the local store through an engine in this process."""

    #: no server keeps the model loaded: it goes when this process ends (``xllm run --keepalive`` says so)
    in_process = True

    def __init__(self, config: XllmConfig | None = None):
        # Imported here: the engine and store pull in heavier modules that a client
        # talking to a server never needs.
        from ..engine.engine import Engine
        from ..store import ModelStore

        self.config = config or load_config()
        self.store = ModelStore(self.config.store.home)
        self.store.check_home()  # a home that is a file: said now, not as a bare "Not a directory" per pull
        self.engine = Engine(self.config.engine, catalog=self.store)
        self._loop = asyncio.new_event_loop()
        self._started = False
        #: the last reply's token counts (``prompt_tokens``, ``completion_tokens``), as a server's usage reports them
        self.last_usage: dict[str, int] = {}
        #: and its engine's times, in llama.cpp's ``timings`` shape as a server sends them
        self.last_timings: dict[str, Any] = {}
        #: and its finish reason (``stop``, ``length``), as a server's last chunk gives it (``XllmClient``'s)
        self.last_finish_reason: str | None = None

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def load(self, model: str) -> Any:
        """Load ``model`` now (otherwise the first chat loads it); the loaded model."""
        if not self._started:
            self._run(self.engine.start())
            self._started = True
        return self._run(self.engine.load(model))

    def stream_chat(self, messages: Iterable[Mapping[str, Any]] | str, model: str, *, thinking: bool = False,
                    **params: Any) -> Iterator[str]:
        """The reply's text pieces; closing the iterator cancels the generation. A reasoning model's thinking is split
        from its answer as the server splits it: with ``thinking`` it comes as ``Thinking`` pieces, else it is left out
        (as the server's client does)."""
        # the template's variables (`xllm run --think=false`: enable_thinking), checked as the server checks them
        template_kwargs = chat_template_kwargs({PARAM: params.pop(PARAM, None)})
        loaded = self.load(model)
        # a created model's PARAMETER/SYSTEM/MESSAGE apply here just as the server applies them
        defaults = ModelDefaults.of(self.engine, model)
        params = with_model_defaults(defaults, params, self.config.engine.default_max_tokens)
        gen_params = generation_params(self.config.engine.default_max_tokens, **params)
        chat = defaults.chat_messages(to_chat_messages(messages))
        if gen_params.constraint is not None:  # a schema the grammar engine refuses: its 400's words, before any text
            self._run(self.engine.check_constraint(model, gen_params.constraint))
        extra = {"template_kwargs": template_kwargs} if template_kwargs else {}  # only when given, as the server does
        prompt_ids = self._run(self.engine.encode_chat(model, chat, **extra))
        # the markers the model's template names (or a block its prompt opened), as the server reads them; the
        # template variables too: one that turns thinking off keeps a format from the first token
        reasoning = Reasoning.of(loaded, prompt_ids, {PARAM: template_kwargs}, forced=False,
                                 constraint=gen_params.constraint)
        if reasoning is not None:  # decoding keeps them where they are special tokens (Magistral's [THINK])
            gen_params = self._around(model, reasoning, gen_params)
        splitter: Any = reasoning.splitter() if reasoning is not None else None
        if is_harmony(getattr(loaded, "chat_template", lambda: None)()):  # gpt-oss's: read as the server reads it
            splitter, gen_params = HarmonySplit(), self._in_final(model, loaded, gen_params)
        request = GenerationRequest(model=model, prompt_ids=tuple(prompt_ids), params=gen_params)
        events = self.engine.generate(request)
        self.last_usage, self.last_timings, self.last_finish_reason = {}, {}, None
        try:
            while True:
                try:
                    event = self._next(events)
                except StopAsyncIteration:
                    if splitter is not None:  # what it held back (a marker's possible beginning) goes out now
                        yield from _pieces(splitter.feed("", final=True), thinking)
                    return
                usage = getattr(event, "usage", None)
                if usage is not None:  # the request's last event (GenerationDone)
                    self.last_usage = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
                    self.last_timings = timings_wire(event.timings, usage) or {}
                finish = getattr(event, "finish", None)
                if finish is not None and getattr(event, "index", 0) == 0:
                    self.last_finish_reason = finish.value
                text = getattr(event, "text", "")
                if splitter is not None:
                    yield from _pieces(splitter.feed(text), thinking)
                elif text:
                    yield text
        finally:
            # Runs on close() too (Ctrl-C, early exit): the engine cancels the jobs.
            self._run(events.aclose())

    def _around(self, model: str, reasoning: Reasoning, params: GenerationParams) -> GenerationParams:
        """``params`` keeping the thinking markers, with a format (``--format json``) applied after any thinking, as
        the server applies it (``Reasoning.around``; compiled now, as the format was)."""
        constraint = reasoning.around(params.constraint) if params.constraint is not None else None
        if constraint is not params.constraint:
            self._run(self.engine.check_constraint(model, constraint))
        return dataclasses.replace(params, keep_special=reasoning.markers, constraint=constraint)

    def _in_final(self, model: str, loaded: Any, params: GenerationParams) -> GenerationParams:
        """``params`` keeping harmony's markers, with a format applied to the final message, as the server applies it
        (harmony.in_final; compiled now, as the format was)."""
        constraint = in_final(params.constraint, loaded) if params.constraint is not None else None
        if constraint is not params.constraint:
            self._run(self.engine.check_constraint(model, constraint))
        return dataclasses.replace(params, keep_special=MARKERS, stop_exempt=STOP_EXEMPT, constraint=constraint)

    def _next(self, events: Any) -> Any:
        """The next engine event. Ctrl-C while waiting for it cancels that wait first: otherwise the
        generator is still running and closing it fails ("aclose(): asynchronous generator is already running")."""
        step = self._loop.create_task(events.__anext__())
        try:
            return self._loop.run_until_complete(step)
        except BaseException:
            if not step.done():
                step.cancel()
                self._loop.run_until_complete(asyncio.wait([step]))
            if step.done() and not step.cancelled():
                step.exception()  # retrieved: the interrupt is what the caller hears about
            raise

    def chat(self, messages: Iterable[Mapping[str, Any]] | str, model: str, **params: Any) -> str:
        """The whole reply text."""
        return "".join(self.stream_chat(messages, model, **params))

    def close(self) -> None:
        """Stop the engine's threads and the private loop."""
        if self._loop.is_closed():
            return
        self._run(self.engine.stop())
        # Ctrl-C mid-load leaves the load's thread wait pending: cancel it, or closing the
        # loop destroys a pending task ("Task was destroyed but it is pending!")
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        if pending:
            self._run(asyncio.wait(pending))
        self._loop.close()

    def __enter__(self) -> "LocalChat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
