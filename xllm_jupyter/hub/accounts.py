"""Which hub account a token belongs to: its user's name *and* creation time.

A hub user deleted and created again under the same name (a recycled student account) is
another person; keyed by name alone, they inherited the old account's stored responses, stored
chat completions, cached answers and usage. JupyterHub (5+) puts the account's ``created`` time in
its user model, but only for a caller with ``read:users`` on that user: a token with just the
access scope is shown the name and groups. So when the token's own model lacks it, the service
asks ``GET /users/{name}`` with its own token, which then needs ``read:users``; without that scope
the service warns once and keys users by name, as before. See docs/jupyterhub.md, "Isolation".
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from jupyterhub.services.auth import HubOAuth
from tornado.web import HTTPError

from ..core.errors import AuthenticationError

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


async def account_created(auth: HubOAuth, name: str, times: AccountTimes) -> str | None:
    """User ``name``'s ``created`` as the hub reports it to the service (None: unknown, or the service may not
    read users); AuthenticationError when the hub has no such user any more (deleted since its token was checked)."""
    url = f"{auth.api_url}/users/{quote(name, safe='')}"
    try:
        model = await auth._api_request("GET", url, allow_403=True)  # HubAuth's client: internal_ssl, its errors
    except HTTPError as exc:
        if exc.status_code == 500 and (exc.log_message or "").startswith("Failed to check authorization"):
            # a 4xx other than 403: the user is gone (the token's own check just succeeded, so the URL is right)
            raise AuthenticationError("Invalid or expired JupyterHub token.") from None
        raise
    if model is None:  # 403: the service's role lacks read:users
        if not times.warned_missing_scope:
            times.warned_missing_scope = True
            log.warning("the service may not read hub users (its role needs the scope read:users): users are told "
                        "apart by name only, so a user deleted and created again under the same name gets the old "
                        "account's stored responses and usage (docs/jupyterhub.md, 'Isolation')")
        return None
    return canonical_time(model.get("created") if isinstance(model, dict) else None)


def model_created(model: Any) -> tuple[bool, str | None]:
    """``(present, created)`` of a token's user model: present when the token could read its own account."""
    if not isinstance(model, dict) or "created" not in model:
        return False, None
    return True, canonical_time(model["created"])
