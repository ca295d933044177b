"""Hub tokens the hub has confirmed: past the failed-auth cap they are still checked at once.

The cap counts failures per client address, and the hub service trusts its loopback proxy's
``X-Forwarded-For``: on a one-host hub any user's kernel reaches the service from loopback too, so it
can name another user's address and spend that address's failures (and users behind one NAT share
one). Past the cap a token the hub confirmed before is asked about at once; any other token waits its
turn (``FailedAuthLimiter.past_cap``: one at a time, no faster than the cap's own rate), so a user whose
token the service has not seen yet is served after the guesses ahead. A guess that matches a confirmed token
is answered at once too: for those the cap adds no rate bound, the tokens' randomness does (JupyterHub's carry
122 random bits; docs/jupyterhub.md). Unlike ``xllm serve``'s keys, which a person may pick: there only the
key a connection already proved skips the line (``FailedAuthLimiter.vouched``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from ..core.errors import RateLimited
from ..server.auth_failures import FailedAuthLimiter, connection_gone

#: the settings key holding the hub app's KnownTokens
KNOWN_TOKENS_KEY = "xllm_known_tokens"


class KnownTokens:
    """A bounded set of the digests of tokens the hub confirmed (the longest unused forgotten first)."""

    def __init__(self, max_entries: int = 10000):
        self.max_entries = max(1, max_entries)
        self._digests: OrderedDict[bytes, None] = OrderedDict()

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def add(self, token: str) -> None:
        """Remember that the hub confirmed ``token``."""
        digest = self._digest(token)
        self._digests[digest] = None
        self._digests.move_to_end(digest)
        while len(self._digests) > self.max_entries:
            self._digests.popitem(last=False)

    def discard(self, token: str) -> None:
        """Forget ``token`` (the hub no longer knows it)."""
        self._digests.pop(self._digest(token), None)

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self._digest(token) in self._digests

    def __len__(self) -> int:
        return len(self._digests)


async def ask_under_cap(failures: FailedAuthLimiter, client: str | None, request: Any,
                        ask: Callable[[], Awaitable[Any]], *, confirmed: bool = False) -> Any:
    """The hub's answer about a request's token (``ask()``: a user model, or None for a token it does not know),
    under the failed-auth cap; a None counts as a failure of ``client``.

    Under the cap the hub is asked at once, with no more questions under way than ``client`` has failures left
    (``asking``). Past it a token the hub ``confirmed`` before is asked about at once (uncounted: a revoked one
    is forgotten by the caller, and a guess next time), any other waits its turn (``past_cap``; RateLimited
    when the line is full or its client left). The API routes and the service page both ask this way.
    """
    try:
        failures.check(client)  # an address guessing tokens gets its turn, and the hub is not asked sooner
        async with failures.asking(client):  # concurrent guesses are asked about no faster than they are counted
            model = await ask()
            if not model:
                failures.failed(client)
            return model
    except RateLimited:
        # the address is capped, maybe by someone else behind it or naming it through the trusted proxy (any
        # kernel on a one-host hub can)
        if confirmed:
            return await ask()
        async with failures.past_cap(client, gone=lambda: connection_gone(request)):
            model = await ask()
            if not model:
                failures.failed(client)
            return model


__all__ = ["KNOWN_TOKENS_KEY", "KnownTokens", "ask_under_cap"]
