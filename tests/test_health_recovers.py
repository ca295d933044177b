"""A model whose engine thread died is loaded again by its next request, and the health routes say so.

``/health/ready`` said "this server cannot generate until it is restarted" (docs/metrics.md: "never comes back to
ready"), but the next request for the model unloads the dead runner and loads it afresh: an operator told to restart
a server that heals itself would cut every user's streams for nothing.
"""

from __future__ import annotations

import httpx

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_metrics_health_cache import _http


def test_health_turns_back_to_ok_once_a_request_reloads_the_dead_model(xllm_home, tiny_catalog):
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server, _http(server) as http:
        server.engine._runners[TINY].shutdown()  # the step thread ends, the runner stays registered
        r = http.get("/health/ready")
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "died" in message and "next request" in message and "restart" not in message
        assert http.get("/admin/stats").json()["message"] == message
        chat = {"model": TINY, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1, "temperature": 0}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200
        assert httpx.get(server.root + "/health", timeout=30).status_code == 200
        assert httpx.get(server.root + "/health/ready", timeout=30).status_code == 200
