"""A cookie by which a client that proved its key skips the failed-auth line on its later connections too.

Past the failed-auth cap an address's keys wait their turn in one line (auth_failures.py), and a guesser at the
same address (a NAT) that keeps the line full turns away every fresh connection's first request, a right key's
too; only a connection that already proved its key skipped the line (``FailedAuthLimiter.vouched``). HTTP clients
open fresh connections all the time (the openai SDK's pool drops idle ones after 5 s, the server after its
keep-alive), so a client served a moment before was refused again on its next connection.

The cookie says "this client proved this key": the key's digest signed with a secret only this process holds,
and an expiry. It is no credential (the key is still checked on every request) and tells nothing of the key (no
digest an outsider could test guesses against offline, the secret being unknown). Checking it is no guessing
oracle: a request skips the line only when it carries the cookie made for the very key it presents, which only a
client that got that key past a counted check was given; a guesser's keys with anyone's cookie take the line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from typing import Any, Callable

from tornado.httputil import parse_cookie

#: the cookie's name (the openai SDK's httpx client keeps it and sends it back, as browsers and most clients do)
COOKIE_NAME = "xllm_vouch"
#: how long a cookie vouches (seconds): a day's worth of reconnections, not a standing pass
COOKIE_LIFETIME = 24 * 3600


class VouchCookies:
    """Makes and checks the cookies that vouch for a proved key (a secret of this process's own)."""

    def __init__(self, clock: Callable[[], float] = time.time, lifetime: float = COOKIE_LIFETIME):
        self._secret = os.urandom(32)  # a restart forgets every cookie, which then costs a turn in the line once
        self._clock = clock
        self.lifetime = lifetime

    def _mac(self, expires: int, digest: bytes) -> str:
        return hmac.new(self._secret, str(expires).encode() + b"." + digest, hashlib.sha256).hexdigest()[:40]

    def value(self, digest: bytes) -> str:
        """A fresh cookie value for the credential whose digest is ``digest``."""
        expires = int(self._clock() + self.lifetime)
        return f"{expires}.{self._mac(expires, digest)}"

    def valid(self, value: str | None, digest: bytes) -> bool:
        """True when ``value`` is an unexpired cookie this process made for ``digest``'s credential."""
        if not value or value.count(".") != 1:
            return False
        expires, _, mac = value.partition(".")
        if not expires.isdigit() or int(expires) < self._clock():
            return False
        return hmac.compare_digest(mac, self._mac(int(expires), digest))

    def header(self, digest: bytes) -> str:
        """A ``Set-Cookie`` value handing the client a cookie for ``digest``'s credential."""
        return (f"{COOKIE_NAME}={self.value(digest)}; Max-Age={int(self.lifetime)}; Path=/; HttpOnly; "
                "SameSite=Strict")


def cookie_of(request: Any) -> str | None:
    """The vouching cookie ``request`` (a Tornado HTTPServerRequest) carries, if any."""
    header = request.headers.get("Cookie")
    return parse_cookie(header).get(COOKIE_NAME) if header else None


__all__ = ["COOKIE_LIFETIME", "COOKIE_NAME", "VouchCookies", "cookie_of"]
