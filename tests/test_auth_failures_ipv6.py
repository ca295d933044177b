"""An IPv6 site cannot rotate through its /64s for fresh failed-auth caps: its failures count towards its /48 too.

An IPv6 client counts by its /64, since one host picks addresses from a whole /64. But a site commonly holds a
/48 and can route any of its 65536 /64s to one host: each was a fresh cap (``limit`` guesses a window each),
and enough of them pushed every other address out of the bounded table.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import Clock
from tests.server_fixtures import HUB_ALICE, proxied_tiny_server, running_hub_app
from xllm_jupyter.core.config import AuthConfig, load_config
from xllm_jupyter.core.errors import RateLimited
from xllm_jupyter.server.auth_failures import IPV6_SITE_SHARE, IPV6_WIDE_SHARE, PAST_CAP_WAITING, FailedAuthLimiter

KEY = "sk-right-key"
LIMIT = 2
WINDOW = 400.0  # 200 s between two checks past the cap: nothing waiting gets its turn during the test


def _host(subnet: int, site: str = "2001:db8:5") -> str:
    """An address in the ``subnet``-th /64 of ``site``'s /48."""
    return f"{site}:{subnet:x}::1"


@pytest.fixture(scope="module")
def proxied_server(xllm_home, tiny_catalog) -> Iterator[Any]:
    """A standalone server behind a proxy on 127.0.0.1 (which names the client in X-Forwarded-For)."""
    with proxied_tiny_server(xllm_home, tiny_catalog, KEY, LIMIT, WINDOW) as info:
        yield info


def test_fresh_64s_of_a_site_that_used_up_its_share_wait_their_turn(proxied_server):
    with httpx.Client(base_url=proxied_server.root, timeout=60) as proxy:
        for subnet in range(IPV6_SITE_SHARE):  # every /64 uses up its own failures: the /48's share is spent
            for i in range(LIMIT):
                r = proxy.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{subnet}-{i}",
                                                     "X-Forwarded-For": _host(subnet)})
                assert r.status_code == 401, r.text
        # another site's client is not affected
        r = proxy.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", "X-Forwarded-For": _host(1, "2001:db8:6")})
        assert r.status_code == 200
    # guesses from fresh /64s of the site, all at once: they wait in the /48's line (one check every 200 s), and
    # the one that finds it full gets 429 unchecked; each was checked at once before (a 401), as many as were sent
    url = urlsplit(proxied_server.root)
    socks = []
    try:
        for n in range(PAST_CAP_WAITING + 1):
            s = socket.create_connection((url.hostname, url.port))
            s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer sk-fresh-{n}\r\n"
                      f"X-Forwarded-For: {_host(IPV6_SITE_SHARE + n)}\r\n\r\n".encode())
            socks.append(s)
        ready, _, _ = select.select(socks, [], [], 60)
        head = ready[0].recv(65536).decode("latin-1")
        assert head.startswith("HTTP/1.1 429"), head[:200]
        assert len(ready) == 1, f"{len(ready)} answered"
    finally:
        for s in socks:
            s.close()


def test_the_hub_is_asked_about_no_more_of_a_sites_guesses_than_its_share_however_many_64s_send_at_once(tmp_path):
    """The hub service asks the hub about an address's tokens no faster than it counts their failures (``asking``);
    fresh /64s each had a whole limit's room, so a burst from one /48's /64s all reached the hub."""
    pytest.importorskip("jupyterhub")
    config = load_config(env={}, overrides={"store": {"home": str(tmp_path)}, "quotas": {"usage_file": "off"},
                                            "auth": {"failed_auth_limit": LIMIT, "trusted_proxies": ["127.0.0.1"]}})
    asked: list[str] = []

    async def user_for_token(token: str) -> Any:
        asked.append(token)
        await asyncio.sleep(0.05)  # the hub's API takes a while: the burst's requests overlap
        return HUB_ALICE if token.startswith("good") else None

    burst = 100

    async def send(root: str) -> list[Any]:
        async with httpx.AsyncClient(base_url=root, timeout=3) as c:
            return await asyncio.gather(*(c.get("/v1/models", headers={"Authorization": f"token guess-{n}",
                                                                        "X-Forwarded-For": _host(n)})
                                          for n in range(burst)), return_exceptions=True)

    with running_hub_app(config, user_for_token) as root:
        replies = asyncio.run(send(root))
        assert len(asked) == LIMIT * IPV6_SITE_SHARE, len(asked)  # was all 100
        statuses = [r.status_code for r in replies if isinstance(r, httpx.Response)]
        assert statuses.count(401) == len(asked) and set(statuses) <= {401, 429}
        # another site's right token is served at once
        with httpx.Client(base_url=root, timeout=60) as c:
            r = c.get("/v1/models", headers={"Authorization": "token good", "X-Forwarded-For": _host(1, "2001:db8:6")})
            assert r.status_code == 200, r.text


