"""A turn's tool results sent in another order than its calls (a client running calls at once appends each as it
ends; OpenAI matches them by ``tool_call_id``) reach the model in the order of the calls: chat templates show results
by position, so the model read them as the answers of the wrong calls. Real server, real SDK, seeded tiny model."""

from __future__ import annotations

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.openai.protocol import WireMessage
from xllm_jupyter.openai.conversation import core_messages

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALLS = [{"id": f"call_{c}", "type": "function", "function": {"name": "weather", "arguments": f'{{"city": "{c}"}}'}}
         for c in ("Oslo", "Lima", "Rome")]
RESULTS = {"call_Oslo": "-5 C", "call_Lima": "22 C", "call_Rome": "15 C"}


def _history(order: list[str]) -> list[dict]:
    return [{"role": "user", "content": "Weather in Oslo, Lima and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": CALLS},
            *({"role": "tool", "tool_call_id": i, "content": RESULTS[i]} for i in order)]


def test_results_are_put_in_call_order():
    messages = core_messages([WireMessage(**m) for m in _history(["call_Rome", "call_Oslo", "call_Lima"])])
    assert [m.tool_call_id for m in messages[2:]] == ["call_Oslo", "call_Lima", "call_Rome"]
    assert [m.content for m in messages[2:]] == ["-5 C", "22 C", "15 C"]


def _scores(content) -> list[tuple[str, float]]:
    """Each token and its logprob: equal prompts score alike, while the random model's text rarely tells two apart."""
    return [(t.token, t.logprob) for t in content]


@pytest.mark.parametrize("order", [["call_Rome", "call_Oslo", "call_Lima"], ["call_Lima", "call_Oslo", "call_Rome"]])
def test_a_reply_does_not_depend_on_the_order_results_were_sent_in(client, order):
    kw = dict(model=TINY, tools=TOOLS, max_tokens=4, seed=3, logprobs=True)
    ordered = client.chat.completions.create(messages=_history(list(RESULTS)), **kw).choices[0].logprobs.content
    shuffled = client.chat.completions.create(messages=_history(order), **kw).choices[0].logprobs.content
    assert _scores(shuffled) == _scores(ordered)  # the prompts differed: other scores


def test_responses_function_outputs_in_any_order(client):
    calls = [{"type": "function_call", "call_id": c["id"], "name": "weather", "arguments": c["function"]["arguments"]}
             for c in CALLS]
    outputs = [{"type": "function_call_output", "call_id": i, "output": RESULTS[i]} for i in RESULTS]
    tool = {"type": "function", "name": "weather", "parameters": TOOLS[0]["function"]["parameters"]}
    kw = dict(model=TINY, tools=[tool], max_output_tokens=16, include=["message.output_text.logprobs"],
              extra_body={"seed": 3})
    ask = [{"role": "user", "content": "Weather?"}, *calls]
    ordered = client.responses.create(input=[*ask, *outputs], **kw).output[0].content[0].logprobs
    shuffled = client.responses.create(input=[*ask, *outputs[::-1]], **kw).output[0].content[0].logprobs
    assert _scores(shuffled) == _scores(ordered)
