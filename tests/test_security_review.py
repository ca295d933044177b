"""Findings of the adversarial security review (session 27), each pinned by a real server test."""

from __future__ import annotations

import dataclasses

import httpx

from tests.server_fixtures import make_test_config
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.standalone import start_server

EVIL = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}


async def test_keyless_server_with_wildcard_cors_still_refuses_other_sites(tiny_catalog, tmp_path, caplog):
    """``http.cors_origins: ["*"]`` on a keyless (loopback, everyone-is-admin) server must not hand every web page
    the server: any site the local user visited could pull local paths into the store, unload models, and
    read the stored chat completions. A keyless server trusts only origins listed by name."""
    base = make_test_config(tmp_path, api_keys=())
    config = dataclasses.replace(base, http=dataclasses.replace(base.http, cors_origins=("*",)))
    engine = Engine(config.engine, catalog=tiny_catalog)
    with caplog.at_level("WARNING", logger="xllm_jupyter.server"):
        server = await start_server(config, engine, port=0)
    try:
        assert "cors_origins" in caplog.text  # the operator learns the wildcard is ignored, and why
        async with httpx.AsyncClient(base_url=server.url) as c:
            body = '{"model": "tiny", "messages": []}'  # a 400 once past the origin check: nothing runs
            for path in ("/v1/chat/completions", "/admin/models/pull", "/admin/models/unload"):
                r = await c.post(path, content=body, headers={**EVIL, "Content-Type": "text/plain"})
                assert r.status_code == 403, (path, r.status_code, r.text)
                assert r.json()["error"]["type"] == "permission_error"
            # a read of the local user's data is not shared with the page either
            r = await c.get("/v1/chat/completions", headers=EVIL)
            assert "Access-Control-Allow-Origin" not in r.headers
            r = await c.options("/v1/chat/completions", headers={**EVIL, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 403
            # the local user's own requests (no browser headers, or this server's own origin) are served
            r = await c.post("/v1/chat/completions", content=body)
            assert r.status_code == 400
            r = await c.post("/v1/chat/completions", content=body, headers={"Origin": server.url})
            assert r.status_code == 400
    finally:
        await server.stop()
        await engine.stop()


async def test_keyed_server_keeps_wildcard_cors(tiny_catalog, tmp_path):
    """With API keys the key is the guard: ``["*"]`` lets any page call with its key, as documented."""
    base = make_test_config(tmp_path)
    config = dataclasses.replace(base, http=dataclasses.replace(base.http, cors_origins=("*",)))
    engine = Engine(config.engine, catalog=tiny_catalog)
    server = await start_server(config, engine, port=0)
    try:
        async with httpx.AsyncClient(base_url=server.url) as c:
            r = await c.options("/v1/chat/completions", headers={**EVIL, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 204
            r = await c.get("/v1/models", headers=EVIL)  # no key: refused, but the page may read why
            assert r.status_code == 401 and r.headers.get("Access-Control-Allow-Origin") == "*"
    finally:
        await server.stop()
        await engine.stop()
