"""A method no route takes tells nothing of the route table on a server with API keys (edge.UnknownMethodHandler).

Tornado refuses a method its handler does not list (TRACE, PROPFIND, any token) with 405 before ``prepare``, so
before the key is asked for, and the 405 named the route's own methods (the catch-all's: every method): the same
map of every path the server has that the anonymous OPTIONS gave (tests/test_options_route_table.py).
"""

from __future__ import annotations

import httpx

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_options_route_table import assert_alike_on_every_path, keyless_client

METHODS = ("TRACE", "PROPFIND", "FOO")


def test_a_method_no_route_takes_answers_alike_on_every_path(tiny_catalog, xllm_home):
    config = make_test_config(xllm_home)  # API keys on
    with running_server(config, tiny_catalog, TINY) as info, httpx.Client(base_url=info.root, timeout=60) as c:
        for method in METHODS:
            for headers in ({}, {"Authorization": f"Bearer {info.api_key}"}):
                assert_alike_on_every_path(c, method, headers, 405)
        # the methods the routes know are unchanged: 401 without the key, the route's own 405 with it
        assert c.put("/v1/models").status_code == 401
        r = c.put("/v1/models", headers={"Authorization": f"Bearer {info.api_key}"})
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, OPTIONS"


async def test_a_keyless_server_still_names_each_routes_methods(tiny_catalog, tmp_path):
    async with keyless_client(tiny_catalog, tmp_path) as c:
        r = await c.request("TRACE", "/v1/embeddings")
        assert (r.status_code, r.headers.get("allow")) == (405, "POST, OPTIONS")
