"""A reasoning model's thinking as the client hands it on: pieces of ``reasoning_content``, told apart from the answer."""

from __future__ import annotations

from typing import Any, Mapping


class Thinking(str):
    """A piece of a reply's thinking (the server's ``reasoning_content``), never of its answer: front-ends show it
    apart and keep it out of the conversation they send back."""

    __slots__ = ()


def delta_thinking(chunk: Mapping[str, Any]) -> str:
    """The thinking text a chat chunk adds to the first choice ("" where it adds none): DeepSeek's
    ``reasoning_content``, else vLLM's newer ``reasoning``."""
    choices = chunk.get("choices") or ()
    if not choices or choices[0].get("index", 0) != 0:
        return ""
    delta = choices[0].get("delta") or {}
    return delta.get("reasoning_content") or delta.get("reasoning") or ""


def message_thinking(body: Mapping[str, Any]) -> str:
    """The thinking of a non-streamed chat completion's first choice ("" where it has none)."""
    choices = body.get("choices") or ()
    message = (choices[0].get("message") or {}) if choices else {}
    return message.get("reasoning_content") or message.get("reasoning") or ""


def no_answer_note(finish_reason: str | None, tokens: Any = None, limit: str = "max_tokens") -> str:
    """What every front-end says under a reply that thought and gave no answer, in the same words: cut at the max
    tokens (``finish_reason`` "length"), that its ``tokens`` (the reply's completion tokens, where known) all went to
    the thinking, and to raise ``limit`` (the front-end's name for it); ended by the model, that it stopped there."""
    if finish_reason == "length":
        spent = f"all {tokens} tokens" if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 \
            else "every token"
        return f"the model spent {spent} thinking and gave no answer: raise {limit}"
    if finish_reason is None:
        return "no answer came after the thinking"
    return "the model stopped after its thinking and gave no answer"
