"""The Responses API (``/v1/responses``) as a translation onto chat completions.

A Responses request becomes a chat request (``instructions`` -> a system message, input
items -> messages, ``previous_response_id`` -> the stored conversation in front) and
runs through ``OpenAIServing.chat_completion``, so validation, sampling, constraints
and engine handling are the chat path's; only the wire shapes differ. Chat errors are
re-labelled with the Responses parameter names before they leave. A reply's chat chunks become
typed Responses events in response_stream.py, streamed or not: a whole Response is the one its
stream ends with, so both have the same items (a message per run of text around the calls).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, AsyncIterator, Literal, Union

from pydantic import Field

from ..core.errors import InvalidRequest, NotFound, Unsupported, XllmError, quoted
from .context_words import PromptTooLong
from .offload import is_big, is_big_text, off_loop_if, parse_body
from .owned_store import cursor_page, page_limit
from .protocol import MAX_TOP_LOGPROBS, ObfuscationOption, PromptCacheOptions, ServiceTier, StrictModel, check_metadata, check_verbosity, served_tier
from .item_references import resolve_references
from .response_items import chat_tool_choice, chat_tools, check_function_outputs, check_items_new, items_to_messages, new_id, normalize_input
from .response_store import ResponseStore, StoredResponse
from .schema_errors import check_json_type, shown
from .structured import check_format_name
from .response_stream import Event, ResponseEventStream

#: chat fields a Responses body may carry as xllm extensions (e.g. ``extra_body``); same names and checks as chat
_CHAT_EXTENSIONS = ("stop", "stop_token_ids", "seed", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "logit_bias", "ignore_eos", "chat_template_kwargs", "structured_outputs",
                    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                    "guided_whitespace_pattern", "reasoning_format")  # (vLLM's structured outputs: guided.py)
#: Responses features that would change the result if honoured; rejected rather than ignored
_UNSUPPORTED = {"conversation": ("a string", "an object"), "prompt": ("an object",), "background": ("a boolean",),
                "max_tool_calls": ("an integer",), "moderation": ("an object",),
                "context_management": ("an array",)}  # with their JSON types in the SDK
#: ``include`` values honoured: output text logprobs, and reasoning items' encrypted content (this server's reasoning
#: items carry their text in ``content``, never encrypted: clients such as Codex ask for it with every ``store: false``
#: request)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_INCLUDABLE = (LOGPROBS_INCLUDE, "reasoning.encrypted_content")
#: a json_schema ``text.format``'s name when the client gave none (OpenAI requires one; it only labels the format)
_DEFAULT_FORMAT_NAME = "response"


def check_include(values: Sequence[str]) -> None:
    """400 naming the first ``include`` value this server cannot honour (create, retrieve and input_items take them)."""
    for i, value in enumerate(values):
        if value not in _INCLUDABLE:
            raise Unsupported(f"include value {shown(value)} is not supported by this server; it supports "
                              + " and ".join(repr(v) for v in _INCLUDABLE), param=f"include[{i}]")


class ResponsesPromptCacheOptions(PromptCacheOptions):
    """Responses' ``prompt_cache_options``: chat's, plus the longer ``ttl``, ``prewarm`` and ``comparison_response_id``."""

    ttl: Literal["30m", "12h"] | None = None  # type: ignore[assignment]  # Responses allows 12h; chat only 30m
    prewarm: bool | None = None
    comparison_response_id: str | None = None

    def check(self) -> None:
        """400 for ``prewarm: true``: it asks for no output, and this server would generate one anyway."""
        if self.prewarm:
            raise Unsupported("'prompt_cache_options.prewarm' is not supported by this server (it has no prompt cache "
                              "to prepare without generating)", param="prompt_cache_options.prewarm")

    def echo(self) -> dict[str, Any]:
        """As the Response shows it: the SDK's type requires ``mode`` and ``ttl``, so their defaults fill them."""
        return {"mode": self.mode or "implicit", "ttl": self.ttl or "30m", "comparison_response_id": self.comparison_response_id}


