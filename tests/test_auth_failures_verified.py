"""A key already proved on a connection is not held up by a guesser at the same address (``FailedAuthLimiter.vouched``).

Past the cap an address's keys wait their turn, and a request finding ``PAST_CAP_WAITING`` already waiting gets
429 unchecked. A guesser behind the same NAT that keeps the line full turned away every request of the address,
a right key's too, even one whose client had been served on that very connection a moment before. Checking the
presented key before the line would be a guessing oracle (the full line's 429 would then mean "wrong"); a
connection's own proved key is not: only the client at its end can send on it.
"""

from __future__ import annotations

import dataclasses
import select
import socket
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.server.auth_failures import PAST_CAP_WAITING, FailedAuthLimiter

KEY = "sk-right-key"
LIMIT = 4
WINDOW = 400.0  # 100 s between two checks of a capped address: no waiting request gets its turn during a test


@contextmanager
def capped_server(xllm_home: Any, tiny_catalog: Any) -> Iterator[Any]:
    """A standalone server (no trusted proxy) allowing ``LIMIT`` failed authentications per address and window."""
    cfg = make_test_config(xllm_home, api_keys=(KEY,))
    cfg = dataclasses.replace(cfg, auth=AuthConfig(failed_auth_limit=LIMIT, failed_auth_window_seconds=WINDOW))
    with running_server(cfg, tiny_catalog, TINY) as info:
        yield info


@pytest.fixture(scope="module")
def server(xllm_home, tiny_catalog) -> Iterator[Any]:
    with capped_server(xllm_home, tiny_catalog) as info:
        yield info


def _one_connection(root: str, source: str) -> httpx.Client:
    """A client from ``source`` whose requests all go over one kept-alive connection."""
    transport = httpx.HTTPTransport(local_address=source, limits=httpx.Limits(max_connections=1))
    return httpx.Client(base_url=root, timeout=60, transport=transport)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _fill_the_line(root: str, source: str) -> list[socket.socket]:
    """``PAST_CAP_WAITING`` + 1 guesses from ``source`` sent at once on connections of their own: all but one
    wait their turn, the last finds the line full. Returns the sockets of the waiting ones (close them to leave)."""
    url = urlsplit(root)
    socks = []
    for i in range(PAST_CAP_WAITING + 1):
        s = socket.create_connection((url.hostname, url.port), source_address=(source, 0))
        s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer sk-parked-{i}\r\n\r\n".encode())
        socks.append(s)
    ready, _, _ = select.select(socks, [], [], 60)
    assert len(ready) == 1, f"{len(ready)} answered"  # the one the full line refused; the others wait
    head = ready[0].recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 429"), head[:200]
    # come back at the next check, when a place frees (was the window's end: 400 s on)
    retry_after = [int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("retry-after:")]
    assert retry_after and 1 <= retry_after[0] <= WINDOW / LIMIT, head[:400]
    ready[0].close()
    return [s for s in socks if s is not ready[0]]


def test_a_key_proved_on_its_connection_is_served_while_a_guesser_keeps_the_line_full(server):
    source = "127.0.0.21"  # alice and bob share it (one NAT)
    with _one_connection(server.root, source) as alice:
        assert alice.get("/v1/models", headers=_bearer(KEY)).status_code == 200  # before bob starts
        with _one_connection(server.root, source) as bob:
            for i in range(LIMIT):
                assert bob.get("/v1/models", headers=_bearer(f"sk-guess-{i}")).status_code == 401
        parked = _fill_the_line(server.root, source)
        try:
            for _ in range(3):  # was 429 (the line is full) until bob's window ended, 400 s on
                r = alice.get("/v1/models", headers=_bearer(KEY))
                assert r.status_code == 200, r.text
                assert [m["id"] for m in r.json()["data"]]
            # her proved connection serves generation too, not only the listing
            r = alice.post("/v1/chat/completions", headers=_bearer(KEY),
                           json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code == 200, r.text
            # a key her connection did not prove is no exception: a guess sent on it gets the full line's 429 (last:
            # a refusal closes the connection, since the request's body was not read)
            r = alice.get("/v1/models", headers=_bearer("sk-guess-on-alices-connection"))
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
            # nor is the right key on a connection that never proved it: it is refused unchecked, as a guess is
            # (anything else would tell a guesser which of its keys is right, at any rate)
            with _one_connection(server.root, source) as fresh:
                r = fresh.get("/v1/models", headers=_bearer(KEY))
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        finally:
            for s in parked:
                s.close()


# ---------------------------------------------------------------- the limiter itself
class _Stream:
    """Stands in for a connection's IOStream."""


def _request(peer: str, stream: Any, key: str = KEY) -> Any:
    return SimpleNamespace(remote_ip=peer, connection=SimpleNamespace(stream=stream),
                           headers={"Authorization": f"Bearer {key}"})


def test_only_the_proved_credential_on_its_own_connection_is_vouched_for():
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=2, trusted_proxies=("10.0.0.1",)))
    mine, other = _Stream(), _Stream()
    limiter.vouch(_request("192.0.2.1", mine), f"Bearer {KEY}")
    assert limiter.vouched(_request("192.0.2.1", mine), f"Bearer {KEY}")
    assert not limiter.vouched(_request("192.0.2.1", mine), "Bearer sk-other")
    assert not limiter.vouched(_request("192.0.2.1", other), f"Bearer {KEY}")  # another connection, same address
    assert not limiter.vouched(_request("192.0.2.1", mine), None)
    # a trusted proxy's connection carries many clients' requests (upstream keepalive): never vouched for, or a
    # guesser behind the proxy could test keys against the one proved on it, unchecked
    proxied = _Stream()
    limiter.vouch(_request("10.0.0.1", proxied), f"Bearer {KEY}")
    assert not limiter.vouched(_request("10.0.0.1", proxied), f"Bearer {KEY}")
    del mine  # the entry goes with its connection
    assert len(limiter._verified) == 0


def test_a_connection_that_carries_another_credential_no_longer_vouches_for_the_proved_one():
    # behind a proxy not named in trusted_proxies, one upstream connection carries many clients' requests: were
    # the proved key still vouched for after a wrong one, every guess sent on that connection would be tested
    # against it for nothing (served at once if right, the full line's 429 if not)
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=2))
    conn = _Stream()
    limiter.vouch(_request("192.0.2.1", conn), f"Bearer {KEY}")
    assert not limiter.vouched(_request("192.0.2.1", conn, "sk-guess"), "Bearer sk-guess")
    assert not limiter.vouched(_request("192.0.2.1", conn), f"Bearer {KEY}")  # was still True
    assert len(limiter._verified) == 0
    # a request with no key is no other credential: the proved one stays vouched for
    limiter.vouch(_request("192.0.2.1", conn), f"Bearer {KEY}")
    assert not limiter.vouched(_request("192.0.2.1", conn), None)
    assert limiter.vouched(_request("192.0.2.1", conn), f"Bearer {KEY}")
