"""``/admin/stats`` says "loading" while ``xllm serve -m NAME`` still loads NAME, as ``/health/ready`` does.

The stats route judged readiness from the config's ``engine.default_model``/``preload`` only; the models
``xllm serve -m`` names (``context.startup_pending``) were left out, so the JupyterLab panel showed
"ready" while ``/health/ready`` answered 503 "Still loading NAME".
"""

from __future__ import annotations

import httpx

from tests.server_fixtures import API_KEY, make_test_config
from tests.test_ready_names import _loading_server

from .test_ready_names import SECRET


async def test_stats_status_waits_for_the_models_serve_was_told_to_load(tmp_path):
    server, engine = await _loading_server(make_test_config(tmp_path))  # its pending: one `-m` model
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            assert (await c.get("/health/ready")).status_code == 503
            stats = (await c.get("/admin/stats")).json()
            assert stats["status"] == "loading" and stats["message"] == f"Still loading {SECRET}."
            server.context.startup_pending.clear()  # its load finished
            assert (await c.get("/health/ready")).status_code == 200
            stats = (await c.get("/admin/stats")).json()
            assert stats["status"] == "ready" and stats["message"] is None
    finally:
        await server.stop()
        await engine.stop()