class BackgroundOptions(StrictModel):
    """``background_options``, typed as the SDK has it: only the default window can be served (no ``background``)."""

    completion_window: Literal["soonest", "2h", "8h"] | None = None
    continuation_id: str | None = None

    def check(self) -> None:
        """400 for the ``2h``/``8h`` windows: they need ``background: true``, which this server does not support."""
        if self.completion_window not in (None, "soonest"):
            raise Unsupported(f"'background_options.completion_window' {shown(self.completion_window)} needs "
                              "'background': true, which this server does not support",
                              param="background_options.completion_window")


def _is_set(value: Any) -> bool:
    """True when ``value`` asks for something: not null, false, empty, or an object of nothing but those."""
    if isinstance(value, dict):
        return any(_is_set(v) for v in value.values())
    return value not in (None, False, [], "")


class ResponsesRequest(StrictModel):
    """``POST /v1/responses`` body."""

    model: str = Field(min_length=1)
    input: Union[str, list[dict[str, Any]], None] = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    service_tier: ServiceTier | None = None
    # hints to api.openai.com's prompt cache and abuse checks: typed and echoed as there, nothing here to change
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: ResponsesPromptCacheOptions | None = None
    # a typo'd window or a non-object was taken and ignored: typed as in the SDK, so it is a 400 naming it
    background_options: BackgroundOptions | None = None
    safety_identifier: str | None = None
    # was untyped and ignored: a string or a number was a 200
    stream_options: ObfuscationOption | None = None

    def check(self) -> None:
        """Reject what this server cannot honour, naming the parameter."""
        extra = self.model_extra or {}
        for name, kinds in _UNSUPPORTED.items():
            check_json_type(extra.get(name), kinds, name)  # "" or [] of another type was taken as asking for nothing
            if _is_set(extra.get(name)):
                raise Unsupported(f"'{name}' is not supported by this server yet", param=name)
        for options in (self.background_options, self.prompt_cache_options):
            if options is not None:
                options.check()
        check_include(self.include or ())
        check_metadata(self.metadata)
        check_json_type(extra.get("reasoning"), ("an object",), "reasoning")  # (its effort: chat's reasoning_effort)
        for name, value in (extra.get("reasoning") or {}).items():
            if name != "effort" and _is_set(value):  # a summary: none is made
                raise Unsupported(f"'reasoning.{name}' is not supported by this server yet", param=f"reasoning.{name}")
        if self.stream_options is not None and not self.stream:  # as chat, in api.openai.com's words; null is fine
            raise InvalidRequest("The 'stream_options' parameter is only allowed when 'stream' is enabled.", param="stream_options")
        check_verbosity((self.text or {}).get("verbosity"), "text.verbosity")  # was accepted and ignored
        if self.input is None or self.input == "" or self.input == []:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")

    @property
    def effort(self) -> Any:
        """``reasoning.effort`` (chat's ``reasoning_effort``), or None."""
        return ((self.model_extra or {}).get("reasoning") or {}).get("effort")

    @property
    def logprobs(self) -> bool:
        """True when the output text's token logprobs were asked for (``include``)."""
        return LOGPROBS_INCLUDE in (self.include or ())

    def format_echo(self) -> dict[str, Any]:
        """``text.format`` as the Response shows it: as sent, a json_schema one named (as constrained) when it was not,
        since the SDK's type requires the name; ``{"type": "text"}`` when none was given."""
        fmt = (self.text or {}).get("format")
        if not fmt:
            return {"type": "text"}
        if fmt.get("type") == "json_schema" and fmt.get("name") is None:
            return {**fmt, "name": _DEFAULT_FORMAT_NAME}
        return fmt

    def response_format(self) -> dict[str, Any] | None:
        """``text.format`` as chat's ``response_format`` (None for plain text)."""
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise InvalidRequest("'text.format' must be an object with a 'type'", param="text.format")
        kind = fmt["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise InvalidRequest("'text.format.schema' must be a JSON schema object", param="text.format.schema")
            check_format_name(fmt.get("name"), "text.format.name")
            inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            inner.setdefault("name", _DEFAULT_FORMAT_NAME)
            return {"type": "json_schema", "json_schema": inner}
        raise InvalidRequest(f"Unknown text.format type {shown(kind)}", param="text.format.type")


# ---------------------------------------------------------------------- objects
def usage_object(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat ``usage`` in Responses shape."""
    if chat_usage is None:
        return None
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        # cache_write_tokens: required by the openai SDK's ResponseUsage (it read None); this server has no billed
        # prompt-cache writes (explicit caching), so always 0
        "input_tokens_details": {"cached_tokens": chat_usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                                 "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": (chat_usage.get("completion_tokens_details") or {}).get(
            "reasoning_tokens", 0)},
        "total_tokens": chat_usage["total_tokens"],
    }


class Turn:
    """One request in flight: its ids, parsed request and the conversation it extends."""

    def __init__(self, req: ResponsesRequest, items: list[dict[str, Any]], history: list[dict[str, Any]], user: str | None = None,
                 history_ids: frozenset[str] = frozenset()):
        self.user = user  # the owner of the stored response
        self.req = req
        self.items = items
        self.history = history
        self.history_ids = history_ids  # the ids of the items of ``history`` (StoredResponse.item_ids)
        self.rid = new_id("resp_")
        self.mid = new_id("msg_")
        self.created = int(time.time())

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, incomplete: dict[str, Any] | None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The Response object in the given state (``error``: what made a ``failed`` one fail)."""
        req = self.req
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            # as api.openai.com: when it finished, on a completed response only (the SDK's Response.completed_at)
            "completed_at": int(time.time()) if status == "completed" else None,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            # only what the server honours is echoed (and stored)
            "text": {"format": req.format_echo()},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "top_logprobs": req.top_logprobs,
            "truncation": req.truncation or "disabled",
            "usage": usage,
            "user": req.user,
            "metadata": req.metadata or {},
            "service_tier": served_tier(req.service_tier),
            "prompt_cache_key": req.prompt_cache_key,
            "prompt_cache_retention": req.prompt_cache_retention,
            "prompt_cache_options": req.prompt_cache_options.echo() if req.prompt_cache_options else None,
            "safety_identifier": req.safety_identifier,
            # the effort honoured (passed to the template); no summary is made
            "reasoning": {"effort": effort, "summary": None} if (effort := req.effort) is not None else None,
        }

    def finish(self, store: ResponseStore, output: list[dict[str, Any]], status: str, incomplete: Any, chat_usage: dict[str, Any] | None) -> dict[str, Any]:
        """The final Response; stored (with the conversation so far) unless ``store`` is false."""
        resp = self.response(status, output, usage_object(chat_usage), incomplete)
        if self.req.store is not False:
            conversation = self.history + items_to_messages(self.items) + items_to_messages(output)
            ids = self.history_ids.union([i["id"] for i in self.items], [o["id"] for o in output])
            store.put(self.rid, StoredResponse(resp, self.items, conversation, ids, owner=self.user))
        return resp


# ---------------------------------------------------------------------- serving
_PARAM_NAMES = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format",
                "reasoning_effort": "reasoning.effort"}


