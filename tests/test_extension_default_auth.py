"""The extension's auth under Jupyter's defaults (``allow_unauthenticated_access`` left on).

tests/test_extension.py turns that setting off, which sends every refusal through
``prepare``; with the default, ``@web.authenticated`` refuses GETs itself (APIHandler's
login URL is a 403), so "no or wrong token" must be turned into a 401 there as well.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server_fixtures import TINY
from tests import test_extension
from tests.test_extension import MSG, on_server_loop, start

pytest_plugins = ("pytest_jupyter.jupyter_server",)
xllm = test_extension.xllm  # the same fixture, over this module's jp_server_config


@pytest.fixture
def jp_server_config(xllm_home):
    """Extension on; everything else as `jupyter lab` starts it."""
    return {
        "ServerApp": {"jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False}},
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_batch_size": 4},
    }


@on_server_loop
async def test_wrong_or_missing_token_is_401_for_every_method(xllm):
    await start(xllm)
    assert xllm["serverapp"].allow_unauthenticated_access is True  # Jupyter's default, as in a real lab
    async with httpx.AsyncClient(timeout=30) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "token wrong"}):
            for method, path in (("GET", "/models"), ("GET", "/models/" + TINY), ("POST", "/chat/completions"),
                                 ("GET", "/chat/completions"), ("DELETE", "/chat/completions/chatcmpl-x")):
                r = await c.request(method, xllm["url"] + path, headers=headers, json={} if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and "Jupyter token" in r.json()["error"]["message"]
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await c.get(xllm["url"] + "/models", headers={"Authorization": f"Bearer {xllm['token']}"})
        assert r.status_code == 200 and TINY in [m["id"] for m in r.json()["data"]]
        assert (await c.get(xllm["root"] + "/health")).status_code == 200  # the one public route
    async with openai.AsyncOpenAI(base_url=xllm["url"], api_key="not-the-token", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model=TINY, messages=MSG)


@on_server_loop
async def test_a_method_no_route_serves_is_a_401_without_the_token_and_a_405_with_it(xllm):
    await start(xllm)
    token = {"Authorization": f"Bearer {xllm['token']}"}
    async with httpx.AsyncClient(timeout=30) as c:
        for method, path in (("PUT", "/models"), ("PATCH", "/chat/completions"), ("HEAD", "/embeddings"),
                             ("PATCH", "/models/" + TINY), ("GET", "/completions"), ("PUT", "/../admin/stats")):
            body = {"json": {}} if method in ("PUT", "PATCH") else {}
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                c.cookies.clear()  # the token's login cookie would make this a (cookie-)authenticated request
                r = await c.request(method, xllm["url"] + path, headers=headers, **body)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)  # was a 405 before auth
            r = await c.request(method, xllm["url"] + path, headers=token, **body)
            assert r.status_code == 405, (method, path, r.status_code, r.text)
            if method != "HEAD":
                assert r.json()["error"]["code"] == "method_not_allowed"
