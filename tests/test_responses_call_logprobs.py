"""A streamed Response of function calls with output text logprobs asked for has the whole Response's items.

The chat stream sends the logprobs of a call's tokens with its tool-call chunks and its last one; the Responses
stream took any chunk's logprobs for the output text, so it opened an empty message before the call and another
after it: ``[message, function_call, message]`` where the whole Response is ``[function_call]``.
"""

from __future__ import annotations

from tests.server_fixtures import TINY
from tests.test_responses import FORCED, WEATHER


def test_streamed_calls_with_logprobs_open_no_message(client):
    kw = dict(model=TINY, input="Weather?", tools=[WEATHER], tool_choice=FORCED, max_output_tokens=60, temperature=0,
              include=["message.output_text.logprobs"])
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [o.type for o in whole.output] == [o.type for o in final.output] == ["function_call"]
    assert not any(e.type.startswith("response.output_text") for e in events)
