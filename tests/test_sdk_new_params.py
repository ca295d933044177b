"""Parameters the installed openai SDK types that this server cannot honour are 400s naming them, never ignored, and the
Responses-only ``prompt_cache_options`` values the SDK types are accepted and echoed in the shape its Response requires.

Found by sending each ``completion_create_params`` / ``response_create_params`` key of openai 3.63 to a real server:
``moderation`` (a "block" policy), ``context_management`` (compaction) and ``background_options`` windows that need
``background`` were answered 200 as if honoured; ``prompt_cache_options.ttl: "12h"`` (valid for Responses) was a 400.
"""

from __future__ import annotations

import openai
import pytest
from openai.types.responses import Response
from pydantic import TypeAdapter

from tests.server_fixtures import TINY

HI = [{"role": "user", "content": "Hi"}]
MODERATION = {"model": "omni-moderation-latest", "policy": {"input": {"mode": "block"}, "output": {"mode": "block"}}}


def _refused(call, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        call()
    body = exc.value.body
    assert (exc.value.status_code, body["type"], body["param"], body["code"]) == (
        400, "invalid_request_error", param, "unsupported_parameter"), body


def test_chat_moderation_is_refused(client):
    _refused(lambda: client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, moderation=MODERATION),
             "moderation")
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, extra_body={"moderation": None})
    assert r.usage.completion_tokens == 1


@pytest.mark.parametrize("name, value", [("moderation", MODERATION),
                                         ("context_management", [{"type": "compaction", "compact_threshold": 1000}])])
def test_responses_features_not_served_are_refused(client, name, value):
    _refused(lambda: client.responses.create(model=TINY, input="Hi", max_output_tokens=1, **{name: value}), name)
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1, extra_body={name: None})
    assert r.usage.output_tokens == 1


def test_background_windows_that_need_background_are_refused(client):
    _refused(lambda: client.responses.create(model=TINY, input="Hi", max_output_tokens=1,
                                             background_options={"completion_window": "8h"}),
             "background_options.completion_window")
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1, background_options={"completion_window": "soonest"})
    assert r.usage.output_tokens == 1
    for value in ({"completion_window": None, "continuation_id": "batch-1"}, {}, None):  # the defaults, as clients send them
        r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1, extra_body={"background_options": value})
        assert r.usage.output_tokens == 1


@pytest.mark.parametrize("value, param", [("soonest", "background_options"),
                                          ({"completion_window": "1h"}, "background_options.completion_window"),
                                          ({"continuation_id": 7}, "background_options.continuation_id")])
def test_background_options_are_typed_as_in_the_sdk(raw, value, param):
    """A typo'd window or a non-object was taken and ignored (200)."""
    r = raw.post("/v1/responses", json={"model": TINY, "input": "Hi", "max_output_tokens": 1, "background_options": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_responses_prompt_cache_options_take_the_sdk_values_and_echo_its_shape(client, raw):
    r = client.responses.create(model=TINY, input="Hi", max_output_tokens=1,
                                prompt_cache_options={"ttl": "12h", "comparison_response_id": "resp_abc"})
    assert (r.prompt_cache_options.ttl, r.prompt_cache_options.mode) == ("12h", "implicit")
    assert r.prompt_cache_options.comparison_response_id == "resp_abc"
    assert client.responses.retrieve(r.id).prompt_cache_options.ttl == "12h"
    # the SDK's Response requires both mode and ttl: an echo of only what was sent failed its strict validation
    body = raw.post("/v1/responses", json={"model": TINY, "input": "Hi", "max_output_tokens": 1,
                                           "prompt_cache_options": {"mode": "explicit"}}).json()
    assert body["prompt_cache_options"] == {"mode": "explicit", "ttl": "30m", "comparison_response_id": None}
    TypeAdapter(Response).validate_python(body)
    _refused(lambda: client.responses.create(model=TINY, input="Hi", max_output_tokens=1, prompt_cache_options={"prewarm": True}),
             "prompt_cache_options.prewarm")
    # chat's SDK type allows only 30m, as before
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, extra_body={"prompt_cache_options": {"ttl": "12h"}})
    assert exc.value.body["param"] == "prompt_cache_options.ttl"
