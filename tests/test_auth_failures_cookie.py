"""A client that proved its key skips the failed-auth line on its later connections too (vouch_cookie.py).

Past the cap, a guesser behind the same NAT that keeps the address's line full turned away the first request of
every fresh connection with 429, a right key's included, even a client served a moment before: the openai SDK's
pool opens fresh connections whenever the last one went idle or closed. Its client now sends back the cookie it
was given with its first answer, signed for its key, and skips the line; a guess with that cookie does not.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import openai
import pytest

from tests.helpers import Clock
from tests.server_fixtures import TINY
from tests.test_auth_failures_verified import KEY, LIMIT, _fill_the_line, capped_server
from xllm_jupyter.server.vouch_cookie import COOKIE_NAME, VouchCookies


@pytest.fixture(scope="module")
def server(xllm_home, tiny_catalog) -> Iterator[Any]:
    with capped_server(xllm_home, tiny_catalog) as info:
        yield info


def _sdk(server: Any, source: str, key: str, cookies: Any = None) -> openai.OpenAI:
    """The openai SDK from ``source``, a fresh connection for every request (no keep-alive)."""
    transport = httpx.HTTPTransport(local_address=source, limits=httpx.Limits(max_keepalive_connections=0))
    http = httpx.Client(transport=transport, timeout=60, cookies=cookies)
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, http_client=http)


def test_a_client_served_before_is_served_on_fresh_connections_while_the_line_is_full(server):
    source = "127.0.0.31"  # alice and the guesser share it (one NAT)
    with _sdk(server, source, KEY) as alice:
        assert TINY in [m.id for m in alice.models.list().data]  # before the guessing starts
        with httpx.Client(base_url=server.root, timeout=60,
                          transport=httpx.HTTPTransport(local_address=source)) as guesser:
            for i in range(LIMIT):
                assert guesser.get("/v1/models", headers={"Authorization": f"Bearer sk-guess-{i}"}).status_code == 401
        parked = _fill_the_line(server.root, source)
        try:
            for _ in range(3):  # each on a fresh connection: was 429 (the line full) until the window ended
                assert TINY in [m.id for m in alice.models.list().data]
            r = alice.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            assert r.choices
            stolen = alice._client.cookies  # the guesser with alice's cookie: his guesses still take the line
            with _sdk(server, source, "sk-guess-with-cookie", cookies=stolen) as thief:
                with pytest.raises(openai.RateLimitError):
                    thief.models.list()
            with _sdk(server, source, KEY) as fresh:  # the right key from a client never served: its turn, as a guess
                with pytest.raises(openai.RateLimitError):
                    fresh.models.list()
        finally:
            for s in parked:
                s.close()


def test_the_cookie_is_set_once_and_says_nothing_of_the_key(server):
    with httpx.Client(base_url=server.root, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
        first = c.get("/v1/models")
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE_NAME}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert "set-cookie" not in c.get("/v1/models").headers  # sent back: not set again
    r = httpx.get(server.base_url + "/models", headers={"Authorization": "Bearer sk-wrong"})
    assert r.status_code == 401 and "set-cookie" not in r.headers


def test_a_cookie_vouches_for_its_own_key_until_it_expires():
    clock = Clock()
    cookies = VouchCookies(clock=clock, lifetime=100)
    other = VouchCookies(clock=clock, lifetime=100)  # another process (or a restart): another secret
    value = cookies.value(b"key-digest")
    assert cookies.valid(value, b"key-digest")
    assert not cookies.valid(value, b"other-digest") and not other.valid(value, b"key-digest")
    expires, _, mac = value.partition(".")
    assert not cookies.valid(f"{int(expires) + 1000}.{mac}", b"key-digest")  # a later expiry is not signed
    for junk in (None, "", "x", "1.2.3", f"{expires}.", f"abc.{mac}"):
        assert not cookies.valid(junk, b"key-digest")
    clock.now += 101
    assert not cookies.valid(value, b"key-digest")