def _relabel(exc: XllmError) -> XllmError:
    """A chat error's ``param`` (and a chat parameter its message names) in Responses terms."""
    p = exc.param
    if p is not None:
        if isinstance(exc, PromptTooLong) and p == "messages":
            exc.reword("input")  # chat's "reduce the messages or completion" names nothing a Responses caller sent
        elif p == "messages" or p.startswith("messages["):
            exc.param = "input"
        elif p.split(".")[0] in _PARAM_NAMES:
            chat_name = p.split(".")[0]
            exc.param = _PARAM_NAMES[chat_name]
            exc.message = exc.message.replace(chat_name, exc.param)
        elif p.startswith(("guided_", "structured_outputs")):  # vLLM's fields keep their names; text.format is theirs
            exc.message = exc.message.replace("'response_format'", "'text.format'")
        elif p.startswith(("tools", "tool_choice")):
            # Responses tools are flat, and so is its allowed_tools tool choice
            exc.param = p.replace(".function", "").replace("tool_choice.allowed_tools.", "tool_choice.")
            exc.message = exc.message.replace(p, exc.param)
    return exc


def previous_response(store: ResponseStore, rid: str, owner: str | None) -> StoredResponse:
    """``owner``'s stored response ``rid``; else the 400 ``previous_response_not_found`` api.openai.com answers.

    Not a 404: agent loops branch on this code (and status) to send the whole conversation again, and
    another user's id reads the same as an unknown one, so ids still reveal nothing.
    """
    try:
        return store.get(rid, owner=owner)
    except NotFound:
        raise InvalidRequest(f"Previous response with id '{quoted(rid)}' not found.", param="previous_response_id",
                             code="previous_response_not_found") from None


