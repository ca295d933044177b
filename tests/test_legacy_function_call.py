"""Chat's deprecated ``function_call``: "none" and "auto" are served as api.openai.com serves them (they were a 400)."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY

MSG = [{"role": "user", "content": "Hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("value", ["none", "auto"])
def test_function_call_none_and_auto_are_served(client, raw, value):
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=2, function_call=value)
    assert r.choices[0].finish_reason in ("stop", "length")
    # as older agent code sends it beside tools (raw JSON: the SDK's types keep the two apart)
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, "tools": TOOLS,
                                               "function_call": value})
    assert r.status_code == 200, r.text


def test_function_call_none_keeps_tools_uncalled_as_tool_choice_none(raw):
    """With tool_choice unset, "none" asks what tool_choice "none" asks: the tools are not offered (the prompt shows)."""
    def prompt_tokens(**extra):
        body = {"model": TINY, "messages": MSG, "max_tokens": 1, "tools": TOOLS, **extra}
        r = raw.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    offered, withheld = prompt_tokens(), prompt_tokens(tool_choice="none")
    assert offered > withheld
    assert prompt_tokens(function_call="none") == withheld
    assert prompt_tokens(function_call="auto") == offered
    assert prompt_tokens(function_call="none", tool_choice="auto") == offered  # tool_choice, when given, decides


@pytest.mark.parametrize("value, code, status", [
    ({"name": "get_weather"}, "unsupported_parameter", 400),  # needs the legacy functions, not implemented
    ("sometimes", "invalid_value", 400),
    (5, "invalid_type", 400),
])
def test_function_call_values_this_server_cannot_honour_are_refused(raw, value, code, status):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 1, "function_call": value})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == "function_call" and err["code"] == code, err


def test_the_legacy_functions_stay_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=1, function_call="auto",
                                       functions=[{"name": "f", "parameters": {"type": "object"}}])
    assert info.value.body["param"] == "functions"
