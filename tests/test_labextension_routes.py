"""The Jupyter-only routes behind the JupyterLab panel: ``/xllm/admin/stats`` and
``POST /xllm/playground`` on a real ServerApp (pytest-jupyter), base_url ``/a%40b/``.
"""

from __future__ import annotations

import os
import threading

import httpx
import pytest

from tests.server_fixtures import TINY
from tests.test_extension import on_server_loop, start

pytest_plugins = ("pytest_jupyter.jupyter_server",)


@pytest.fixture
def jp_server_config(xllm_home):
    """The extension on, serving "tiny"; no unauthenticated access."""
    return {
        "ServerApp": {
            "jpserver_extensions": {"xllm_jupyter": True, "jupyter_server_terminals": False},
            "allow_unauthenticated_access": False,
        },
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_batch_size": 4},
    }


@pytest.fixture
def xllm(jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop):
    """URL, token and extension app of the server (as in test_extension.py)."""
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    return {
        "root": f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm",
        "token": jp_serverapp.identity_provider.token,
        "app": ext,
        "serverapp": jp_serverapp,
        "run": jp_asyncio_loop.run_until_complete,
    }


@on_server_loop
async def test_stats_under_jupyter(xllm):
    await start(xllm)
    await xllm["app"]._start_task
    async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"token {xllm['token']}"}) as c:
        stats = (await c.get(xllm["root"] + "/admin/stats")).json()
    assert stats["status"] == "ready"
    assert [m["id"] for m in stats["models"]] == [TINY]
    assert stats["default_model"] == TINY


@on_server_loop
async def test_playground_route_needs_auth_and_the_exported_address(xllm):
    # not started: the extension has exported no XLLM_BASE_URL for the playground to use
    saved = os.environ.pop("XLLM_BASE_URL", None)
    try:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(xllm["root"] + "/playground", json={})
            assert r.status_code in (401, 403)
            r = await c.post(xllm["root"] + "/playground", json={}, headers={"Authorization": f"token {xllm['token']}"})
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["code"] == "playground_unavailable" and "UNIX socket" in err["message"]
    finally:
        if saved is not None:
            os.environ["XLLM_BASE_URL"] = saved


@on_server_loop
async def test_playground_route_starts_one_playground(xllm):
    pytest.importorskip("gradio")
    await start(xllm)
    await xllm["app"]._start_task
    headers = {"Authorization": f"token {xllm['token']}"}
    async with httpx.AsyncClient(timeout=180, headers=headers) as c:
        first = (await c.post(xllm["root"] + "/playground", json={})).json()
        again = (await c.post(xllm["root"] + "/playground", json={})).json()
        assert first == again  # started once, then reused
        assert first["model"] == TINY and first["url"].startswith("http://127.0.0.1:")
        page = await c.get(first["local_url"])
        assert page.status_code == 200 and "gradio" in page.text.lower()
    running = xllm["serverapp"].web_app.settings["xllm_context"].playground
    close, closed_on = running.close, []

    def recording_close() -> None:
        closed_on.append(threading.current_thread())
        close()

    running.close = recording_close
    await xllm["app"].stop_extension()  # the extension's shutdown closes it
    assert running.closed
    # Gradio's close joins its server thread (seconds): off the IOLoop, which other extensions still use
    assert closed_on and closed_on[0] is not threading.current_thread()
