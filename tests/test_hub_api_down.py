"""The hub service when the hub API is down or hangs: a prompt 503 ``hub_unavailable`` with ``Retry-After``.

HubAuth's own HTTP client waits up to 5 minutes for an answer, so a hub that took the connection and said
nothing (overloaded by a burst of spawns, paused, a stuck proxy) held every API request and page view that
long; a hub that refused the connection made the browser page a bare 500 (HubAuth raises HTTPError 500). The
page's early answers (429, 503) did not say ``Connection: close`` although Tornado closes the connection after
them, so a client's next request on it was reset.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from tornado.web import create_signed_value

from tests.helpers import json_answering_server
from tests.server_fixtures import loop_thread

SECRET = b"s" * 32
TIMEOUT = 1.0  # the service's wait for the hub (hub.api_timeout_seconds), shortened for the test


@pytest.fixture
def silent_hub() -> Iterator[int]:
    """A hub API port that accepts connections and never answers; yields the port."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        for conn in held:
            conn.close()


def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def _service(tmp_path: Any, hub_port: int, monkeypatch: Any) -> Any:
    pytest.importorskip("jupyterhub")
    import tornado.httpserver
    import tornado.testing

    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub import app as hub_app
    from xllm_jupyter.hub.service import load_hub_config

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off",
                                  "XLLM_HUB_API_TIMEOUT_SECONDS": str(TIMEOUT)})
    auth = hub_app.make_hub_auth({"JUPYTERHUB_API_TOKEN": "service-token",
                                  "JUPYTERHUB_API_URL": f"http://127.0.0.1:{hub_port}/hub/api"})

    async def setup() -> tuple[Any, int]:
        sock, port = tornado.testing.bind_unused_port()
        server = tornado.httpserver.HTTPServer(hub_app.make_hub_app(config, Engine(config.engine), auth, cookie_secret=SECRET))
        server.add_sockets([sock])
        return server, port

    return loop_thread(setup, "the hub service", 30)


def _login_cookie() -> str:
    """The service's OAuth cookie (signed with its secret) holding an access token, as its callback sets it."""
    return "service-xllm=" + create_signed_value(SECRET, "service-xllm", "oauth-access-token").decode()


def _check(root: str) -> None:
    with httpx.Client(base_url=root, timeout=4 * TIMEOUT + 5) as http:
        started = time.monotonic()
        r = http.post("/v1/chat/completions", headers={"Authorization": "token some-token"},
                      json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "hub_unavailable"
        assert r.headers["Retry-After"] == "1"
        for headers in ({"Authorization": "token some-token"}, {"Cookie": _login_cookie()}):  # the page: a token, a login
            r = http.get("/", headers=headers, follow_redirects=False)
            assert r.status_code == 503, (headers, r.status_code, r.text)
            assert r.headers["Retry-After"] == "1"
            assert "retry" in r.text
            # answered before Tornado read the request's end, so it closes the connection: the client must know
            assert r.headers["Connection"] == "close"
        # the OAuth callback of a logged-in browser (its "already logged in?" check asks the hub too)
        r = http.get("/oauth_callback?code=c&state=s", headers={"Cookie": _login_cookie()}, follow_redirects=False)
        assert r.status_code == 503, r.text
        assert r.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 4 * (TIMEOUT + 1)


def test_a_hub_that_takes_the_connection_and_hangs_is_a_prompt_503(tmp_path, silent_hub, monkeypatch):
    with _service(tmp_path, silent_hub, monkeypatch) as (loop, (server, port)):
        try:
            _check(f"http://127.0.0.1:{port}/services/xllm")
        finally:
            loop.call_soon_threadsafe(server.stop)


def test_a_hub_that_is_down_is_a_503_on_the_page_too(tmp_path, monkeypatch):
    with _service(tmp_path, _closed_port(), monkeypatch) as (loop, (server, port)):
        try:
            _check(f"http://127.0.0.1:{port}/services/xllm")
        finally:
            loop.call_soon_threadsafe(server.stop)


@pytest.mark.parametrize("value", ["0", "-1", "inf", "301"])
def test_the_wait_for_the_hub_is_a_bounded_positive_number(tmp_path, value):
    from xllm_jupyter.core.errors import ConfigError
    from xllm_jupyter.hub.service import load_hub_config

    with pytest.raises(ConfigError, match="hub.api_timeout_seconds"):
        load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_HUB_API_TIMEOUT_SECONDS": value})


@pytest.fixture
def wrong_hub_url() -> Iterator[int]:
    """An HTTP server that answers 404 to everything, as a JUPYTERHUB_API_URL naming the wrong path gets; its port."""
    with json_answering_server(404, b'{"status": 404, "message": "Not Found"}') as port:
        yield port


def test_a_hub_api_url_the_hub_answers_404_is_a_misconfigured_service_not_retry_later(tmp_path, wrong_hub_url,
                                                                                        monkeypatch, caplog):
    """Every request was a 503 hub_unavailable, "retry later", with Retry-After: no retry could help."""
    caplog.set_level(logging.INFO)
    with _service(tmp_path, wrong_hub_url, monkeypatch) as (loop, (server, port)):
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/services/xllm", timeout=30) as http:
                r = http.post("/v1/chat/completions", headers={"Authorization": "token some-token"},
                              json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
                assert r.status_code == 500, r.text
                error = r.json()["error"]
                assert error["code"] == "hub_misconfigured" and "misconfigured" in error["message"]
                assert "retry" not in error["message"].lower().replace("retrying will not help", "")
                assert "Retry-After" not in r.headers and r.headers["x-should-retry"] == "false"  # (the SDKs retry 5xx)
                # nothing of the setup in the answer: no URL, no address, no token
                for secret in ("127.0.0.1", "http", "service-token", "some-token", str(wrong_hub_url)):
                    assert secret not in r.text
                for headers in ({"Authorization": "token some-token"}, {"Cookie": _login_cookie()}):  # the page
                    r = http.get("/", headers=headers, follow_redirects=False)
                    assert r.status_code == 500 and "misconfigured" in r.text, (headers, r.status_code, r.text)
                    assert "Retry-After" not in r.headers and "127.0.0.1" not in r.text
        finally:
            loop.call_soon_threadsafe(server.stop)
    said = [r.getMessage() for r in caplog.records if r.name == "xllm_jupyter.hub" and r.levelno >= logging.ERROR]
    assert said and "refused the service's request" in said[0] and "JUPYTERHUB_API_URL" in said[0], said
    # the hub's own answer is in the log too (HubAuth's line just before ours)
    assert any("[404]" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
