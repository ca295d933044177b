"""A Response's events (``/v1/responses``): chat chunks in, typed Responses events out; a whole Response is the last's."""

from __future__ import annotations

from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncIterator

from .response_items import function_call_item, last_item_status, message_item, new_id, reasoning_item, response_status
from .harmony import CALL, CHANNEL, END, MARKERS, MESSAGE, RETURN, START, shown as harmony_shown
from .reasoning import MAGISTRAL, THINK
from .response_store import ResponseStore

if TYPE_CHECKING:
    from .responses import Turn

Event = dict[str, Any]

#: the codes a failed Response's ``error.code`` may have that this server can mean (the SDK's ResponseError.code is an
#: enum of OpenAI's); any other error code is a ``server_error`` there, its own code staying on the ``error`` event
_RESPONSE_ERROR_CODES = ("server_error", "rate_limit_exceeded", "invalid_prompt")


class ResponseEventStream:
    """A streamed Response: chat chunks in, typed Responses events out, one output item at a time.

    Items are streamed as OpenAI streams them: each is added, filled and done before the
    next is added (a reasoning model's thinking, then its answer's runs of text and function calls in the order they
    were generated, a message per run), so ``output_index`` only grows and a client may treat ``output_item.done`` as
    final. When the request cut the reply short,
    the item open at the cut is ``incomplete``; those closed before it are ``completed``.
    """

    def __init__(self, turn: Turn, store: ResponseStore, chunks: AsyncIterator[dict[str, Any]]):
        self._turn = turn
        self._store = store
        self._chunks = chunks
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # items in output order; the last may still be open
        self._open = False  # whether the last item in _output is still being streamed
        self._texts: list[str] = []  # the open message's (or reasoning item's) text so far
        self._want_lp = turn.req.logprobs
        # a harmony message's header read so far (None: in a body), and whether the body is one the text leaves out
        self._header: str | None = None  # (_text_tokens)
        self._hidden = False
        self._logprobs: list[dict[str, Any]] = []  # the open message's token logprobs so far (when asked for)
        self._unsent: list[dict[str, Any]] = []  # those of tokens with no text yet (part of a character): the next delta's
        self._events = self._run()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events

    async def aclose(self) -> None:
        """Stop early (closes the chat stream, which cancels the generation)."""
        await self._events.aclose()

    def failure_events(self, body: dict[str, Any]) -> list[Event]:
        """The events that end this stream when it fails midway with OpenAI error ``body``.

        An ``error`` event (its fields as OpenAI's, with this server's code; the ``error`` object too, which makes the
        openai SDKs raise ``APIError`` as they do for chat) and ``response.failed``, whose response is not stored
        (its ``error.code`` one of OpenAI's: ``server_error`` for e.g. ``overloaded``; its output what was streamed, the
        item cut ``incomplete``).
        """
        err = body.get("error") or {}
        message = err.get("message") or "The response failed."
        code = err.get("code") or "server_error"
        summary = {"code": code if code in _RESPONSE_ERROR_CODES else "server_error", "message": message}
        output = list(self._output)
        if self._open_is("message"):
            # the text streamed so far (an open message holds none until closed; an open call its arguments already)
            item = output[-1]
            output[-1] = message_item("assistant", "".join(self._texts), item["id"], "incomplete",
                                      self._logprobs if self._want_lp else None)
        elif self._open_is("reasoning"):
            output[-1] = reasoning_item("".join(self._texts), output[-1]["id"], "incomplete")
        elif self._open:
            output[-1] = {**output[-1], "status": "incomplete"}
        failed = self._turn.response("failed", output, None, None, error=summary)
        return [
            self._event("error", code=code, message=message, param=err.get("param"), error=err),
            self._event("response.failed", response=failed),
        ]

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, **fields: Any) -> Event:
        self._seq += 1
        return {"type": kind, **fields, "sequence_number": self._seq - 1}

    def _open_message(self) -> list[Event]:
        # the first message has the id a non-streamed reply would give it; a later one (text after a call) a new one
        mid = self._turn.mid if not any(i["type"] == "message" for i in self._output) else new_id("msg_")
        self._output.append(message_item("assistant", "", mid, "in_progress"))
        self._open, self._texts, self._logprobs, self._unsent = True, [], [], []
        at = len(self._output) - 1
        return [
            self._event("response.output_item.added", output_index=at, item={**self._output[-1], "content": []}),
            self._event("response.content_part.added", item_id=mid, output_index=at, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []}),
        ]

    def _open_reasoning(self) -> list[Event]:
        self._output.append(reasoning_item("", None, "in_progress"))
        self._open, self._texts = True, []
        at, rid = len(self._output) - 1, self._output[-1]["id"]
        return [
            self._event("response.output_item.added", output_index=at, item={**self._output[-1], "content": []}),
            self._event("response.content_part.added", item_id=rid, output_index=at, content_index=0,
                        part={"type": "reasoning_text", "text": ""}),
        ]

    def _open_call(self, call_id: str, name: str) -> list[Event]:
        self._output.append(function_call_item(call_id, name, "", status="in_progress"))
        self._open = True
        return [self._event("response.output_item.added", output_index=len(self._output) - 1, item=dict(self._output[-1]))]

    def _close(self, status: str = "completed") -> list[Event]:
        """Finish the open item (nothing when none is open)."""
        if not self._open:
            return []
        self._open = False
        at = len(self._output) - 1
        item = self._output[at]
        if item["type"] == "message":
            text = "".join(self._texts)
            self._output[at] = done = message_item("assistant", text, item["id"], status, self._logprobs if self._want_lp else None)
            events = [
                self._event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0, text=text,
                            logprobs=self._logprobs),
                self._event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0, part=done["content"][0]),
            ]
        elif item["type"] == "reasoning":
            text = "".join(self._texts)
            self._output[at] = done = reasoning_item(text, item["id"], status)
            events = [
                self._event("response.reasoning_text.done", item_id=item["id"], output_index=at, content_index=0, text=text),
                self._event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0,
                            part=done["content"][0]),
            ]
        else:
            self._output[at] = done = {**item, "status": last_item_status(item, status)}
            events = [self._event("response.function_call_arguments.done", item_id=done["id"], output_index=at,
                                  name=done["name"], arguments=done["arguments"])]
        return events + [self._event("response.output_item.done", output_index=at, item=done)]

    def _text_tokens(self, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``logprobs`` less a harmony reply's markers, message headers (``<|end|><|start|>assistant<|channel|>final
        <|message|>``, which the chat stream sends with the text after them) and the bodies the text leaves out (a
        built-in tool's message: harmony.py), so the output text's tokens are its own. A header may end in a later
        piece than it began (the state is kept), so pieces never matter."""
        kept = []
        for entry in logprobs:
            token = entry.get("token") or ""
            if token in (START, CHANNEL):
                self._header = (self._header or "") + token
            elif token == MESSAGE and self._header is not None:
                self._hidden = not harmony_shown(self._header)
                self._header = None
            elif token in (END, RETURN, CALL):  # (a header closed without a body: the next begins afresh)
                self._header = None
            elif self._header is not None and token not in MARKERS:
                self._header += token
            elif token not in MARKERS and not self._hidden:
                kept.append(entry)
        return kept

    def _open_is(self, kind: str) -> bool:
        return self._open and self._output[-1]["type"] == kind

    async def _run(self) -> AsyncIterator[Event]:
        turn = self._turn
        yield self._event("response.created", response=turn.response("in_progress", [], None, None))
        yield self._event("response.in_progress", response=turn.response("in_progress", [], None, None))
        calls: dict[int, int] = {}  # chat tool-call index -> output index
        finish = None
        usage = None
        async with aclosing(self._chunks):  # type: ignore[type-var]
            async for chunk in self._chunks:
                choices = chunk["choices"]
                if not choices:
                    usage = chunk.get("usage") or usage
                    continue
                delta = choices[0]["delta"]
                finish = choices[0]["finish_reason"] or finish
                thought = delta.get("reasoning_content")  # a reasoning model's thinking, before its answer
                # (the thinking's token logprobs are not the output text's)
                logprobs = [] if thought else (choices[0].get("logprobs") or {}).get("content") or []
                if logprobs and (self._open_is("reasoning") or not self._output):
                    # the answer's first: the thinking's end rides on it, an empty block's whole too ("<think>\n
                    # </think>" opens no reasoning item; the whole Response's logprobs start after its end all the same)
                    logprobs = _after_thinking(logprobs)
                if delta.get("tool_calls") or (calls and not delta.get("content")):
                    logprobs = []  # a call's tokens' (as the whole Response has them): they open no message
                logprobs = self._text_tokens(logprobs)
                if thought:
                    if not self._open_is("reasoning"):
                        for ev in self._close() + self._open_reasoning():
                            yield ev
                    self._texts.append(thought)
                    yield self._event("response.reasoning_text.delta", item_id=self._output[-1]["id"],
                                      output_index=len(self._output) - 1, content_index=0, delta=thought)
                if delta.get("content") or logprobs:
                    if not self._open_is("message"):
                        for ev in self._close() + self._open_message():
                            yield ev
                    self._logprobs += logprobs
                    self._unsent += logprobs
                if delta.get("content"):
                    self._texts.append(delta["content"])
                    at = len(self._output) - 1
                    yield self._event("response.output_text.delta", item_id=self._output[at]["id"], output_index=at,
                                      content_index=0, delta=delta["content"], logprobs=self._unsent)
                    self._unsent = []
                for tc in delta.get("tool_calls") or ():
                    fn = tc.get("function") or {}
                    if tc["index"] not in calls:
                        for ev in self._close() + self._open_call(tc["id"], fn.get("name", "")):
                            yield ev
                        calls[tc["index"]] = len(self._output) - 1
                    at = calls[tc["index"]]
                    if fn.get("arguments"):
                        self._output[at]["arguments"] += fn["arguments"]
                        yield self._event("response.function_call_arguments.delta", item_id=self._output[at]["id"],
                                          output_index=at, delta=fn["arguments"])
        if not self._output:
            for ev in self._open_message():
                yield ev
        status, incomplete = response_status(finish)
        for ev in self._close(status):
            yield ev
        final = turn.finish(self._store, self._output, status, incomplete, usage)
        yield self._event("response.completed" if status == "completed" else "response.incomplete", response=final)


def _after_thinking(logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The answer's first token logprobs without those of the thinking's last tokens and end marker, which the chat
    stream holds back with the marker and sends with the answer's first piece (the whole reply's output text
    logprobs start after the marker too); all of them where no marker is among them."""
    text = ""
    for i, entry in enumerate(logprobs):
        text += entry.get("token") or ""
        if THINK[1] in text or MAGISTRAL[1] in text:
            return logprobs[i + 1:]
    return logprobs