# ---------------------------------------------------------------- the limiter itself
def test_a_sites_failures_are_capped_at_its_share_of_64s():
    clock = Clock()
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=3, failed_auth_window_seconds=60), clock=clock)
    label = lambda subnet, site="2001:db8:7": f"{site}:{subnet:x}::/64"  # noqa: E731
    counted = 0
    for subnet in range(1000):
        for _ in range(3):
            try:
                limiter.check(label(subnet))
            except RateLimited:
                break
            limiter.failed(label(subnet))
            counted += 1
    # was 3000 (every /64 a fresh cap); 48 while the /48 alone counted at 16 limits; four /56s of 16 limits now
    assert counted == 3 * IPV6_WIDE_SHARE == 4 * 3 * IPV6_SITE_SHARE
    limiter.check(label(1, "2001:db8:8"))  # another /48: not capped
    limiter.check("192.0.2.1")
    # the /48's waiting line is the one its capped /64s share, the capped /56s' included
    assert limiter._lane_label(label(999)) == "2001:db8:7::/48" == limiter._lane_label(label(1))
    assert limiter._lane_label(label(1, "2001:db8:8")) == label(1, "2001:db8:8")
    clock.now += 61  # the window ends; a site that did not guess past its share starts afresh
    limiter.check(label(999))


def test_a_homes_56_caps_itself_not_its_neighbours_in_the_48():
    """ISPs that hand out /56s put 256 homes in one /48: with the /48 capped at 16 limits, one home's guesser (16 of
    its 256 /64s) capped all its neighbours' too. Now it caps its /56; its /48 takes four /56s' worth."""
    clock = Clock()
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=3, failed_auth_window_seconds=60), clock=clock)
    home = lambda n, subnet: f"2001:db8:7:{n:x}{subnet:02x}::/64"  # noqa: E731  # the subnet-th /64 of the n-th /56
    for subnet in range(IPV6_SITE_SHARE):
        for _ in range(3):
            limiter.failed(home(0, subnet))
    with pytest.raises(RateLimited):
        limiter.check(home(0, 0xff))  # a fresh /64 of the home: its /56 is capped
    assert limiter._lane_label(home(0, 0xff)) == "2001:db8:7::/56"
    limiter.check(home(1, 0))  # a neighbour's home (was refused: the /48 was capped)
    assert limiter._lane_label(home(1, 0)) == home(1, 0)
    for n in (1, 2, 3):  # three more homes guessing as hard: now the /48 is capped too, and its one line is theirs
        for subnet in range(IPV6_SITE_SHARE):
            for _ in range(3):
                limiter.failed(home(n, subnet))
    with pytest.raises(RateLimited):
        limiter.check(home(9, 0))
    assert limiter._lane_label(home(0, 0xff)) == "2001:db8:7::/48" == limiter._lane_label(home(9, 0))


def test_64s_lines_formed_before_their_48_was_capped_go_on_at_the_48s_pace():
    """/64s capped one by one before their /48 was each had a line of their own; once the /48 was capped too, the
    guesses parked in those lines went on being checked one per line every interval (15 lines: 15 an interval, a
    burst of up to 15 x 8 guesses each time the /48 was capped), not the /48's one."""
    clock = Clock()
    limiter = FailedAuthLimiter(AuthConfig(failed_auth_limit=LIMIT, failed_auth_window_seconds=0.1 * LIMIT),
                                clock=clock)  # interval 0.1 (test clock); real waits are at most that long
    label = lambda subnet: f"2001:db8:7:{subnet:x}::/64"  # noqa: E731
    lines = IPV6_SITE_SHARE - 1
    checked: list[str] = []

    async def guess(client: str) -> None:
        with contextlib.suppress(RateLimited):
            async with limiter.past_cap(client):
                limiter.failed(client)
                checked.append(client)

    async def run() -> None:
        for subnet in range(lines):  # each /64 capped, the /48 not yet (its share is LIMIT x 16)
            for _ in range(LIMIT):
                limiter.failed(label(subnet))
        waiting = [asyncio.ensure_future(guess(label(subnet))) for subnet in range(lines) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert len(limiter._lanes) == lines and not checked  # each /64's own line; none's turn yet
        for _ in range(LIMIT):  # another /64 uses up its failures: the /48 is capped now
            limiter.failed(label(lines))
        with pytest.raises(RateLimited):
            limiter.check(label(lines + 1))
        async def after_one_more() -> int:
            # one interval on (test clock): every line's head is due by its own line's pace; once one is checked,
            # the others are given as long again as their waits take (the interval, in real seconds) to follow
            before = len(checked)
            clock.now += 0.1
            for _ in range(200):
                if len(checked) > before:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            return len(checked) - before

        assert await after_one_more() == 1, checked  # the /48's pace: one an interval (was 15, one per /64 line)
        assert await after_one_more() == 1, checked
        await limiter.close()
        await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(run())
