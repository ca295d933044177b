"""A streamed chat completion put back together: the ``chat.completion`` a client assembles from its chunks."""

from __future__ import annotations

from typing import Any

Chunk = dict[str, Any]


class _Choice:
    """One choice as its deltas arrive."""

    def __init__(self) -> None:
        self.parts: list[str] | None = None  # the content's pieces, joined once at the end (None: no content yet)
        self.thought: list[str] | None = None  # a reasoning model's thinking (reasoning.py), None: none streamed
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index -> the call so far
        self.function_call: dict[str, Any] | None = None  # a legacy function call so far (legacy_functions.py)
        self.logprobs: list[dict[str, Any]] | None = None  # None until a chunk of this choice carries some
        self.finish: str | None = None
        self.stop_reason: str | int | None = None  # vLLM's, on the choice's last chunk

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text is not None:
            # the opening delta's "" makes a reply with no text "" (as the full response has it); a
            # reply forced to be tool calls opens with null and keeps it
            if self.parts is None:
                self.parts = []
            self.parts.append(text)
        if delta.get("reasoning_content"):
            if self.thought is None:
                self.thought = []
            self.thought.append(delta["reasoning_content"])
        for frag in delta.get("tool_calls") or ():
            fn = frag.get("function") or {}
            call = self.calls.get(frag["index"])
            if call is None:
                call = self.calls[frag["index"]] = {"id": frag.get("id"), "type": frag.get("type", "function"),
                                                    "function": {"name": fn.get("name"), "arguments": ""}}
            call["function"]["arguments"] += fn.get("arguments") or ""
        piece = delta.get("function_call")
        if piece:
            if self.function_call is None:
                self.function_call = {"name": piece.get("name"), "arguments": ""}
            self.function_call["arguments"] += piece.get("arguments") or ""
        lp = choice.get("logprobs")
        if lp is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(lp.get("content") or ())  # in place: a copy per chunk is quadratic in the reply
        self.finish = choice.get("finish_reason") or self.finish
        self.stop_reason = choice.get("stop_reason", self.stop_reason)

    def wire(self, index: int) -> dict[str, Any]:
        content = None if self.parts is None else "".join(self.parts)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if self.thought is not None:
            message["reasoning"] = message["reasoning_content"] = "".join(self.thought)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        if self.function_call is not None:
            message["function_call"] = self.function_call
        logprobs = None if self.logprobs is None else {"content": self.logprobs, "refusal": None}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": self.finish or "stop",
                "stop_reason": self.stop_reason}


class CompletionAssembler:
    """Feed it every chunk of a chat stream; ``completion()`` is the ``chat.completion`` they make."""

    def __init__(self) -> None:
        self._head: Chunk | None = None
        self._choices: dict[int, _Choice] = {}
        self._usage: dict[str, Any] | None = None

    def add(self, chunk: Chunk) -> None:
        """Take one chunk (content, tool-call fragments, logprobs, finish reason, usage)."""
        if self._head is None:
            self._head = chunk
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._choices.setdefault(choice["index"], _Choice()).add(choice)

    def completion(self) -> dict[str, Any]:
        """The assembled completion: the chunks' id, created and model, every choice, the usage chunk's usage."""
        head = self._head or {}
        done = {
            "id": head.get("id"),
            "object": "chat.completion",
            "created": head.get("created"),
            "model": head.get("model"),
            "system_fingerprint": head.get("system_fingerprint"),
            "choices": [self._choices[i].wire(i) for i in sorted(self._choices)],
            "usage": self._usage,
        }
        if "service_tier" in head:  # set only when the request asked for a tier (as the full response has it)
            done["service_tier"] = head["service_tier"]
        return done
