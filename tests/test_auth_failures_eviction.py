"""The failed-auth table is bounded; a guesser spraying fresh addresses must not push out the entries that cap him.

The table forgot the entry whose last failure was oldest. A guesser spread over many addresses (the /48s of a
/32, or a botnet) sent one failure from each fresh one until the table had turned over: the capped entries that
throttled him (his own, his /56's, his /48's) were forgotten, and he started afresh there. Now an entry that is not
capped goes first: one-off failures (his fresh addresses', typos) cost little each, less than a limit.
"""

from __future__ import annotations

import pytest

from tests.helpers import Clock
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.core.errors import RateLimited
from xllm_jupyter.server.auth_failures import IPV6_SITE_SHARE, FailedAuthLimiter

LIMIT = 3


def _limiter(clock: Clock, max_clients: int = 50) -> FailedAuthLimiter:
    return FailedAuthLimiter(AuthConfig(failed_auth_limit=LIMIT, failed_auth_window_seconds=60.0,
                                        failed_auth_max_clients=max_clients), clock)


def test_a_spray_of_fresh_addresses_leaves_a_capped_address_capped():
    clock = Clock()
    lim = _limiter(clock)
    for _ in range(LIMIT):
        lim.failed("192.0.2.9")
    with pytest.raises(RateLimited):
        lim.check("192.0.2.9")
    for i in range(5000):  # one failure from each of 5000 fresh addresses, 100 times the table's room
        lim.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        clock.now += 0.001
    assert len(lim) == 50
    with pytest.raises(RateLimited):  # still capped (it was forgotten after 50 of them: a fresh limit)
        lim.check("192.0.2.9")
    lim.check("10.0.0.0")  # the sprayed ones are what went
    with pytest.raises(RateLimited):
        lim.failed("10.0.19.135")  # the latest one is remembered: its second and third failures cap it
        lim.failed("10.0.19.135")
        lim.check("10.0.19.135")


def test_a_guesser_spread_over_a_32_cannot_flush_his_capped_56():
    """His capped /56 (and its /64s) stay while he sprays single failures from fresh /48s of his /32."""
    clock = Clock()
    lim = _limiter(clock, max_clients=200)
    home = lambda subnet: f"2001:db8:7:{subnet:x}::/64"  # noqa: E731  # /64s of one /56
    for subnet in range(IPV6_SITE_SHARE):
        for _ in range(LIMIT):
            lim.failed(home(subnet))
    with pytest.raises(RateLimited):
        lim.check(home(0xff))
    for site in range(1, 3000):  # one failure each from 2999 other /48s of 2001:db8::/32 (3 entries each)
        lim.failed(f"2001:db8:{site + 7:x}:1::/64")
        clock.now += 0.001
    assert len(lim) == 200
    with pytest.raises(RateLimited):  # the /56 still caps a fresh /64 of it (was forgotten: 48 guesses afresh)
        lim.check(home(0xff))
    with pytest.raises(RateLimited):
        lim.check(home(3))


def test_with_every_entry_capped_the_oldest_goes():
    clock = Clock()
    lim = _limiter(clock, max_clients=10)
    for i in range(11):
        for _ in range(LIMIT):
            lim.failed(f"192.0.2.{i}")
        clock.now += 1
    assert len(lim) == 10
    lim.check("192.0.2.0")  # forgotten: the table stays bounded
    for i in range(1, 11):
        with pytest.raises(RateLimited):
            lim.check(f"192.0.2.{i}")


def test_two_fresh_addresses_taking_turns_in_a_full_table_are_capped():
    """In a table of capped entries, forgetting what is not capped first would forget each one's first failure at
    the other's: never capped. A quarter of the table is kept for them."""
    clock = Clock()
    lim = _limiter(clock, max_clients=20)
    for i in range(20):
        for _ in range(LIMIT):
            lim.failed(f"192.0.2.{i}")
    for _ in range(LIMIT):
        lim.failed("198.51.100.1")
        lim.failed("198.51.100.2")
    for guesser in ("198.51.100.1", "198.51.100.2"):
        with pytest.raises(RateLimited):
            lim.check(guesser)
