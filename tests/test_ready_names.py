"""``/health/ready`` needs no credentials, so it names the models still loading only to a caller who has them."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from tests import test_extension as extension_tests  # its fixtures, bound below
from tests.server_fixtures import API_KEY, make_test_config
from tests.test_extension import start
from xllm_jupyter.engine.engine import Engine
from xllm_jupyter.server.handlers import CONTEXT_KEY
from xllm_jupyter.server.standalone import start_server

pytest_plugins = ("pytest_jupyter.jupyter_server",)

jp_server_config = extension_tests.jp_server_config
xllm = extension_tests.xllm

SECRET = "acme-internal-finetune"  # a start-up model whose name is the operator's business


async def _loading_server(config):
    engine = Engine(config.engine, catalog=None)
    await engine.start()
    server = await start_server(config, engine, port=0)
    server.context.startup_pending = {SECRET}  # as `xllm serve -m NAME` sets it until NAME is loaded
    return server, engine


async def test_an_anonymous_probe_gets_the_503_but_no_model_names(tmp_path):
    base = make_test_config(tmp_path)
    config = dataclasses.replace(base, auth=dataclasses.replace(base.auth, failed_auth_limit=2))
    server, engine = await _loading_server(config)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            r = await c.get("/health/ready")  # a Kubernetes probe: no key
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == "not_ready" and err["message"] == "Still loading 1 start-up model."
            assert SECRET not in r.text
            # a caller with the key is told which
            r = await c.get("/health/ready", headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 503 and r.json()["error"]["message"] == f"Still loading {SECRET}."
            # a wrong key learns nothing, and counts towards the failed-auth cap as anywhere else, so this
            # route is no uncapped way to test keys
            for _ in range(2):
                r = await c.get("/health/ready", headers={"Authorization": "Bearer sk-guess"})
                assert r.status_code == 503 and SECRET not in r.text
            with pytest.raises(httpx.TimeoutException):  # capped: its turn comes window / limit (30 s) later
                await c.get("/v1/models", headers={"Authorization": "Bearer sk-guess"}, timeout=2)
            # a capped address's key is not looked at even when it is right (a fresh client: no vouching cookie);
            # the probe still gets its status
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as fresh:
                r = await fresh.get("/health/ready", headers={"Authorization": f"Bearer {API_KEY}"})
                assert r.status_code == 503 and SECRET not in r.text
            # the client that proved this key holds the cookie vouching for it (server/vouch_cookie.py): it skips
            # the line and is told, as before the cap
            assert "xllm_vouch" in c.cookies
            r = await c.get("/health/ready", headers={"Authorization": f"Bearer {API_KEY}"})
            assert r.status_code == 503 and r.json()["error"]["message"] == f"Still loading {SECRET}."
    finally:
        await server.stop()
        await engine.stop()


async def test_a_keyless_server_names_them_to_its_local_user(tmp_path):
    server, engine = await _loading_server(make_test_config(tmp_path, api_keys=()))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            r = await c.get("/health/ready")
            assert r.status_code == 503 and r.json()["error"]["message"] == f"Still loading {SECRET}."
    finally:
        await server.stop()
        await engine.stop()


@extension_tests.on_server_loop
async def test_under_jupyter_only_the_token_holder_is_told_the_names(xllm):
    await start(xllm)
    context = xllm["serverapp"].web_app.settings[CONTEXT_KEY]
    await xllm["app"]._start_task  # the engine started (and the default model loaded)
    context.startup_pending = {SECRET}
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            r = await c.get(xllm["root"] + "/health/ready")
            assert r.status_code == 503, r.text
            assert SECRET not in r.text and r.json()["error"]["code"] == "not_ready"
            r = await c.get(xllm["root"] + "/health/ready", headers={"Authorization": f"token {xllm['token']}"})
            assert r.status_code == 503 and SECRET in r.json()["error"]["message"]
    finally:
        context.startup_pending = None
