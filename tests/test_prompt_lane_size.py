"""What counts towards a chat prompt's size when choosing the huge-prompt lane (engine/prompt_lane.py)."""

from __future__ import annotations

from xllm_jupyter.core.types import ChatMessage
from xllm_jupyter.engine.prompt_lane import BIG_PROMPT_CHARS, chat_chars

HUGE = "x" * (BIG_PROMPT_CHARS + 1)


def test_tool_call_arguments_count_as_the_prompt_text_they_become():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "' + HUGE + '"}'}}
    messages = [ChatMessage("user", "hi"), ChatMessage("assistant", None, tool_calls=[call]),
                ChatMessage("tool", "ok", tool_call_id="call_1")]
    assert chat_chars(messages, None) > BIG_PROMPT_CHARS  # the template renders the arguments: a huge prompt


def test_thinking_sent_back_counts_as_the_prompt_text_it_becomes():
    messages = [ChatMessage("user", "hi"), ChatMessage("assistant", "ok", reasoning_content=HUGE)]
    assert chat_chars(messages, None) > BIG_PROMPT_CHARS  # Qwen3's template renders it after the last user turn


def test_content_and_tools_count_and_a_small_chat_is_small():
    assert chat_chars([ChatMessage("user", HUGE)], None) > BIG_PROMPT_CHARS
    assert chat_chars([ChatMessage("user", "hi")], [{"type": "function", "function": {"name": HUGE}}]) > BIG_PROMPT_CHARS
    assert chat_chars([ChatMessage("user", "hi"), ChatMessage("assistant", "hello")], None) == 7
