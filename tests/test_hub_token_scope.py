"""A user server whose JupyterHub token was made without ``read:services!service=xllm`` says why it serves from its
own engine, and what mends it (the admin's grant, then a restart of the server), where its user can read it.

A real JupyterHub (tests/real_hub.py) that runs the xllm service; bob's Jupyter server (pytest-jupyter, the
extension on the tiny Llama) gets a token the hub made without the read scope, as a hub whose
``c.Spawner.server_token_scopes`` lacked it when the server started makes it. No re-check mends that token
(docs/jupyterhub.md); before, only a 403 in the server's log said anything, and no word of a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os

import httpx
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from tests.server_fixtures import TINY
from tests.test_hub_recheck import ADMIN_TOKEN, hub, jp_server_config  # noqa: F401  (fixtures, used by name)
from xllm_jupyter.client import discovery
from xllm_jupyter.magics import XllmMagics

pytest.importorskip("jupyterhub")

pytest_plugins = ("pytest_jupyter.jupyter_server",)


def _token_without_read_scope(hub: dict) -> str:  # noqa: F811  (the fixture's value)
    """Start the hub with the xllm service; bob's server token, made with access to the service but not its lookup."""
    hub["begin"](hub["url"])
    with httpx.Client(base_url=hub["proc"].api, headers={"Authorization": f"token {ADMIN_TOKEN}"}, timeout=30) as admin:
        r = admin.post("/users/bob/tokens", json={"scopes": ["access:services!service=xllm", "users:activity!user"],
                                                   "note": "Server at /user/bob/"})
        assert r.status_code == 201, r.text
        return r.json()["token"]


def _status_rows() -> str:
    """``%xllm status`` in a fresh IPython, as a kernel this server started runs it (its exported variables)."""
    shell = InteractiveShell.instance()
    magics = XllmMagics(shell)
    shell.register_magics(magics)
    try:
        with capture_output() as cap:
            shell.run_line_magic("xllm", "status")
        assert cap.stderr == "", cap.stderr
        return "\n".join(o.data["text/plain"] for o in cap.outputs)
    finally:
        discovery.disconnect()
        magics.state.close()


def test_a_server_token_without_the_read_scope_says_to_restart_the_server_once_granted(
        hub, jp_serverapp, http_server_client, jp_http_port, jp_base_url, jp_asyncio_loop,  # noqa: F811
        monkeypatch, caplog):
    monkeypatch.setenv("JUPYTERHUB_API_URL", hub["proc"].api)
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", _token_without_read_scope(hub))
    monkeypatch.delenv("XLLM_HUB_SERVICE", raising=False)
    (ext,) = jp_serverapp.extension_manager.extension_apps["xllm_jupyter"]
    root = f"http://127.0.0.1:{jp_http_port}{jp_base_url}xllm"
    caplog.set_level(logging.INFO)

    async def body() -> None:
        await jp_serverapp._post_start()
        await ext._start_task
        assert ext.engine.is_loaded(TINY) and os.environ["XLLM_BASE_URL"] == root + "/v1"  # its own engine serves
        async with httpx.AsyncClient(base_url=root, timeout=60) as h:
            for _ in range(2):  # at the start, and after re-checks (every 0.3 s here): the token cannot change
                health = (await h.get("/health")).json()
                assert health["engine"] == "local", health
                advice = health["hub"]
                assert "lacks the scope read:services!service=xllm" in advice and "restart this server" in advice
                assert hub["proc"].api not in advice and "127.0.0.1" not in advice  # no address of the hub
                await asyncio.sleep(1)
        # the user's own view: %xllm status in a kernel of this server
        rows = await asyncio.to_thread(_status_rows)
        assert "this Jupyter server's own" in rows and "read:services!service=xllm" in rows, rows
        logged = [r.getMessage() for r in caplog.records if "no JupyterHub xllm service" in r.getMessage()]
        assert logged and "(403: it lacks the scope read:services!service=xllm)" in logged[0], logged
        assert "restart this server" in logged[0], logged

    jp_asyncio_loop.run_until_complete(body())
