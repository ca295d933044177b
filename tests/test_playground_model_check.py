"""`xllm_jupyter.playground(MODEL)` for a model the server lacks (or cannot chat with) says so when it starts,
as the widgets do at construction: the picker offered the name silently and only the first message failed."""

from __future__ import annotations

import pytest

import xllm_jupyter
from tests.server_fixtures import TINY
from xllm_jupyter.client import XllmClient
from xllm_jupyter.client.base import can_chat

pytest.importorskip("gradio")
import xllm_jupyter.playground as playground_package  # noqa: E402


@pytest.fixture
def own_kernel(monkeypatch):
    """This test's playgrounds replace none started elsewhere in the session."""
    monkeypatch.setattr(playground_package, "_started", [])


def start(name, client, capsys) -> tuple[object, str]:
    capsys.readouterr()
    pg = xllm_jupyter.playground(name, client=client, inline=False)
    return pg, capsys.readouterr().out


def test_an_unknown_or_embedding_model_is_named_at_start(tiny_client, xllm_server, own_kernel, capsys):
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as c:
        listing = c.models()
    chat = ", ".join(m["id"] for m in listing if can_chat(m))
    embedding = [m["id"] for m in listing if not can_chat(m)]
    assert TINY in chat and embedding

    pg, out = start("no-such-model", tiny_client, capsys)
    try:
        assert out == f"xllm playground: The server has no model 'no-such-model' — chat models: {chat}.\n"
        assert pg.model == "no-such-model"  # kept: it may be pulled meanwhile
    finally:
        pg.close()
    pg, out = start(embedding[0], tiny_client, capsys)
    try:
        assert f"xllm playground: '{embedding[0]}' is not a chat model — chat models: {chat}." in out
    finally:
        pg.close()


def test_a_known_model_or_the_default_says_nothing(tiny_client, own_kernel, capsys):
    for name in (TINY, f"{TINY}:latest", None):  # the server's own spelling rules decide
        pg, out = start(name, tiny_client, capsys)
        try:
            assert out == "", (name, out)
        finally:
            pg.close()
