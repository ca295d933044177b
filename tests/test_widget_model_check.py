"""A widget built for a model the server lacks says so at construction, with the server's chat models,
not only when the first message fails (the real widgets against the session's real server)."""

from __future__ import annotations

import pytest

from tests.server_fixtures import TINY
from xllm_jupyter.client import XllmClient
from xllm_jupyter.client.base import can_chat
from xllm_jupyter.widgets import ChatWidget, CompareWidget, ProfileWidget

DEAD = ("http://127.0.0.1:9/v1", None)  # nothing listens on the discard port


@pytest.fixture
def endpoint(xllm_server):
    return (xllm_server.base_url, xllm_server.api_key)


@pytest.fixture
def listed(endpoint) -> str:
    """The server's chat models, as /v1/models lists them (the packaged ones too)."""
    with XllmClient(*endpoint) as c:
        names = [m["id"] for m in c.models() if can_chat(m)]
    assert TINY in names
    return ", ".join(names)


def error_line(w) -> bool:
    return "--jp-error-color1" in w.status.value


@pytest.mark.parametrize("cls", [ChatWidget, ProfileWidget])
def test_an_unknown_model_is_named_at_construction(make, endpoint, listed, cls):
    w = make(cls, "no-such-model", client=endpoint)
    assert f"The server has no model &#x27;no-such-model&#x27; — chat models: {listed}.</span>" in w.status.value and error_line(w), w.status.value
    assert w.model_picker.value == "no-such-model"  # what was asked for stays visible
    w.model_picker.value = TINY  # picking one the server listed clears the line
    assert w.status.value.endswith(">Ready.</span>") and not error_line(w)


@pytest.mark.parametrize("cls", [ChatWidget, ProfileWidget])
def test_a_known_model_is_ready(make, endpoint, cls):
    w = make(cls, TINY, client=endpoint)
    assert w.status.value.endswith(">Ready.</span>"), w.status.value


def test_the_servers_spelling_rules_decide(make, endpoint):
    """A name the server resolves (its :latest tag) is not flagged although /v1/models lists it otherwise."""
    with XllmClient(*endpoint) as c:
        assert c.model(f"{TINY}:latest")["id"] == TINY
    w = make(ChatWidget, f"{TINY}:latest", client=endpoint)
    assert w.status.value.endswith(">Ready.</span>"), w.status.value


def test_compare_names_every_unknown_model(make, endpoint, listed):
    w = make(CompareWidget, [TINY, "no-such-model", "gone-too"], client=endpoint)
    assert ("The server has no model &#x27;no-such-model&#x27;, &#x27;gone-too&#x27; — chat models: "
            f"{listed}.") in w.status.value and error_line(w), w.status.value
    w.models.value = (TINY, "gone-too")  # one unknown left: still the same warning
    assert error_line(w)
    w.models.value = (TINY,)
    assert w.status.value.endswith(">Ready.</span>")
    assert make(CompareWidget, [TINY, TINY], client=endpoint).status.value.endswith(">Ready.</span>")


def test_without_a_server_the_status_says_so_and_names_no_model(make):
    w = make(ChatWidget, "no-such-model", client=DEAD)
    assert "no xllm server" in w.status.value and "has no model" not in w.status.value and error_line(w)
    w = make(CompareWidget, ["no-such-model"], client=DEAD)
    assert "no xllm server" in w.status.value and "has no model" not in w.status.value


def test_an_embedding_model_is_named_as_not_for_chat(make, endpoint, listed):
    with XllmClient(*endpoint) as c:
        entries = {m["id"]: m for m in c.models()}
    if "all-minilm" not in entries:
        pytest.skip("the packaged all-minilm wheel is not installed")
    assert not can_chat(entries["all-minilm"])
    w = make(ChatWidget, "all-minilm", client=endpoint)
    assert f"&#x27;all-minilm&#x27; is not a chat model — chat models: {listed}.</span>" in w.status.value, w.status.value
