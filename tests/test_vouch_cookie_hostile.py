"""A hostile or stray ``xllm_vouch`` cookie is no cookie (vouch_cookie.py), never a 500, and does not hide ours.

The cookie is read before the key is looked at, on every request that carries one. Its expiry went through
``str.isdigit`` and ``int`` (superscript digits pass the one and fail the other; 5,000 digits pass it and exceed
``int``'s limit) and its MAC through ``hmac.compare_digest`` (which refuses non-ASCII text): each was a 500 with a
traceback, for a right key too. Cookies are per host, not per port, so any page of the host (or of a sibling domain)
can plant such a cookie in a browser. And a second cookie of the name (a sibling domain's, sent along with ours) hid
ours: only the last one of a name was looked at.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest

from tests.test_auth_failures_verified import KEY, LIMIT, _fill_the_line, capped_server
from xllm_jupyter.server.vouch_cookie import COOKIE_NAME, VouchCookies

HOSTILE = (
    b'"1999999999.\\351"',  # an octal escape, which a cookie parser turns into a non-ASCII character
    b"\xb2.abc",  # a superscript two: str.isdigit says yes, int says no
    b"9" * 5000 + b".abc",  # past int's 4,300 digits
    b"1999999999." + b"\xe9" * 40,  # a non-ASCII MAC: compare_digest refuses to compare it
)


@pytest.fixture(scope="module")
def server(xllm_home, tiny_catalog) -> Iterator[Any]:
    with capped_server(xllm_home, tiny_catalog) as info:
        yield info


def test_a_hostile_cookie_value_is_no_cookie_not_a_500(server):
    transport = httpx.HTTPTransport(local_address="127.0.0.52")
    with httpx.Client(base_url=server.root, timeout=60, transport=transport) as c:
        for value in HOSTILE:
            cookie = b"a=b; " + COOKIE_NAME.encode() + b"=" + value
            r = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", "Cookie": cookie})
            assert r.status_code == 200, (value[:20], r.status_code, r.text[:200])
            assert r.headers["set-cookie"].startswith(f"{COOKIE_NAME}=")  # a real one, in place of the junk
            r = c.get("/v1/models", headers={"Authorization": "Bearer sk-wrong", "Cookie": cookie})
            assert r.status_code == 401, (value[:20], r.status_code, r.text[:200])
            r = c.get("/health", headers={"Authorization": f"Bearer {KEY}", "Cookie": cookie})
            assert r.status_code == 200, (value[:20], r.status_code, r.text[:200])


def test_hostile_values_are_refused_without_raising():
    cookies = VouchCookies()
    for value in HOSTILE:
        assert not cookies.valid(value.decode("latin-1"), b"digest")


def test_a_second_cookie_of_the_name_does_not_hide_ours(server):
    source = "127.0.0.51"  # alice and the guesser share it (one NAT)
    with httpx.Client(base_url=server.root, timeout=60, transport=httpx.HTTPTransport(local_address=source)) as c:
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})  # before the guessing starts
        ours = r.headers["set-cookie"].split(";")[0]
        for i in range(LIMIT):
            assert c.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{i}"}).status_code == 401
    stray = f"{COOKIE_NAME}=1.{'0' * 40}"  # another domain's cookie of the name, sent along with ours
    parked = _fill_the_line(server.root, source)
    try:
        for cookie in (f"{ours}; {stray}", f"{stray}; {ours}"):
            transport = httpx.HTTPTransport(local_address=source, limits=httpx.Limits(max_keepalive_connections=0))
            with httpx.Client(base_url=server.root, timeout=60, transport=transport) as fresh:  # a fresh connection
                r = fresh.get("/v1/models", headers={"Authorization": f"Bearer {KEY}", "Cookie": cookie})
                assert r.status_code == 200, (cookie, r.status_code, r.text[:200])  # was 429: the line is full
                # a guess with the same cookies still takes the line (here: full)
                r = fresh.get("/v1/models", headers={"Authorization": "Bearer sk-guess-x", "Cookie": cookie})
                assert r.status_code == 429, (cookie, r.status_code, r.text[:200])
    finally:
        for s in parked:
            s.close()
