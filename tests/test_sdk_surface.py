"""The openai SDK's parameters this server documents, called as the SDK's docs show, against the session server:
each answer parses into the SDK's types with the right values, or is a 400 naming the parameter."""

from __future__ import annotations

import openai
import pytest

from .server_fixtures import TINY

MSG = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("tier", ["auto", "default", "flex", "priority"])
def test_a_chat_asking_for_a_service_tier_is_told_the_one_that_served_it(client, tier):
    """OpenAI: "When the service_tier parameter is set, the response body will include the service_tier value
    based on the processing mode actually used". This server has one: "default" (it said nothing before)."""
    full = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, service_tier=tier, seed=7)
    assert full.service_tier == "default" and full.choices[0].message.content
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, service_tier=tier, stream=True, seed=7,
                                                 stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and {c.service_tier for c in chunks} == {"default"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_without_a_service_tier_none_is_reported(client):
    assert client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1).service_tier is None
    assert client.responses.create(model=TINY, input="Hi", max_output_tokens=1).service_tier is None


def test_a_responses_call_asking_for_a_service_tier_is_told_default(client):
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=2, service_tier="flex")
    assert r.service_tier == "default" and client.responses.retrieve(r.id).service_tier == "default"
    with client.responses.stream(model=TINY, input="Hi", max_output_tokens=2, service_tier="auto") as stream:
        created = [e for e in stream if e.type == "response.created"]
    assert created and created[0].response.service_tier == "default"


def test_a_service_tier_openai_does_not_know_is_a_400_naming_it(client):
    """It was accepted and ignored (a typo such as "priorty" went unnoticed)."""
    for call in (lambda: client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, service_tier="priorty"),
                 lambda: client.responses.create(model=TINY, input="Hi", max_output_tokens=1, service_tier="priorty")):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        body = caught.value.body
        assert body["param"] == "service_tier" and body["code"] == "invalid_value"
        assert "priorty" in body["message"] and "'priority'" in body["message"], body["message"]


def test_a_stored_streamed_chat_keeps_its_service_tier(client):
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, service_tier="auto", stream=True,
                                                 store=True, seed=7))
    stored = client.chat.completions.retrieve(chunks[0].id)
    assert stored.service_tier == "default" and stored.usage.completion_tokens == 2
    full = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, service_tier="flex", store=True)
    assert client.chat.completions.retrieve(full.id).service_tier == "default"


@pytest.mark.parametrize("extra, param", [
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "Hello"}}, "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"verbosity": "high"}, "verbosity"),
])
def test_what_is_documented_as_refused_is_a_400_naming_it(client, extra, param):
    """docs/clients.md: parameters that would change the output and are not implemented are a 400, never ignored."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, **extra)
    assert caught.value.body["param"] == param and caught.value.body["code"] == "unsupported_parameter"


def test_text_modality_and_the_sdks_stream_options_are_served(client):
    full = client.chat.completions.create(model=TINY, messages=MSG, max_completion_tokens=2, modalities=["text"], seed=7)
    assert full.choices[0].message.content and full.usage.completion_tokens == 2
    chunks = list(client.chat.completions.create(model=TINY, messages=MSG, max_completion_tokens=2, stream=True, seed=7,
                                                 stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    assert all(c.usage is None for c in chunks[:-1])
