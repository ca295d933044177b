"""A request whose client leaves before its (non-streamed) answer counts as 499, not as a 200 answer.

The handler returned without a response and Tornado finished it with its default status, so ``/metrics``
(``xllm_requests_total{status="200"}``) and the access log counted an interrupted cell or a client's timeout as
a request answered; nginx's 499 (client closed request) says what happened.
"""

from __future__ import annotations

import json
import socket
import time

import httpx

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_metrics_health_cache import scrape, value

ROUTE = "/v1/chat/completions"


def test_a_client_that_leaves_before_the_answer_counts_as_499(xllm_home, tiny_catalog):
    with running_server(make_test_config(xllm_home), tiny_catalog, TINY) as server, \
            httpx.Client(base_url=server.root, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=120) as http:
        before = scrape(http)
        body = json.dumps({"model": TINY, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1900,
                           "ignore_eos": True, "temperature": 0}).encode()
        host, port = server.root.rsplit("//", 1)[1].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                  + server.api_key.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(1200):  # until it generates (1,900 tokens: long past the close below)
            if server.engine.stats().running:
                break
            time.sleep(0.05)
        assert server.engine.stats().running
        s.close()  # the client leaves before its answer
        for _ in range(1200):
            after = scrape(http)
            if value(after, "xllm_requests_total", endpoint=ROUTE, status="499"):
                break
            time.sleep(0.05)
    assert value(after, "xllm_requests_total", endpoint=ROUTE, status="499") == 1
    assert value(after, "xllm_requests_total", endpoint=ROUTE, status="200") == value(
        before, "xllm_requests_total", endpoint=ROUTE, status="200")
