"""Open-connection caps: a client holding half-sent requests cannot take the server's sockets from others."""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx
import pytest

from tests.helpers import free_port
from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.server.connections import ConnectionGuard, raise_fd_limit

PER_CLIENT = 5
HALF = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # a request head that never ends


@pytest.fixture(scope="module")
def capped(xllm_home, tiny_catalog) -> Iterator[Any]:
    """At most ``PER_CLIENT`` connections per client address; 127.0.0.9 is a trusted proxy."""
    cfg = make_test_config(xllm_home, max_connections_per_client=PER_CLIENT)
    cfg = dataclasses.replace(cfg, auth=AuthConfig(trusted_proxies=("127.0.0.9",)))
    with running_server(cfg, tiny_catalog, TINY) as info:
        yield info


def _half_open(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0), timeout=30)
    s.sendall(HALF)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """True when the server closed ``s`` without answering (what a refused connection gets)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def _served(root: str, source: str) -> int:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=30) as c:
        return c.get(root + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code


def _port(info: Any) -> int:
    return int(info.root.rsplit(":", 1)[1])


def test_a_client_at_its_cap_is_closed_and_others_are_served(capped):
    port = _port(capped)
    held = [_half_open(port, "127.0.0.2") for _ in range(PER_CLIENT)]
    try:
        extra = _half_open(port, "127.0.0.2")
        assert _closed_by_server(extra)  # closed on arrival, nothing written
        extra.close()
        assert _served(capped.root, "127.0.0.3") == 200  # another address is not affected
    finally:
        for s in held:
            s.close()
    for _ in range(100):  # the server counts the closed ones out as it sees them close
        try:
            if _served(capped.root, "127.0.0.2") == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        pytest.fail("127.0.0.2 was not served again after closing its connections")


def test_a_trusted_proxy_is_not_capped(capped):
    port = _port(capped)
    held = [_half_open(port, "127.0.0.9") for _ in range(PER_CLIENT * 2)]
    try:
        assert _served(capped.root, "127.0.0.9") == 200
    finally:
        for s in held:
            s.close()


def test_the_total_cap_and_release():
    guard = ConnectionGuard(total=3, per_client=2, exempt=lambda a: a == "10.0.0.9")
    a, b = guard.admit("10.0.0.1"), guard.admit("10.0.0.1")
    assert a and b and guard.admit("10.0.0.1") is None  # per client
    assert guard.admit("2001:db8::1") == "2001:db8::/64"
    assert guard.admit("10.0.0.9") is None  # exempt from the per-client cap, not from the total
    guard.release(a)
    assert guard.admit("10.0.0.9") == "10.0.0.9" and guard.open == 3 and guard.refused == 2
    assert raise_fd_limit() >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 0


def test_a_flood_of_half_sent_requests_under_a_low_descriptor_limit(tmp_path):
    """With 256 descriptors, 300 half-sent requests made accept() fail in a loop: a core spun, 46,000 tracebacks
    (28 MB) were logged in 3 s, and no one was answered. Now the flooding address is closed at its cap."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "XLLM_HOME": str(tmp_path / "home"), "XLLM_API_KEYS": "k", "XLLM_ENGINE_DEFAULT_MODEL": "",
           "XLLM_SERVER_MAX_CONNECTIONS_PER_CLIENT": "100"}

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "xllm_jupyter.cli", "serve", "--port", str(port)],
                                env=env, preexec_fn=low_limit, stdout=out, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    held: list[socket.socket] = []
    try:
        for _ in range(300):
            try:
                httpx.get(root + "/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        for _ in range(300):
            try:
                held.append(_half_open(port, "127.0.0.2"))
            except OSError:  # refused at the cap: the server closed it, or our side saw the reset
                pass
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=30) as c:
            assert c.get(root + "/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    assert "Too many open files" not in text and "Traceback" not in text
    assert text.count("closing new connections from 127.0.0.2") == 1  # said once, not per connection
