"""Which hub account a token belongs to: its user's name *and* creation time.

A hub user deleted and created again under the same name (a recycled student account) is
another person; keyed by name alone, they inherited the old account's stored responses, stored
chat completions, cached answers and usage. JupyterHub (5+) puts the account's ``created`` time in
its user model, but only for a caller with ``read:users`` on that user: a token with just the
access scope is shown the name and groups. So when the token's own model lacks it, the service
asks ``GET /users/{name}`` with its own token, which then needs ``read:users`` (on every user).

Whether it has that scope is asked of the hub (the service's own ``GET /user``, again each
``max_age``), never guessed from one lookup's answer: keys must not depend on which request got
through. With the scope, every user is keyed by account and a lookup that fails is an error
(503), never a fallback to the name; without it (or with it limited to some users), every user
is keyed by name, as before, and the log says so once. See docs/jupyterhub.md, "Isolation".
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuth
from tornado.web import HTTPError

from ..core.errors import AuthenticationError, Overloaded

log = logging.getLogger("xllm_jupyter.hub")

#: settings key of the AccountTimes cache
ACCOUNT_TIMES_KEY = "xllm_hub_account_times"


def user_key(name: str, created: str | None) -> str:
    """The key a hub user's stored objects and usage go under: ``name/created``, or the bare name when the
    creation time is unknown (hub user names never hold ``/``, so no bare name is ever another's key)."""
    return f"{name}/{created}" if created else name


def canonical_time(created: Any) -> str | None:
    """``created`` as one fixed UTC form (microseconds always shown), so a hub that renders the same time
    differently (``Z`` or ``+00:00``, microseconds dropped when 0) keeps the same key; None when it is no time."""
    if not isinstance(created, str) or not created:
        return None
    try:
        when = dt.datetime.fromisoformat(created[:-1] + "+00:00" if created.endswith("Z") else created)
    except ValueError:
        return created  # not ISO 8601: still this account's own value
    if when.tzinfo is not None:  # JupyterHub's times are UTC; a naive one is taken as UTC too
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AccountTimes:
    """token -> its user's account creation time, for as long as HubAuth trusts the token's model.

    Keyed by token, never by name: a name's next account comes with tokens of its own, so its
    creation time is asked afresh (a name-keyed cache would hand it the old account's for a minute).
    """

    def __init__(self, max_age: float, capacity: int = 10_000) -> None:
        self.max_age, self.capacity = max_age, capacity
        #: the service was told it may not read users, and said so in the log (once per app)
        self.warned_missing_scope = False
        self._times: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        #: (when asked, whether the service's token holds read:users), and the question in flight, if any
        self.reads_users: tuple[float, bool] | None = None
        self.asking: asyncio.Future[bool] | None = None

    def get(self, token: str) -> tuple[bool, str | None]:
        """``(known, created)`` for ``token``; not known once older than ``max_age``."""
        found = self._times.get(token)
        if found is None or time.monotonic() - found[0] > self.max_age:
            self._times.pop(token, None)
            return False, None
        return True, found[1]

    def put(self, token: str, created: str | None) -> None:
        """Remember ``token``'s account time; the oldest entry goes past ``capacity``."""
        self._times[token] = (time.monotonic(), created)
        self._times.move_to_end(token)
        while len(self._times) > self.capacity:
            self._times.popitem(last=False)


async def service_reads_users(auth: HubOAuth, times: AccountTimes, timeout: float) -> bool:
    """Whether the service's own token holds ``read:users`` on every user, as the hub last said.

    Asked once, then again in the background each ``max_age`` while the last answer is still used, so a hub
    that is down or slow for a moment costs no request a 503 (a role changes rarely; the key follows within a
    minute or two). One question at a time: a burst sends one. Until the first answer the request waits for it:
    HTTPError from HubAuth, or TimeoutError past ``timeout``, when the hub cannot answer.
    """
    known = times.reads_users
    if known is not None and time.monotonic() - known[0] <= times.max_age:
        return known[1]
    if times.asking is None:
        times.asking = asyncio.ensure_future(_ask_scopes(auth, times, timeout))
        times.asking.add_done_callback(_seen)
    if known is not None:
        return known[1]
    # shielded: one waiter's timeout (ask_hub) must not cancel the question the others wait on
    return await asyncio.shield(times.asking)


def _seen(question: asyncio.Future[bool]) -> None:
    """A question's failure, retrieved (not asyncio's 'never retrieved') and logged unless HubAuth logged it already:
    in the background the last answer goes on being used, so without this line nothing would say the hub failed."""
    if question.cancelled():
        return
    exc = question.exception()
    if exc is not None and not isinstance(exc, HTTPError):
        log.warning("could not ask the hub for the service's scopes (%s); the last answer, if any, stays in use",
                    type(exc).__name__)


async def _ask_scopes(auth: HubOAuth, times: AccountTimes, timeout: float) -> bool:
    try:  # bounded here, not only by each waiter: HubAuth's client would hold the one question for 5 minutes
        model = await asyncio.wait_for(auth._api_request("GET", f"{auth.api_url}/user"), timeout)
    finally:
        times.asking = None
    scopes = model.get("scopes") if isinstance(model, dict) else None
    # the hub lists the token's scopes expanded (admin:users brings read:users); "read:users!group=x" is limited
    # to some users, and a lookup of anyone else gets 404, which reads as a deleted user: name keys for everyone
    reads = isinstance(scopes, list) and "read:users" in scopes
    times.reads_users = (time.monotonic(), reads)
    if not reads and not times.warned_missing_scope:
        times.warned_missing_scope = True
        log.warning("the service may not read hub users (its role needs the scope read:users, on every user): users "
                    "are told apart by name only, so a user deleted and created again under the same name gets the "
                    "old account's stored responses and usage (docs/jupyterhub.md, 'Isolation')")
    return reads


async def account_created(auth: HubOAuth, name: str, times: AccountTimes) -> str | None:
    """User ``name``'s ``created`` as the hub reports it to the service, which holds ``read:users`` (None: the
    account has no creation time); AuthenticationError when the hub has no such user any more (deleted since its
    token was checked); Overloaded ``hub_unavailable`` when the hub will not tell (never the name alone instead)."""
    url = f"{auth.api_url}/users/{quote(name, safe='')}"
    try:
        model = await auth._api_request("GET", url, allow_403=True)  # HubAuth's client: internal_ssl, its errors
    except HTTPError as exc:
        if exc.status_code == 500 and (exc.log_message or "").startswith("Failed to check authorization"):
            # a 4xx other than 403: the user is gone (the token's own check just succeeded, so the URL is right,
            # and read:users on every user sees any user there is)
            raise AuthenticationError("Invalid or expired JupyterHub token.") from None
        raise
    if not isinstance(model, dict) or "created" not in model:
        # 403 (or a model without the field): the hub no longer lets the service read users, though it said so
        # just before (its role changed?). Falling back to the name would give this user a second key (another
        # quota, none of their stored objects) for as long as it lasts; ask the scopes again on the next request
        times.reads_users = None
        log.warning("the hub refused the service the creation time of user %r though its role had read:users; "
                    "answering 503 until it is settled", name)
        raise Overloaded("JupyterHub could not be asked which account this token belongs to; retry later.",
                         code="hub_unavailable")
    return canonical_time(model["created"])


def model_created(model: Any) -> tuple[bool, str | None]:
    """``(present, created)`` of a token's user model: present when the token could read its own account."""
    if not isinstance(model, dict) or "created" not in model:
        return False, None
    return True, canonical_time(model["created"])