#: stored conversations up to this many messages are re-serialized on the IOLoop
_INLINE_HISTORY = 2000


def _encoded(chat: dict[str, Any]) -> bytes:
    """The chat request body for ``chat``."""
    return json.dumps(chat).encode("utf-8")


class ResponsesServing:
    """``/v1/responses`` over an ``OpenAIServing`` and a ResponseStore."""

    def __init__(self, chat: Any, store: ResponseStore | None = None):
        self.chat = chat
        self.store = store if store is not None else ResponseStore()  # an empty store is falsy (__len__)

    async def _chat_request(self, body: bytes, user: str | None) -> tuple[ResponsesRequest, list[dict[str, Any]], StoredResponse | None, bytes]:
        """``body`` checked and translated: the request, its input items, the stored response it continues
        (``previous_response_id``, ``user``'s own only) and the chat completion request body it becomes."""
        big = is_big(body)  # then parsing, translating and re-serializing run off the IOLoop
        req: ResponsesRequest = await parse_body(ResponsesRequest, body)
        chat: dict[str, Any] = {"model": req.model}
        fmt = req.response_format()
        if fmt is not None:
            chat["response_format"] = fmt
        if req.tools:
            chat["tools"] = chat_tools(req.tools)
        if req.tool_choice is not None:
            chat["tool_choice"] = chat_tool_choice(req.tool_choice)
        # item references looked up here, on the IOLoop, which alone may read the store (a dict lookup per reference)
        given, referenced = resolve_references(req.input, lambda iid: self.store.find_item(iid, user))
        big = big or is_big_text(referenced)
        items = await off_loop_if(big, normalize_input, given)
        previous = None
        if req.previous_response_id is not None:
            previous = previous_response(self.store, req.previous_response_id, user)
            check_items_new(items, previous.item_ids)  # (held per response: no walk of the chain, deleted parts counted)
        history = previous.conversation if previous is not None else []
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        chat["messages"] = system + history + await off_loop_if(big, items_to_messages, items)
        # every call answered right after it: checked here to say so in Responses terms (the chat check would too)
        await off_loop_if(big or len(history) > _INLINE_HISTORY, check_function_outputs, chat["messages"])
        for src, dst in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("user", "user"), ("parallel_tool_calls", "parallel_tool_calls")):
            if getattr(req, src) is not None:
                chat[dst] = getattr(req, src)
        if req.logprobs:
            chat["logprobs"] = True
            chat["top_logprobs"] = req.top_logprobs or 0
        extra = req.model_extra or {}
        chat.update({k: extra[k] for k in _CHAT_EXTENSIONS if k in extra})
        if req.effort is not None:
            chat["reasoning_effort"] = req.effort
        # streamed whole or not: a whole Response is the stream's last one (create)
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
        # a long stored conversation costs as much to re-serialize as a big body
        chat_body = await off_loop_if(big or len(history) > _INLINE_HISTORY, _encoded, chat)
        return req, items, previous, chat_body

    async def create(self, body: bytes, user: str | None = None) -> dict[str, Any] | AsyncIterator[Event]:
        """``POST /v1/responses``: a Response, or typed events when ``stream`` is true.

        ``user`` owns the stored response; only they can retrieve, continue or delete it.
        """
        req, items, previous, chat_body = await self._chat_request(body, user)
        turn = (Turn(req, items, previous.conversation, user, previous.item_ids) if previous is not None
                else Turn(req, items, [], user))
        try:
            result = await self.chat.chat_completion(chat_body, user=user, truncate=req.truncation == "auto")
        except XllmError as exc:
            raise _relabel(exc) from None
        events = ResponseEventStream(turn, self.store, result)
        if req.stream:
            return events
        # A whole Response is the one its stream ends with: the same items in generation order (a message per run of
        # text, as the calls between them cut it), each message with its own tokens' logprobs, however they were grouped
        final: Event = {}
        try:
            async for final in events:
                pass
        except XllmError as exc:
            raise _relabel(exc) from None
        finally:
            await events.aclose()  # (a request cancelled meanwhile cancels its generation)
        return final["response"]

    async def input_tokens(self, body: bytes, user: str | None = None) -> dict[str, Any]:
        """``POST /v1/responses/input_tokens``: the ``usage.input_tokens`` that ``create`` would report for the same
        body (instructions, tools, ``user``'s ``previous_response_id`` chain, ``truncation``), generating nothing."""
        req, _, _, chat_body = await self._chat_request(body, user)
        try:
            count = await self.chat.chat_prompt_tokens(chat_body, truncate=req.truncation == "auto", user=user)
        except XllmError as exc:
            raise _relabel(exc) from None
        return {"object": "response.input_tokens", "input_tokens": count}

    # ----------------------------------------------------------- stored objects
    def retrieve(self, rid: str, user: str | None = None, query: Mapping[str, str] | None = None,
                 include: Sequence[str] = ()) -> dict[str, Any]:
        """``GET /v1/responses/{id}``; 404 when unknown, deleted, created with ``store: false`` or another user's.

        ``?stream=true`` (the SDK's ``retrieve(id, stream=True)``) streams a background response's events on
        api.openai.com: a 400 here, where there are none (answered as JSON, the SDK saw an empty stream).
        """
        found = self.store.get(rid, owner=user).response
        check_include(include)  # what a stored response holds was fixed by its create's include; a bad value is a 400
        if (query or {}).get("stream", "false").lower() not in ("false", "0", ""):
            raise InvalidRequest("Only responses created with background=true can be streamed when retrieved; this "
                                 "server does not support 'background', so retrieve the finished response without "
                                 "stream.", param="stream")
        return found

    def cancel(self, rid: str, user: str | None = None) -> None:
        """``POST /v1/responses/{id}/cancel``: 404 when unknown, else a 400, as api.openai.com answers for a
        response not created with ``background`` (which this server never runs: every response is finished)."""
        self.store.get(rid, owner=user)
        raise InvalidRequest("Only responses created with background=true can be cancelled; this server does not "
                             "support 'background', so every response it returns is already complete.")

    def delete(self, rid: str, user: str | None = None) -> dict[str, Any]:
        """``DELETE /v1/responses/{id}`` (``user``'s own responses only)."""
        self.store.delete(rid, owner=user)
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def input_items(self, rid: str, query: Mapping[str, str], user: str | None = None, include: Sequence[str] = ()) -> dict[str, Any]:
        """``GET /v1/responses/{id}/input_items``: this request's input items, one page (``limit``, ``order``
        (default ``desc``), ``after``; ``include`` values checked)."""
        limit = page_limit(query)
        items = self.store.get(rid, owner=user).input_items
        check_include(include)
        return cursor_page(items, limit, query.get("order", "desc"), query.get("after"), "input item in this response")
