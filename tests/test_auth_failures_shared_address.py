"""One caller's failed authentications cannot lock out another caller at the same client address.

An address is no proof of who calls: users behind one NAT share it, and on a one-host hub any kernel can
name any address in ``X-Forwarded-For`` (it reaches the service from loopback, as the trusted proxy does).
Capping an address refused every credential from it until the window ended, so a user whose token the hub
service had never seen (a new token, a restarted service) or a standalone user's right key was locked out
by someone else's guesses. Past the cap the address's credentials are now checked one at a time, no faster
than the cap's own rate (``window / limit``): right ones get in after the guesses ahead of them, and a
guesser gets no faster than that rate, nor past a short waiting line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.server_fixtures import HUB_ALICE, proxied_tiny_server, running_hub_app
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.core.errors import RateLimited
from xllm_jupyter.server.auth_failures import PAST_CAP_WAITING, FailedAuthLimiter

LIMIT = 20
WINDOW = 40.0  # 2 s between two checks of a capped address; the window outlasts each test's capped part
INTERVAL = WINDOW / LIMIT
SHARED = "198.51.100.7"  # the address the proxy forwards for alice, and bob's kernel names (or bob's NAT)


def _hub_config(tmp_path: Any, limit: int = LIMIT, window: float = WINDOW) -> Any:
    from xllm_jupyter.hub.service import load_hub_config

    config = load_hub_config(env={"XLLM_HOME": str(tmp_path), "XLLM_QUOTAS_USAGE_FILE": "off"})
    assert "127.0.0.1" in config.auth.trusted_proxies  # the service's defaults: X-Forwarded-For is honoured
    return dataclasses.replace(config, auth=dataclasses.replace(
        config.auth, failed_auth_limit=limit, failed_auth_window_seconds=window))


class Hub:
    """The hub stood in for: alice's tokens are right, and every question is noted with when it came."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, float]] = []

    async def __call__(self, token: str) -> Any:
        self.asked.append((token, time.monotonic()))
        return HUB_ALICE if token.startswith("alice-") else None

    def tokens(self) -> list[str]:
        """The tokens asked about, in order."""
        return [t for t, _ in self.asked]


def _via_proxy(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}", "X-Forwarded-For": SHARED}


def test_a_token_the_hub_service_never_saw_is_served_from_an_address_another_user_keeps_capped(tmp_path):
    pytest.importorskip("jupyterhub")
    hub = Hub()
    with running_hub_app(_hub_config(tmp_path), hub) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        for i in range(LIMIT):  # bob (his kernel naming alice's address, or behind her NAT) guesses
            assert loopback.get("/v1/models", headers=_via_proxy(f"bob-guess-{i}")).status_code == 401
        capped_at = len(hub.asked)
        # bob goes on guessing while alice, whose token the service never saw, calls from that address
        bob_replies: list[int] = []

        def bob() -> None:
            with httpx.Client(base_url=root, timeout=60) as c:
                for i in range(3):
                    bob_replies.append(c.get("/v1/models", headers=_via_proxy(f"bob-more-{i}")).status_code)

        guesser = threading.Thread(target=bob)
        guesser.start()
        r = loopback.get("/v1/models", headers=_via_proxy("alice-new-token"))
        guesser.join()
        assert r.status_code == 200, r.text  # was 429 until the window ended
        assert "alice-new-token" in hub.tokens()
        # bob's guesses past the cap were asked about no faster than one per interval, and all refused
        assert bob_replies == [401, 401, 401]
        past = [when for _, when in hub.asked[capped_at:]]
        assert len(past) == 4
        gaps = [b - a for a, b in zip(past, past[1:])]
        assert min(gaps) >= INTERVAL * 0.95, gaps
        # once confirmed, alice's token is asked about at once (no turn to wait for), bob's still wait theirs
        assert loopback.get("/v1/models", headers=_via_proxy("alice-new-token")).status_code == 200


def test_a_waiting_request_whose_client_left_gives_up_its_turn(tmp_path):
    """A guesser cannot park requests in the line and leave: a request whose client closed its connection while it
    waited is dropped unchecked (the hub is never asked), and the next in line gets the turn."""
    pytest.importorskip("jupyterhub")
    hub = Hub()
    with running_hub_app(_hub_config(tmp_path), hub) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        for i in range(LIMIT):
            assert loopback.get("/v1/models", headers=_via_proxy(f"bob-guess-{i}")).status_code == 401
        for i in range(3):  # each waits for a turn 2 s away; its client gives up after 0.3 s
            with pytest.raises(httpx.TimeoutException):
                loopback.get("/v1/models", headers=_via_proxy(f"bob-parked-{i}"), timeout=0.3)
        r = loopback.get("/v1/models", headers=_via_proxy("alice-new-token"))
        assert r.status_code == 200, r.text
        assert not [t for t in hub.tokens() if t.startswith("bob-parked")], hub.tokens()[LIMIT:]


