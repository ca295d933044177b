"""``xllm_requests_total`` counts the requests the standalone server refuses before routing them.

A foreign ``Host`` (DNS rebinding: 403), a method no route takes on a keyed server (405) and OPTIONS preflights are
answered by edge handlers ahead of the routes; they counted nowhere, though docs/metrics.md says refused requests are
included. They count under ``endpoint="other"`` now.
"""

from __future__ import annotations

import httpx

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_metrics_health_cache import scrape, value


def test_a_foreign_host_refused_at_the_edge_is_counted(xllm_home, tiny_catalog):
    with running_server(make_test_config(xllm_home, api_keys=()), tiny_catalog, TINY) as server, \
            httpx.Client(base_url=server.root, timeout=120) as http:  # keyless: loopback Host names only
        before = scrape(http)
        assert http.get("/v1/models", headers={"Host": "rebound.example"}).status_code == 403
        after = scrape(http)
    grew = value(after, "xllm_requests_total", endpoint="other", status="403") - value(
        before, "xllm_requests_total", endpoint="other", status="403")
    assert grew == 1


def test_an_unknown_method_refused_at_the_edge_is_counted(xllm_server):
    with httpx.Client(base_url=xllm_server.root, headers={"Authorization": f"Bearer {xllm_server.api_key}"},
                      timeout=120) as http:
        before = scrape(http)
        assert http.request("TRACE", "/v1/models").status_code == 405
        after = scrape(http)
    grew = value(after, "xllm_requests_total", endpoint="other", status="405") - value(
        before, "xllm_requests_total", endpoint="other", status="405")
    assert grew == 1
