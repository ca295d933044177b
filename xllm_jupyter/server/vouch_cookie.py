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
import re
import time
from typing import Any, Callable

#: the cookie's name (the openai SDK's httpx client keeps it and sends it back, as browsers and most clients do)
COOKIE_NAME = "xllm_vouch"
#: how long a cookie vouches (seconds): a day's worth of reconnections, not a standing pass
COOKIE_LIFETIME = 24 * 3600
#: values of the cookie looked at in one request: a page of a sibling domain can add its own ``xllm_vouch`` next to
#: ours (browsers send both), so more than one is tried; a few, since each costs an HMAC
MAX_VALUES = 4
#: a value as ``VouchCookies.value`` writes it (ASCII digits and hex only: ``int`` and ``compare_digest`` raised on
#: others, a 500 before the key was looked at)
_VALUE = re.compile(r"[0-9]{1,12}\.[0-9a-f]{40}")
_NAME_IS = COOKIE_NAME + "="
_LONGEST = 12 + 1 + 40  # the longest value ``_VALUE`` takes


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
        if not value or not _VALUE.fullmatch(value):
            return False
        expires, _, mac = value.partition(".")
        if int(expires) < self._clock():
            return False
        return hmac.compare_digest(mac, self._mac(int(expires), digest))

    def vouches(self, request: Any, digest: bytes) -> bool:
        """True when ``request`` (a Tornado HTTPServerRequest) carries a valid cookie for ``digest``'s credential."""
        return any(self.valid(value, digest) for value in cookie_values(request))

    def header(self, digest: bytes) -> str:
        """A ``Set-Cookie`` value handing the client a cookie for ``digest``'s credential."""
        return (f"{COOKIE_NAME}={self.value(digest)}; Max-Age={int(self.lifetime)}; Path=/; HttpOnly; "
                "SameSite=Strict")


def cookie_values(request: Any) -> list[str]:
    """The values of the vouching cookie ``request`` (a Tornado HTTPServerRequest) carries, at most ``MAX_VALUES``.

    Looked for with ``str.find`` and a bounded number of steps, not a parse of the whole header: tornado's
    ``parse_cookie`` (or a regular expression) took 2-10 ms of the IOLoop on a hostile 64 KiB header, for each
    request, a capped address's refused ones too.
    """
    values: list[str] = []
    finds = 4 * MAX_VALUES  # the name inside other cookies' names or values is skipped, a few times only
    headers = request.headers  # a plain mapping (one Cookie header) will do too
    for header in headers.get_list("Cookie") if hasattr(headers, "get_list") else [headers.get("Cookie") or ""]:
        start = 0
        while len(values) < MAX_VALUES and finds > 0 and (at := header.find(_NAME_IS, start)) >= 0:
            finds -= 1
            start = at + len(_NAME_IS)
            before = header[max(0, at - 8):at].rstrip(" \t")  # "; " between cookies (a few blanks at most)
            if before.endswith(";") or (not before and at <= 8):
                end = header.find(";", start, start + _LONGEST + 8)
                values.append(header[start:end if end >= 0 else start + _LONGEST + 8].strip(" \t"))
    return values


__all__ = ["COOKIE_LIFETIME", "COOKIE_NAME", "MAX_VALUES", "VouchCookies", "cookie_values"]
