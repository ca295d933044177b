"""End to end on real text: the packaged SmolLM2 pulled into a store, served over HTTP, asked with the openai SDK."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_answer_names_paris(smollm2_server):
    import openai

    client = openai.OpenAI(base_url=smollm2_server.base_url, api_key=smollm2_server.api_key, max_retries=0)
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 24


def test_concurrent_streams_on_real_text_are_batched_and_agree(smollm2_server):
    import openai

    client = openai.AsyncOpenAI(base_url=smollm2_server.base_url, api_key=smollm2_server.api_key, max_retries=0)
    before = smollm2_server.engine.stats().batched_steps

    async def ask() -> str:
        stream = await client.chat.completions.create(
            model="smollm2", messages=QUESTION, temperature=0, max_tokens=16, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(ask() for _ in range(4)))
        finally:
            await client.close()

    answers = asyncio.run(main())
    assert all("Paris" in a for a in answers)
    assert len(set(answers)) == 1  # greedy decoding gives the same text alone or batched
    assert smollm2_server.engine.stats().batched_steps > before


def test_a_forced_tool_call_ends_when_the_model_repeats_it(smollm2_server):
    """SmolLM2, forced to call a tool with parallel calls allowed, writes the same call again and again: the
    reply ends at the first repeat with one call and finish tool_calls (it ran to max_tokens, finish length,
    which the SDK's parse() rejects), streamed or not."""
    import openai

    client = openai.OpenAI(base_url=smollm2_server.base_url, api_key=smollm2_server.api_key, max_retries=0)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                       "required": ["city"], "additionalProperties": False}}}]
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                  tools=tools, tool_choice="required", max_tokens=150, temperature=0)
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city":"Paris"}')]
    assert reply.usage.completion_tokens < 150  # stopped at the repeat, not at max_tokens
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    calls = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert {f.index for f in calls} == {0} and "".join(f.function.arguments or "" for f in calls) == '{"city":"Paris"}'
    assert 0 < chunks[-1].usage.completion_tokens < 150
