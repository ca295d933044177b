"""``/metrics`` counts the connections the server refuses as they arrive (server/connections.py).

A connection over a client's cap (or the server's) is answered 429/503 ``too_many_connections`` and closed before
any handler runs, so ``xllm_requests_total`` never saw it and ``/metrics`` showed nothing of a server refusing
clients; ``xllm_connections_refused_total`` and ``xllm_connections_open`` show it now.
"""

from __future__ import annotations

import httpx

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_connection_caps import _answer_then_close, _half_open, _port
from tests.test_metrics_health_cache import scrape, value

PER_CLIENT = 3


def test_refused_connections_are_counted(xllm_home, tiny_catalog):
    with running_server(make_test_config(xllm_home, max_connections_per_client=PER_CLIENT), tiny_catalog,
                        TINY) as server:
        port = _port(server)
        held = [_half_open(port, "127.0.0.2") for _ in range(PER_CLIENT)]
        try:
            refused = _half_open(port, "127.0.0.2")
            assert _answer_then_close(refused).startswith(b"HTTP/1.1 429 ")
            refused.close()
            with httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"},
                              timeout=120) as http:
                samples = scrape(http)
        finally:
            for s in held:
                s.close()
    assert value(samples, "xllm_connections_refused_total") == 1
    assert value(samples, "xllm_connections_open") >= PER_CLIENT + 1  # the held ones and the scrape's own
