"""Open-connection caps: a client holding half-sent requests cannot take the server's sockets from others."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx
import pytest
from tornado.netutil import bind_sockets

from tests.helpers import free_port
from tests.server_fixtures import API_KEY, TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.server.auth_failures import (
    IPV6_SITE_SHARE,
    IPV6_WIDE_SHARE,
    client_label,
)
from xllm_jupyter.server.connections import (
    EXEMPT,
    ConnectionGuard,
    GuardedHTTPServer,
    per_client_cap,
    raise_fd_limit,
)

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


def _answer_then_close(s: socket.socket) -> bytes:
    """All the server sent on ``s`` until it closed it (what a refused connection gets)."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


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
        head, _, body = _answer_then_close(extra).partition(b"\r\n\r\n")  # answered and closed on arrival
        extra.close()
        assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 1" in head and b"Connection: close" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
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


def test_a_refused_request_still_arriving_gets_the_answer_and_its_end_not_a_reset():
    """A refused connection was closed once the first 64 KiB of its request were read off: with the rest still
    arriving the close was a reset, and the client's read failed with ConnectionResetError after the answer
    (some systems destroy the unread answer too). Now the server ends its side and reads the rest off first."""
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 81920\r\n\r\n" + b"x" * 81920

    async def refuse_one() -> bytes:
        server = GuardedHTTPServer(lambda _request: None)
        server.guard = ConnectionGuard(total=0, per_client=-1)  # every connection is over the total cap
        listening = bind_sockets(0, "127.0.0.1")
        client = socket.create_connection(listening[0].getsockname()[:2], timeout=30)
        client.sendall(request)  # all of it sent before the server accepts: the order is certain
        server.add_sockets(listening)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, _answer_then_close, client)
        finally:
            client.close()
            server.stop()

    head, _, body = asyncio.run(refuse_one()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and json.loads(body)["error"]["code"] == "too_many_connections"


def test_refused_connections_linger_a_16th_of_a_low_total_cap_at_most():
    """Lingering refused connections hold descriptors beyond the total cap: 64 of them took the last descriptors at
    a hard limit of 256 (cap 192). A 16th of the cap may linger (here 1: the second is closed at once)."""

    async def refuse_two() -> int:
        server = GuardedHTTPServer(lambda _request: None)
        server.guard = ConnectionGuard(total=0, per_client=-1)  # every connection is over the total cap
        listening = bind_sockets(0, "127.0.0.1")
        clients = [socket.create_connection(listening[0].getsockname()[:2], timeout=30) for _ in range(2)]
        server.add_sockets(listening)
        try:
            for client in clients:  # both answered: both refused
                assert (await asyncio.get_running_loop().run_in_executor(None, client.recv, 16)).startswith(b"HTTP/1.1 503")
            return len(server._lingering)
        finally:
            for client in clients:
                client.close()
            server.stop()

    assert asyncio.run(refuse_two()) == 1


def test_the_openai_sdk_over_its_cap_gets_a_rate_limit_error_not_a_connection_error(capped):
    """Closed without a word, the SDK raised APIConnectionError (and, with retries on, retried at once)."""
    import openai

    port = _port(capped)
    held = [_half_open(port, "127.0.0.4") for _ in range(PER_CLIENT)]
    try:
        http = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.4"), timeout=30)
        sdk = openai.OpenAI(base_url=capped.base_url, api_key=API_KEY, max_retries=0, http_client=http)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        error = caught.value
        assert error.status_code == 429 and error.response.headers["retry-after"] == "1"
        assert error.code == "too_many_connections" and "at most 5" in error.message
        http.close()
    finally:
        for s in held:
            s.close()


def test_the_per_client_default_scales_with_the_total_cap():
    """At a low descriptor limit the total cap (3/4 of it) was below the fixed 256 per client: the per-client
    cap never came first, and one client's flood closed every client's new connections."""
    assert per_client_cap(-1, 49152) == 256  # the descriptor limit raised to 65536
    assert per_client_cap(-1, 192) == 48  # 256 descriptors
    assert per_client_cap(-1, 2) == 1
    assert (per_client_cap(0, 192), per_client_cap(300, 192)) == (0, 300)  # what is set is kept
    assert ConnectionGuard(total=192, per_client=-1).per_client == 48
    # a refused connection's answer at the total cap: 503 with Retry-After, an OpenAI body
    guard = ConnectionGuard(total=1, per_client=-1)
    assert guard.admit("10.0.0.1") and guard.admit("10.0.0.2") is None
    head, _, body = guard.reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1" in head
    assert json.loads(body)["error"] == {"message": "The server has too many open connections (at most 1); "
                                         "retry shortly.", "type": "server_error", "param": None,
                                         "code": "too_many_connections"}


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
    assert guard.admit("10.0.0.9") == EXEMPT and guard.open == 3 and guard.refused == 2
    assert raise_fd_limit() >= resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 0


def test_the_64s_of_one_ipv6_56_share_a_cap():
    """A site can route any of its /64s to one host: counted by /64 alone, one /48 opened ``per_client`` in each,
    up to the server's total cap. The /64s of one /56 now share ``IPV6_SITE_SHARE`` times the per-client cap."""
    guard = ConnectionGuard(total=100_000, per_client=2, exempt=lambda a: a.startswith("2001:db8:9:"))
    held = [guard.admit(f"2001:db8:5:{subnet:x}::{n + 1}") for subnet in range(IPV6_SITE_SHARE) for n in range(2)]
    assert all(held)
    assert guard.admit("2001:db8:5:ff::1") is None  # a fresh /64 of the full /56 (was admitted: 256 a /64)
    assert guard.per_site == 2 * IPV6_SITE_SHARE
    head, _, body = guard.reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "too_many_connections" and "/56" in json.loads(body)["error"]["message"]
    # another /48, an IPv4 client and a trusted proxy's /48 are not affected
    assert guard.admit("2001:db8:6::1") and guard.admit("192.0.2.1") and guard.admit("2001:db8:9:1::1")
    guard.release(held[0])  # one of the site's connections closes: a place frees for any of its /64s
    assert guard.admit("2001:db8:5:ff::1") == "2001:db8:5:ff::/64"
    assert guard.admit("2001:db8:5:fe::1") is None
    for label in held[1:]:
        guard.release(label)
    assert guard.admit("2001:db8:5:fe::1") and guard.open == 5


def test_a_full_56_leaves_its_48s_other_56s_their_connections():
    """ISPs that hand out /56s put 256 homes in one /48: with the /48 alone capped at 16 times the per-client cap,
    one home's 16 /64s filled it and its 255 neighbours were refused. A /48 now holds 64 times (four /56s' share)."""
    guard = ConnectionGuard(total=100_000, per_client=2)
    home = [guard.admit(f"2001:db8:5:{subnet:x}::1") for subnet in range(IPV6_SITE_SHARE) for _ in range(2)]
    assert all(home) and guard.admit("2001:db8:5:ff::1") is None  # the home's /56 is full
    assert guard.admit("2001:db8:5:100::1") == "2001:db8:5:100::/64"  # a neighbour's /56 (was refused: /48 full)
    # four /56s' worth fills the /48 itself: a fifth /56 of it is refused, another /48 is not
    more = [guard.admit(f"2001:db8:5:{home_n:x}{subnet:02x}::1") for home_n in range(1, 4)
            for subnet in range(IPV6_SITE_SHARE) for _ in range(2)]
    assert sum(1 for label in more if label) == 3 * 2 * IPV6_SITE_SHARE - 1  # one place taken by the neighbour above
    assert guard.per_wide_site == 2 * IPV6_WIDE_SHARE
    assert guard.admit("2001:db8:5:400::1") is None and b"/48" in guard.reply
    assert guard.admit("2001:db8:6:400::1")


def test_a_flood_of_half_sent_requests_under_a_low_descriptor_limit(tmp_path):
    """With 256 descriptors, 300 half-sent requests made accept() fail in a loop: a core spun, 46,000 tracebacks
    (28 MB) were logged in 3 s, and no one was answered. Now the flooding address is closed at its cap."""
    port = free_port()
    log = tmp_path / "serve.log"
    # the default per-client cap: 48 here (a quarter of the total cap, 192); a fixed 256 was never reached first
    env = {**os.environ, "XLLM_HOME": str(tmp_path / "home"), "XLLM_API_KEYS": "k", "XLLM_ENGINE_DEFAULT_MODEL": ""}
    env.pop("XLLM_SERVER_MAX_CONNECTIONS_PER_CLIENT", None)

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
    assert text.count("closing new connections from 127.0.0.2: it has 48 open") == 1  # said once, not per connection
    assert "every client" not in text  # the flooding client's cap came first, not the total one


def test_a_trusted_proxys_connections_fill_no_cap_of_its_networks():
    """A trusted proxy is exempt from the per-client cap, but its connections were counted under its /64, /56 and
    /48: holding as many as the caps allow, it shut out every other host of those networks (a hub's users on the
    proxy's subnet). They now count towards the total only."""
    proxy = "2001:db8:9::9"
    guard = ConnectionGuard(total=100_000, per_client=2, exempt=lambda a: a == proxy)
    held = [guard.admit(proxy) for _ in range(2 * IPV6_WIDE_SHARE)]
    assert all(held) and guard.open == 2 * IPV6_WIDE_SHARE
    # its own /64, its /56 and its /48 (was refused: "too many open connections from this address")
    for neighbour in ("2001:db8:9::20", "2001:db8:9:1::1", "2001:db8:9:100::1"):
        assert guard.admit(neighbour) == client_label(neighbour), (neighbour, guard.reply)
    assert all(label == EXEMPT for label in held)
    for label in held:
        guard.release(label)
    assert guard.open == 3
