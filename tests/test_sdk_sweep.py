"""openai SDK 3.63 methods that target routes this server serves, each round-tripped through the real SDK against
the session server (random-weight tiny Llama: schemas bound their strings so forced output ends)."""

from __future__ import annotations

import openai
import pydantic
import pytest

from .server_fixtures import TINY

MSG = [{"role": "user", "content": "Weather in Paris?"}]


class Place(pydantic.BaseModel):
    """A structured answer whose fields a random model fills within a few tokens."""

    city: str = pydantic.Field(max_length=8)
    n: int = pydantic.Field(ge=0, le=99)


def test_retrieving_a_response_with_stream_true_is_a_400_not_an_empty_stream(client):
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=3)
    with pytest.raises(openai.BadRequestError) as caught:  # was a JSON body the SDK read as a stream of no events
        list(client.responses.retrieve(r.id, stream=True))
    assert caught.value.body["param"] == "stream" and "background" in caught.value.body["message"]
    assert client.responses.retrieve(r.id).id == r.id  # without stream, as before
    with pytest.raises(openai.NotFoundError):  # an unknown id is still a 404 first
        client.responses.retrieve("resp_nope", stream=True)


def test_chat_stream_helper_parses_structured_output_and_tool_arguments(client):
    with client.chat.completions.stream(model=TINY, messages=MSG, response_format=Place, max_tokens=200, seed=1) as s:
        kinds = {e.type for e in s}
        final = s.get_final_completion()
    assert {"content.delta", "content.done"} <= kinds
    assert isinstance(final.choices[0].message.parsed, Place)
    tool = openai.pydantic_function_tool(Place)
    with client.chat.completions.stream(model=TINY, messages=MSG, tools=[tool], tool_choice="required", max_tokens=200,
                                        seed=1) as s:
        kinds = {e.type for e in s}
        final = s.get_final_completion()
    assert "tool_calls.function.arguments.done" in kinds
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments, Place)


def test_responses_stream_and_parse_helpers(client):
    with client.responses.stream(model=TINY, input="Weather?", text_format=Place, max_output_tokens=200) as s:
        kinds = {e.type for e in s}
        final = s.get_final_response()
    assert {"response.created", "response.output_text.done", "response.completed"} <= kinds
    assert isinstance(final.output_parsed, Place)
    with client.responses.stream(model=TINY, input="Weather?", tools=[openai.pydantic_function_tool(Place)],
                                 tool_choice="required", parallel_tool_calls=False, max_output_tokens=200) as s:
        kinds = {e.type for e in s}
        final = s.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    calls = [o for o in final.output if o.type == "function_call"]
    assert calls and isinstance(calls[0].parsed_arguments, Place)
    assert isinstance(client.responses.parse(model=TINY, input="W", text_format=Place, max_output_tokens=200).output_parsed,
                      Place)


def test_raw_and_streaming_response_wrappers(client):
    raw = client.models.with_raw_response.list()
    assert raw.status_code == 200 and TINY in [m.id for m in raw.parse().data]
    with client.models.with_streaming_response.retrieve(TINY) as streamed:
        assert streamed.parse().id == TINY
    with client.chat.completions.with_streaming_response.create(model=TINY, messages=MSG, max_tokens=2, seed=7) as streamed:
        assert streamed.parse().choices[0].finish_reason == "length"
    raw = client.responses.input_tokens.with_raw_response.count(model=TINY, input="Hi")
    assert raw.parse().input_tokens > 0


def test_responses_compact_says_it_is_not_supported(client):
    with pytest.raises(openai.NotFoundError) as caught:  # was a 405 "method not allowed" ("compact" taken for an id)
        client.responses.compact(model=TINY, input="Hi")
    err = caught.value.body
    assert err["code"] == "unsupported_endpoint" and "truncation" in err["message"], err
