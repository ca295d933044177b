"""``/v1/chat/completions`` types the prompt-cache and abuse-check hints the openai SDK sends
(``prompt_cache_key``, ``prompt_cache_retention``, ``safety_identifier``, ``user``) as ``/v1/responses``
does: a wrong type is a 400 naming the parameter (they were accepted as anything), a valid one is served.
Legacy ``/v1/completions`` takes only ``user`` of these (the SDK's ``completions.create``)."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY

HINTS = dict(prompt_cache_key="chat-42", prompt_cache_retention="24h", safety_identifier="user-hash", user="alice")
HI = [{"role": "user", "content": "Hi"}]


def test_valid_hints_are_served(client):
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, **HINTS)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens == 1
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, prompt_cache_retention="in_memory",
                                       extra_body={"prompt_cache_key": None, "safety_identifier": None})
    assert r.usage.completion_tokens == 1
    r = client.completions.create(model=TINY, prompt="Hi", max_tokens=1, user="alice")
    assert r.usage.completion_tokens == 1


@pytest.mark.parametrize("name, bad", [("prompt_cache_key", 5), ("prompt_cache_retention", "forever"),
                                       ("prompt_cache_retention", 24), ("safety_identifier", ["x"]),
                                       ("user", {"id": 1})])
def test_a_wrong_type_is_a_400_naming_the_parameter(client, name, bad):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, extra_body={name: bad})
    assert exc.value.status_code == 400 and exc.value.body["param"] == name, exc.value.body
    assert exc.value.body["type"] == "invalid_request_error" and exc.value.body["message"], exc.value.body


def test_legacy_completions_type_user(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=TINY, prompt="Hi", max_tokens=1, extra_body={"user": 7})
    assert exc.value.body["param"] == "user"


OPTIONS = {"mode": "explicit", "ttl": "30m"}
BAD_OPTIONS = [(5, "prompt_cache_options"), ({"mode": "sometimes"}, "prompt_cache_options.mode"),
               ({"ttl": 30}, "prompt_cache_options.ttl")]


def test_prompt_cache_options_are_typed_in_chat(client):
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, extra_body={"prompt_cache_options": OPTIONS})
    assert r.usage.completion_tokens == 1
    for bad, param in BAD_OPTIONS:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, extra_body={"prompt_cache_options": bad})
        assert exc.value.body["param"] == param, exc.value.body


def test_prompt_cache_options_are_typed_and_echoed_in_responses(client):
    """As the other hints there: the SDK's Response has ``prompt_cache_options``, which was accepted as anything and dropped."""
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1, extra_body={"prompt_cache_options": {"ttl": "30m"}})
    assert r.prompt_cache_options is not None and r.prompt_cache_options.ttl == "30m"
    assert client.responses.retrieve(r.id).prompt_cache_options.ttl == "30m"
    assert client.responses.create(model=TINY, input="Hi", max_output_tokens=1).prompt_cache_options is None
    for bad, param in BAD_OPTIONS:
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=TINY, input="Hi", max_output_tokens=1, extra_body={"prompt_cache_options": bad})
        assert exc.value.body["param"] == param, exc.value.body
