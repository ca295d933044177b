"""The hub service's wire details as the standalone server's: ``X-Request-ID`` on every answer (the openai SDK's
``request_id``), and ``Allow``/``OPTIONS`` naming the methods each route answers.

The hub's API is stood in for by ``user_for_token`` (tests/server_fixtures.running_hub_app); the real hub runs in
tests/test_hub_service.py.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.server_fixtures import HUB_ALICE, make_test_config, running_hub_app

TOKEN = {"Authorization": "token good"}


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory) -> Any:
    async def user_for_token(token: str) -> Any:
        return HUB_ALICE if token == "good" else None

    with running_hub_app(make_test_config(tmp_path_factory.mktemp("home")), user_for_token) as root:
        yield root


def test_every_hub_answer_has_a_request_id_the_sdk_reads(hub_root):
    """The hub service sent no ``X-Request-ID`` (standalone and Jupyter do): the SDK's ``request_id`` was None."""
    with openai.OpenAI(base_url=hub_root + "/v1", api_key="good", max_retries=0) as c:
        raw = c.models.with_raw_response.list()
        assert raw.status_code == 200 and len(raw.request_id or "") == 32
        with pytest.raises(openai.NotFoundError) as info:
            c.models.retrieve("missing")
        assert len(info.value.request_id or "") == 32 and info.value.request_id != raw.request_id
    with openai.OpenAI(base_url=hub_root + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as auth:
            c.models.list()
        assert len(auth.value.request_id or "") == 32  # refused before any route: still one
    with httpx.Client(base_url=hub_root, timeout=60) as c:
        assert c.get("/v1/models", headers={**TOKEN, "X-Request-ID": "trace-7"}).headers["x-request-id"] == "trace-7"
        for bad in ("bad id!", "x" * 129, "a;b"):  # not a safe token: a fresh one, never echoed
            got = c.get("/health", headers={"X-Request-ID": bad}).headers["x-request-id"]
            assert len(got) == 32 and got != bad
        page = c.get("/", follow_redirects=False)  # the browser page (into hub OAuth) and unknown paths too
        assert page.status_code == 302 and len(page.headers["x-request-id"]) == 32
        assert len(c.get("/nowhere", headers=TOKEN).headers["x-request-id"]) == 32


def test_hub_options_and_allow_name_the_methods_each_route_answers(hub_root):
    """OPTIONS was a 405 on the hub service; now a 204 with ``Allow`` (after auth, as every other method), and a
    405's ``Allow`` lists it as the route answers it."""
    with httpx.Client(base_url=hub_root, timeout=60) as c:
        r = c.options("/v1/chat/completions", headers=TOKEN)
        assert (r.status_code, r.headers.get("allow"), r.content) == (204, "GET, HEAD, POST, OPTIONS", b"")
        assert c.options("/v1/embeddings", headers=TOKEN).headers.get("allow") == "POST, OPTIONS"
        r = c.options("/health")  # public
        assert (r.status_code, r.headers.get("allow")) == (204, "GET, HEAD, OPTIONS")
        assert c.options("/v1/models").status_code == 401  # the anonymous learn nothing of a private route
        r = c.options("/v1/nothing", headers=TOKEN)
        assert r.status_code == 404 and "allow" not in r.headers and r.json()["error"]["code"] == "not_found"
        r = c.delete("/v1/chat/completions", headers=TOKEN)
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST, OPTIONS"
