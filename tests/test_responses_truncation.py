"""Responses ``truncation: "auto"``: the oldest messages are dropped to fit the context (real server, tiny Llama)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.core.types import ChatMessage
from xllm_jupyter.openai.truncation import cut_points, fit_front

#: about 1,200 tokens of the tiny model's tokenizer: two of them overflow its 2,048-token context
LONG = "alpha beta gamma delta " * 300


def _msgs(*roles: str) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=f"{r}{i}") for i, r in enumerate(roles)]


def _fit(messages: list[ChatMessage], limit: int) -> tuple[list[int], int]:
    """fit_front with one 'token' per message, its position: (the prompt, how many were dropped)."""

    async def encode(kept: list[ChatMessage]) -> list[int]:
        return [messages.index(m) for m in kept]

    return asyncio.run(fit_front(messages, list(range(len(messages))), limit, encode))


def test_cut_points_keep_system_messages_and_never_start_at_a_tool_result():
    msgs = _msgs("system", "developer", "user", "assistant", "tool", "tool", "user", "assistant")
    head, starts = cut_points(msgs)
    assert head == 2
    assert starts == [3, 6, 7]  # not 4/5 (tool results), not 2 (nothing dropped)


def test_fit_front_drops_the_fewest_oldest_messages():
    msgs = _msgs("system", "user", "assistant", "user", "assistant", "user")
    assert _fit(msgs, 10) == ([0, 1, 2, 3, 4, 5], 0)  # fits: untouched
    assert _fit(msgs, 5) == ([0, 2, 3, 4, 5], 1)
    assert _fit(msgs, 4) == ([0, 3, 4, 5], 2)
    assert _fit(msgs, 2) == ([0, 5], 4)
    # a tool result stays with its call: the cut moves past both
    msgs = _msgs("user", "assistant", "tool", "tool", "user")
    assert _fit(msgs, 4) == ([1, 2, 3, 4], 1)
    assert _fit(msgs, 3) == ([4], 4)


def test_fit_front_returns_the_prompt_when_nothing_fits():
    msgs = _msgs("system", "user", "assistant", "user")
    assert _fit(msgs, 1) == ([0, 1, 2, 3], 0)  # the caller's context error stands
    assert _fit(_msgs("user"), 0) == ([0], 0)


def test_auto_truncation_drops_old_turns_of_a_long_chain(client):
    first = client.responses.create(model=TINY, input=LONG, max_output_tokens=4)
    assert first.usage.input_tokens > 1024
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input=LONG, previous_response_id=first.id, max_output_tokens=4)
    assert exc.value.code == "context_length_exceeded"
    assert exc.value.param == "input"

    second = client.responses.create(model=TINY, input=LONG, previous_response_id=first.id,
                                     max_output_tokens=4, truncation="auto", instructions="Be brief.")
    assert second.truncation == "auto"
    assert second.status in ("completed", "incomplete")
    # the first turn was dropped: the prompt is about one LONG, not two
    assert first.usage.input_tokens - 50 < second.usage.input_tokens < first.usage.input_tokens + 50
    assert second.usage.input_tokens + 4 <= 2048
    # the stored conversation is still whole: a third turn without truncation fails again
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=TINY, input="and now?", previous_response_id=second.id, max_output_tokens=4)


def test_auto_truncation_streams_and_keeps_the_latest_input(client):
    items = [{"role": "user", "content": LONG}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": LONG}]
    events = list(client.responses.create(model=TINY, input=items, max_output_tokens=3, truncation="auto", stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    final = events[-1].response
    assert final.usage.output_tokens >= 1
    assert 1024 < final.usage.input_tokens <= 2048 - 3


def test_auto_truncation_still_fails_when_the_latest_message_alone_overflows(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input=[{"role": "user", "content": LONG},
                                                   {"role": "user", "content": LONG + LONG}],
                                max_output_tokens=4, truncation="auto")
    assert exc.value.code == "context_length_exceeded"
