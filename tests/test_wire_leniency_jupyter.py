"""The request-body rules of test_wire_leniency.py inside Jupyter: the same handlers on Jupyter's auth base."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from .server_fixtures import TINY

pytest_plugins = ("pytest_jupyter.jupyter_server",)

# seeded: the test counts its two tokens, and an unseeded random model can end after one
BODY = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "seed": 7}).encode()


@pytest.fixture
def jp_server_config(xllm_home):
    """The extension, serving the tiny model, with Jupyter's token auth."""
    return {
        "ServerApp": {"jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False}},
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_batch_size": 2, "max_body_bytes": 65536},
    }


def test_jupyter_reads_bodies_by_the_same_rules(jp_serverapp, http_server_client, jp_http_port, jp_base_url,
                                                jp_asyncio_loop):
    url = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm/v1/chat/completions"
    auth = {"Authorization": f"token {jp_serverapp.identity_provider.token}"}

    async def scenario() -> None:
        await jp_serverapp._post_start()  # the extensions' start hooks (the fixture does not run them)
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.post(url, content=gzip.compress(BODY), headers={**auth, "Content-Type": "application/json",
                                                                          "Content-Encoding": "gzip"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
            r = await c.post(url, content=BODY, headers={**auth, "Content-Type": "application/x-www-form-urlencoded"})
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
            bomb = gzip.compress(b'{"model": "tiny", "pad": "' + b"a" * 10_000_000 + b'"}')
            r = await c.post(url, content=bomb, headers={**auth, "Content-Type": "application/json", "Content-Encoding": "gzip"})
            assert r.status_code == 413 and "decompress" in r.json()["error"]["message"], r.text
            twice = b'{"model": "nope", "model": "%s", "messages": [{"role": "user", "content": "Hi"}]}' % TINY.encode()
            r = await c.post(url, content=twice, headers={**auth, "Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
            # Jupyter's own auth still decides first
            r = await c.post(url, content=BODY, headers={"Content-Type": "text/plain"})
            assert r.status_code == 403, r.text

    jp_asyncio_loop.run_until_complete(scenario())
