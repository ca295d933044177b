"""A trusted proxy's own address is never capped for failed authentications: it speaks for many callers.

The hub service trusts loopback (JupyterHub's proxy), and on a one-host hub every user's server and
kernel reaches the service at ``127.0.0.1`` too, with no ``X-Forwarded-For``: counted under that one
address, a single guesser (or one notebook looping on an expired token) locked every user out.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Iterator

import httpx
import pytest
import tornado.httputil

from tests.server_fixtures import proxied_tiny_server
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.server.auth_failures import FailedAuthLimiter

KEY = "sk-right-key"
LIMIT = 3


def _http(root: str, source: str) -> httpx.Client:
    return httpx.Client(base_url=root, timeout=60, transport=httpx.HTTPTransport(local_address=source))


def _auth(key: str, forwarded: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    return headers


@pytest.fixture(scope="module")
def proxied_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A standalone server behind a proxy on 127.0.0.1, allowing ``LIMIT`` failed authentications per client."""
    with proxied_tiny_server(xllm_home, tiny_catalog, KEY, LIMIT, 30) as info:
        yield info


def test_direct_callers_at_a_trusted_address_are_not_locked_out_by_one_guesser(proxied_server):
    with _http(proxied_server.root, "127.0.0.1") as local:
        for i in range(LIMIT + 5):
            assert local.get("/v1/models", headers=_auth(f"sk-guess-{i}")).status_code == 401
        # another process on the same host (another user's kernel) with the right key is served
        assert local.get("/v1/models", headers=_auth(KEY)).status_code == 200


def test_clients_the_proxy_names_are_still_capped_one_by_one(proxied_server):
    with _http(proxied_server.root, "127.0.0.1") as proxy:
        for i in range(LIMIT):
            assert proxy.get("/v1/models", headers=_auth(f"sk-guess-{i}", "192.0.2.9")).status_code == 401
        with pytest.raises(httpx.TimeoutException):  # capped: its turn comes window / limit (10 s) later
            proxy.get("/v1/models", headers=_auth(KEY, "192.0.2.9"), timeout=2)
        assert proxy.get("/v1/models", headers=_auth(KEY, "192.0.2.10")).status_code == 200  # another client
        assert proxy.get("/v1/models", headers=_auth(KEY)).status_code == 200  # the proxy's host itself


def _request(peer: str, forwarded: str | None = None) -> Any:
    headers = tornado.httputil.HTTPHeaders()
    if forwarded:
        headers.add("X-Forwarded-For", forwarded)
    return SimpleNamespace(remote_ip=peer, headers=headers)


def test_the_hub_services_defaults_never_cap_its_loopback_callers(tmp_path):
    pytest.importorskip("jupyterhub")
    from xllm_jupyter.hub.service import load_hub_config

    auth = load_hub_config(env={"XLLM_HOME": str(tmp_path)}).auth
    limiter = FailedAuthLimiter(dataclasses.replace(auth, failed_auth_limit=LIMIT))
    for peer, forwarded in (("127.0.0.1", None), ("::1", None), ("127.0.0.1", "127.0.0.1, ::1")):
        client = limiter.client(_request(peer, forwarded))
        for _ in range(LIMIT + 1):
            limiter.failed(client)
        limiter.check(client)  # no 429: a kernel on the hub's host shares this address with every other user's
    assert len(limiter) == 0 and limiter.refused == 0
    proxied = limiter.client(_request("127.0.0.1", "6.6.6.6, 192.0.2.9"))
    for _ in range(LIMIT):
        limiter.failed(proxied)
    with pytest.raises(Exception, match="failed authentication"):
        limiter.check(proxied)


def test_a_proxy_named_in_its_ipv4_mapped_form_is_trusted():
    # a dual-stack server logs an IPv4 peer as ::ffff:10.0.0.5; named so in trusted_proxies it matched no peer at
    # all (the peer is read as the IPv4 10.0.0.5): every client behind the proxy was counted as the proxy
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=LIMIT, trusted_proxies=("::ffff:10.0.0.5", "::ffff:10.1.0.0/112")))
    for peer in ("10.0.0.5", "::ffff:10.0.0.5", "10.1.2.3"):
        assert limiter.client(_request(peer, "192.0.2.9")) == "192.0.2.9", peer
        assert limiter.client(_request(peer)) is None, peer  # the proxy itself: never counted
    assert limiter.client(_request("10.0.0.6", "192.0.2.9")) == "10.0.0.6"  # not the proxy: its header is ignored
    # the connection cap exempts it the same way (server/connections.py takes the same matcher)
    from xllm_jupyter.server.auth_failures import proxy_matcher
    from xllm_jupyter.server.connections import ConnectionGuard

    guard = ConnectionGuard(total=100, per_client=1, exempt=proxy_matcher(("::ffff:10.0.0.5",)))
    assert guard.admit("::ffff:10.0.0.5") and guard.admit("10.0.0.5")
    assert guard.admit("10.0.0.6") and guard.admit("10.0.0.6") is None
