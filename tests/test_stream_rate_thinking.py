"""A reasoning model's decode speed counts from its first generated piece, thinking included: the server's completion
tokens include the thinking, so timing from the first answer piece made ``tok_per_s`` too high (compare, profile).
The random tiny model thinks and answers by a grammar over the marker tokens (seeded). Real server."""

from __future__ import annotations

import asyncio
import math

from tests.test_cli_thinking import ANSWER, server  # noqa: F401 (the module's server fixture)
from xllm_jupyter.client import AsyncXllmClient
from xllm_jupyter.notebook.streams import measure_stream


def test_the_decode_rate_spans_the_thinking_too(server):  # noqa: F811
    grammar = server.grammar.replace("plan it", "a plan that goes on for a good many words before it ends")
    thoughts: list[str] = []

    async def go():
        async with AsyncXllmClient(server.base_url, api_key=server.api_key) as client:
            return await measure_stream(client, [{"role": "user", "content": "Hi"}], "think",
                                        {"guided_grammar": grammar, "seed": 1, "max_tokens": 64},
                                        on_thinking=thoughts.append)

    record = asyncio.run(go())
    assert record.error is None and record.text == ANSWER and "good many" in "".join(thoughts)
    assert record.first_s < record.ttft_s  # the thinking came first; the answer's first piece is the TTFT
    expected = (record.completion_tokens - 1) / (record.latency_s - record.first_s)
    assert math.isclose(record.tok_per_s, expected)
    assert record.tok_per_s < (record.completion_tokens - 1) / (record.latency_s - record.ttft_s)
