"""The hub service's browser routes (its page, the OAuth callback) take no request body.

The service lets Tornado accept bodies up to 1 GiB, since its API routes stream theirs and cap them
themselves (``server.max_body_bytes``). The page and the OAuth callback did not stream: Tornado read a
body sent to them whole into memory, with no credentials asked for, before answering 405; a few
connections could make the service hold gigabytes. They now refuse a body before reading it.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import pytest

from tests.server_fixtures import loop_thread

BIG = 512 * 1024 * 1024  # declared, never sent


@pytest.fixture
def service(tmp_path, request) -> Iterator[str]:
    """The real hub service (``start_hub_service``: its own listening socket and limits) on a free port; a test may
    name the service (``@pytest.mark.parametrize("service", [NAME], indirect=True)``)."""
    pytest.importorskip("jupyterhub")
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.service import load_hub_config, start_hub_service

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off"})
    env = {"JUPYTERHUB_API_TOKEN": "service-token", "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
           "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:0", "JUPYTERHUB_SERVICE_NAME": getattr(request, "param", "xllm")}

    async def setup() -> Any:
        return await start_hub_service(config, Engine(config.engine), env, port=0)

    with loop_thread(setup, "the hub service", 30) as (loop, running):
        try:
            yield running.url + running.prefix
        finally:
            loop.call_soon_threadsafe(running.stop_listening)


def _answer_before_the_body(url: str, method: str, path: str) -> bytes:
    """Send a head declaring a big body and 64 KB of it; what the server answers before the rest (b"" if nothing)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {BIG}\r\n\r\n".encode() + b"x" * 65536)
        try:
            return s.recv(4096)
        except socket.timeout:
            return b""  # still reading (buffering) the body


@pytest.mark.parametrize("method, tail", [("POST", ""), ("PUT", ""), ("GET", ""), ("POST", "oauth_callback"),
                                          ("GET", "oauth_callback")])
def test_a_body_sent_to_the_page_or_the_oauth_callback_is_refused_before_it_is_read(service, method, tail):
    prefix = "/" + service.split("//")[1].split("/", 1)[1]
    reply = _answer_before_the_body(service, method, prefix + tail)
    status = reply.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 4"), reply[:300]
    assert status.split()[1] in (b"405", b"413"), status


def test_an_api_route_refuses_a_body_without_credentials_before_reading_it(service):
    """The API routes stream: no token, a 401 before any of the body is read (as on ``xllm serve``)."""
    prefix = "/" + service.split("//")[1].split("/", 1)[1]
    reply = _answer_before_the_body(service, "POST", prefix + "v1/chat/completions")
    assert reply.split(b"\r\n", 1)[0].split()[1] == b"401", reply[:300]


def test_the_page_still_answers_a_plain_get(service):
    import httpx

    r = httpx.get(service, follow_redirects=False, timeout=30)
    assert r.status_code == 302  # not logged in: off to the hub's OAuth


@pytest.mark.parametrize("service", ["llm+gpu", "llm$gpu", "llm.gpu"], indirect=True)
def test_a_service_name_with_regex_characters_still_serves_its_page_and_oauth_callback(service):
    """JupyterHub allows '+', '$' and the like in a service's name (its prefix then holds them): the page and the
    OAuth callback were routed by the prefix read as a regular expression, missed it, and fell to the API's
    catch-all (401), so no browser could log in to such a service."""
    import httpx

    assert "/services/llm" in service
    r = httpx.get(service, follow_redirects=False, timeout=30)
    assert r.status_code == 302, (r.status_code, r.text)  # not logged in: off to the hub's OAuth
    r = httpx.get(service + "oauth_callback", follow_redirects=False, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)  # the callback itself: "made without a token"
    r = httpx.get(service + "v1/models", follow_redirects=False, timeout=30)
    assert r.status_code == 401  # the API, as for any name
