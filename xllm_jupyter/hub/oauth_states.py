"""The pending OAuth logins of the service's page, bounded in number.

Every visit to the page that is not logged in starts a login: ``HubOAuth`` remembers its state (the page to
return to, the PKCE verifier) for ``oauth_state_max_age`` (10 minutes), in memory and without a bound, before
anyone has been authenticated. A client sending such visits as fast as it could grew the service by their
number (and their URLs' length, kept as the page to return to) for those 10 minutes. Past ``MAX_PENDING`` the
oldest pending login is forgotten: its browser's callback then fails and the user logs in again, which beats
the service running out of memory.
"""

from __future__ import annotations

from typing import Any

from jupyterhub.services.auth import _ExpiringDict  # the type HubOAuth._oauth_states must have

#: the most logins remembered at once (each a few hundred bytes)
MAX_PENDING = 10000


class BoundedStates(_ExpiringDict):
    """An expiring dict that forgets its oldest entries past ``max_entries``."""

    def __init__(self, max_age: float, max_entries: int = MAX_PENDING):
        super().__init__(max_age=max_age)
        self.max_entries = max(1, max_entries)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        while len(self.values) > self.max_entries:
            del self[next(iter(self.values))]  # dicts keep insertion order: the oldest first


__all__ = ["MAX_PENDING", "BoundedStates"]