def test_a_waiting_request_whose_client_left_with_its_body_unread_gives_up_its_turn_too(tmp_path):
    """The same with POSTs whose body the server has not read yet (it waits in ``prepare``): a peek at the
    socket sees the body, not the close, so such parked guesses kept their turns and the hub was asked."""
    pytest.importorskip("jupyterhub")
    import select
    import socket
    from urllib.parse import urlsplit

    if not hasattr(select, "POLLRDHUP"):
        pytest.skip("POLLRDHUP is Linux's")
    hub = Hub()
    with running_hub_app(_hub_config(tmp_path), hub) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        for i in range(LIMIT):
            assert loopback.get("/v1/models", headers=_via_proxy(f"bob-guess-{i}")).status_code == 401
        url = urlsplit(root)
        body = b"x" * 100_000  # more than Tornado reads with the head (64 KiB): the rest stays in the socket
        for i in range(3):
            with socket.create_connection((url.hostname, url.port)) as s:
                s.sendall(f"POST {url.path.rstrip('/')}/v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                          f"Authorization: token bob-parked-{i}\r\nX-Forwarded-For: {SHARED}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                time.sleep(0.3)  # waiting its turn 2 s away; then its client gives up
        r = loopback.get("/v1/models", headers=_via_proxy("alice-new-token"))
        assert r.status_code == 200, r.text
        assert not [t for t in hub.tokens() if t.startswith("bob-parked")], hub.tokens()[LIMIT:]


def test_the_hub_page_serves_a_new_token_from_a_capped_address_too(tmp_path):
    pytest.importorskip("jupyterhub")
    hub = Hub()
    with running_hub_app(_hub_config(tmp_path), hub) as root, httpx.Client(base_url=root, timeout=60) as loopback:
        for i in range(LIMIT):
            loopback.get("/", headers=_via_proxy(f"bob-guess-{i}"), follow_redirects=False)
        r = loopback.get("/", headers=_via_proxy("alice-page-token"), follow_redirects=False)
        assert r.status_code == 200 and "alice" in r.text, (r.status_code, r.text[:200])


def test_a_capped_address_with_a_full_waiting_line_gets_429_and_the_hub_is_not_asked(tmp_path):
    """A guesser sending many at once gets no more checks: past ``PAST_CAP_WAITING`` waiting, a 429 at once."""
    pytest.importorskip("jupyterhub")
    hub, limit, extra = Hub(), 4, 5
    # 100 s between checks: none of the waiting requests is checked while the test runs
    with running_hub_app(_hub_config(tmp_path, limit=limit, window=400.0), hub) as root:
        with httpx.Client(base_url=root, timeout=60) as loopback:
            for i in range(limit):
                assert loopback.get("/v1/models", headers=_via_proxy(f"guess-{i}")).status_code == 401

        async def burst() -> list[Any]:
            async with httpx.AsyncClient(base_url=root, timeout=3) as c:
                return await asyncio.gather(*(c.get("/v1/models", headers=_via_proxy(f"more-{i}"))
                                              for i in range(PAST_CAP_WAITING + extra)), return_exceptions=True)

        replies = asyncio.run(burst())
        refused = [r for r in replies if isinstance(r, httpx.Response)]
        assert len(refused) == extra, replies
        for r in refused:
            assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 400
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "rate_limit_exceeded"
        assert all(isinstance(r, httpx.TimeoutException) for r in replies if r not in refused)  # still waiting
        assert len(hub.asked) == limit  # none of the burst reached the hub


# ---------------------------------------------------------------- standalone, behind a trusted proxy
KEY = "sk-right-key"


@pytest.fixture(scope="module")
def proxied_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A standalone server behind a proxy on 127.0.0.1, allowing ``LIMIT`` failed authentications per client."""
    with proxied_tiny_server(xllm_home, tiny_catalog, KEY, LIMIT, WINDOW) as info:
        yield info


def _bearer(key: str, forwarded: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "X-Forwarded-For": forwarded}


def test_a_right_api_key_is_served_from_an_address_another_caller_keeps_capped(proxied_server):
    client = "192.0.2.44"
    with httpx.Client(base_url=proxied_server.root, timeout=60) as proxy:
        for i in range(LIMIT):
            assert proxy.get("/v1/models", headers=_bearer(f"sk-guess-{i}", client)).status_code == 401
        started = time.monotonic()
        r = proxy.get("/v1/models", headers=_bearer(KEY, client))
        assert r.status_code == 200, r.text  # was 429 until the window ended
        assert time.monotonic() - started >= INTERVAL * 0.95  # it waited its turn: a capped address is slowed
        r = proxy.get("/v1/models", headers=_bearer("sk-guess-more", client))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------------- the limiter itself
def test_the_waiting_line_takes_requests_one_at_a_time_in_arrival_order():
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=2, failed_auth_window_seconds=0.6))  # 0.3 s apart
    order: list[int] = []

    async def one(i: int) -> str:
        try:
            async with limiter.past_cap("192.0.2.1"):
                order.append(i)
                await asyncio.sleep(0.01)
        except RateLimited:
            return "429"
        return "checked"

    async def run() -> list[str]:
        limiter.failed("192.0.2.1")
        limiter.failed("192.0.2.1")
        with pytest.raises(RateLimited):
            limiter.check("192.0.2.1")
        tasks = []
        for i in range(PAST_CAP_WAITING + 2):
            tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(0)  # each joins the line before the next arrives
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    # the window (0.6 s) ends while the line drains: the rest are checked without waiting
    assert results == ["checked"] * PAST_CAP_WAITING + ["429", "429"]
    assert order == list(range(PAST_CAP_WAITING))
    assert limiter._lanes == {}  # nothing left behind


#: failed tokens that fill one address's window in the shutdown tests, so that the next request waits its turn
SHUTDOWN_LIMIT = 4


def _waiting_request_at_shutdown(tmp_path: Path, path: str) -> tuple[list[Any], Hub]:
    """A hub service whose one address has used up its failures (``SHUTDOWN_LIMIT`` in a 400 s window); a valid
    token's ``GET path`` waits its turn (100 s away) while the service stops. (What it got, the stub hub.)"""
    pytest.importorskip("jupyterhub")
    from tests.server_fixtures import loop_thread
    from xllm_jupyter.engine.engine import Engine
    from xllm_jupyter.hub.service import start_hub_service

    hub = Hub()
    config = _hub_config(tmp_path, limit=SHUTDOWN_LIMIT, window=400.0)
    env = {"JUPYTERHUB_API_TOKEN": "service-token", "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api",
           "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:0"}

    async def setup() -> Any:
        running = await start_hub_service(config, Engine(config.engine), env, port=0)
        running.http_server.request_callback.settings["xllm_hub_auth"].user_for_token = (
            lambda token, sync=True, **_: hub(token))
        return running

    with loop_thread(setup, "the hub service", 30) as (loop, running):
        root = running.url + running.prefix.rstrip("/")
        with httpx.Client(base_url=root, timeout=60) as loopback:
            for i in range(SHUTDOWN_LIMIT):
                assert loopback.get("/v1/models", headers=_via_proxy(f"guess-{i}")).status_code == 401
        replies: list[Any] = []

        def waiting() -> None:
            with httpx.Client(base_url=root, timeout=60) as c:
                try:
                    replies.append(c.get(path, headers=_via_proxy("alice-token")))
                except httpx.HTTPError as exc:
                    replies.append(exc)

        waiter = threading.Thread(target=waiting)
        waiter.start()
        waiter.join(2)
        assert waiter.is_alive()  # waiting its turn (100 s away)
        asyncio.run_coroutine_threadsafe(running.stop(), loop).result(30)  # was: until its turn
        waiter.join(30)
    return replies, hub


def test_a_request_waiting_its_turn_does_not_hold_up_the_shutdown(tmp_path):
    """Requests wait in ``prepare``, where Tornado does not watch their connection: closing it at shutdown did not
    end them. The stop gave up on one after 5 s and cut its connection (with several waiting it waited for their
    turns, 100 s apart here); they now get a 503 at once."""
    replies, hub = _waiting_request_at_shutdown(tmp_path, "/v1/models")
    assert len(replies) == 1 and isinstance(replies[0], httpx.Response), replies
    assert replies[0].status_code == 503 and replies[0].json()["error"]["code"] == "overloaded"
    assert len(hub.asked) == SHUTDOWN_LIMIT


def test_a_hub_page_request_waiting_its_turn_gets_a_503_at_the_shutdown(tmp_path):
    """The page answers its own refusals (no OpenAI error writer there): the shutdown's Overloaded, raised in its
    ``prepare`` while it waited its turn, was an uncaught exception, a 500 with a traceback in the log."""
    replies, hub = _waiting_request_at_shutdown(tmp_path, "/")
    assert len(replies) == 1 and isinstance(replies[0], httpx.Response), replies
    assert replies[0].status_code == 503, replies[0].text
    assert replies[0].headers["Retry-After"] == "1" and "shutting down" in replies[0].text
    assert len(hub.asked) == SHUTDOWN_LIMIT
