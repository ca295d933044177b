"""An OPTIONS without a key tells nothing of the route table on a server with API keys.

OPTIONS never asks for the key (a browser's CORS preflight carries none). It answered 204 with the route's own
``Allow`` on a route and 404 off the routes, so anyone could map every path the server has, where every other
method answers 401 before any 404. With keys on, every path now gets the same answer; a keyless server (loopback,
everything public anyway) still names each route's methods.
"""

from __future__ import annotations

import dataclasses
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import HttpConfig
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.standalone import start_server

ORIGIN = "https://app.example.com"
PATHS = ("/v1/chat/completions", "/v1/embeddings", f"/v1/models/{TINY}", "/admin/models/pull", "/health",
         "/v1/no-such-route", "/admin/nothing", "/v2/models", "/")


def _answer(r: httpx.Response) -> tuple[object, ...]:
    """What a caller without a key can read off an OPTIONS answer (the request id aside)."""
    headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date", "content-length")}
    return r.status_code, tuple(sorted(headers.items())), r.content


def assert_alike_on_every_path(c: httpx.Client, method: str, headers: dict[str, str], status: int) -> None:
    """``method`` with ``headers`` gets the same answer on every path of ``PATHS``: ``status``, allowing every method."""
    answers = {path: _answer(c.request(method, path, headers=headers)) for path in PATHS}
    first = answers[PATHS[0]]
    assert first[0] == status, first
    assert dict(first[1])["allow"] == "GET, HEAD, POST, DELETE, OPTIONS"
    differ = {path: a for path, a in answers.items() if a != first}
    assert not differ, (method, headers, first, differ)


@asynccontextmanager
async def keyless_client(tiny_catalog: Any, home: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a standalone server without API keys (loopback: everything public anyway)."""
    config = make_test_config(home, api_keys=())
    server = await start_server(config, Engine(config.engine, catalog=tiny_catalog), port=0)
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            yield c
    finally:
        await server.stop()


def test_an_anonymous_options_answers_alike_on_every_path(tiny_catalog, xllm_home):
    config = make_test_config(xllm_home)  # API keys on
    config = dataclasses.replace(config, http=HttpConfig(cors_origins=(ORIGIN,)))
    with running_server(config, tiny_catalog, TINY) as info, httpx.Client(base_url=info.root, timeout=60) as c:
        for extra in ({}, {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                           "Access-Control-Request-Headers": "authorization, content-type"}):
            assert_alike_on_every_path(c, "OPTIONS", extra, 204)
        # the preflight still lets the browser's request through, and a foreign origin is still refused
        r = c.options("/v1/models", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert r.headers["access-control-allow-origin"] == ORIGIN and "GET" in r.headers["access-control-allow-methods"]
        r = c.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {info.api_key}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert c.options("/v1/models", headers={"Origin": "https://evil.example"}).status_code == 403
        assert c.options("/v1/no-such-route", headers={"Origin": "https://evil.example"}).status_code == 403
        # the route's own methods are still told to a caller with the key (its 405)
        r = c.put("/v1/models", headers={"Authorization": f"Bearer {info.api_key}"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, OPTIONS"


async def test_a_keyless_server_still_names_each_routes_methods(tiny_catalog, tmp_path):
    async with keyless_client(tiny_catalog, tmp_path) as c:
        r = await c.options("/v1/embeddings")
        assert (r.status_code, r.headers.get("allow")) == (204, "POST, OPTIONS")
        r = await c.options("/v1/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
