"""API-key authentication for the standalone server.

Keys are kept only as SHA-256 digests and compared with ``hmac.compare_digest``
against every configured digest, so neither the key nor its position leaks through
timing. With no key configured the server is loopback-only (see ``standalone.py``),
and requests must carry a loopback ``Host`` so a web page cannot reach it through DNS
rebinding.

Keys have roles: ``server.api_keys`` are user keys, ``auth.admin_keys`` admin keys;
once admin keys exist only they may call ``/admin/*`` (403 ``permission_error``
otherwise); with no admin key configured user keys keep admin rights. In keyless
loopback mode the local caller may do everything, so there a browser request from another
site that could change anything (not GET/HEAD) is refused (``cross_site``): a web page the
local user visits must not drive the server with ``text/plain`` "simple" POSTs.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from tornado.web import RequestHandler

from ..core.errors import AuthenticationError, PermissionDenied, RateLimited
from ..core.hosts import host_name, is_loopback
from .auth_failures import FAILURES_KEY, FailedAuthLimiter, connection_gone
from .edge import POLICY_KEY
from .handlers import VerbDispatchMixin, admin_required, generates
from .limits import LIMITS_KEY, Limiter

#: the settings key holding the ApiKeyAuth
AUTH_KEY = "xllm_auth"

#: roles a key can have; "admin" can call every route, "user" everything but ``/admin/*``
USER, ADMIN = "user", "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and a key id safe to log (a digest prefix, never the key)."""

    role: str
    key_id: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def key_id(key: str) -> str:
    """A stable, non-secret label for a key (for limits, logs and metrics)."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class ApiKeyAuth:
    """Checks ``Authorization: Bearer <key>`` against hashed user and admin keys."""

    def __init__(self, keys: Iterable[str] = (), admin_keys: Iterable[str] = ()):
        # stripped, as ``identify`` strips the key a request sends: a configured " k\n" matched no request, and a
        # blank one counted as a key (every interface served) that none could send; blank ones are no key
        keys, admin_keys = [k.strip() for k in keys], [k.strip() for k in admin_keys]
        admin = tuple(_digest(k) for k in admin_keys if k)
        # Until admin keys are configured, user keys keep admin rights (as before roles
        # existed), else nobody could reach /admin/*. A key listed in both is an admin key.
        user_role = USER if admin else ADMIN
        self._entries = tuple((d, ADMIN) for d in admin) + tuple((_digest(k), user_role) for k in keys if k and _digest(k) not in admin)

    @property
    def enabled(self) -> bool:
        """True when at least one key (user or admin) is configured."""
        return bool(self._entries)

    def identify(self, authorization: str | None) -> Principal | None:
        """The caller the header names, or None when it carries no configured key."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        digest = _digest(key)
        role = None
        for ref, ref_role in self._entries:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, ref):
                role = role or ref_role
        return Principal(role, key_id(key)) if role else None

    def check(self, authorization: str | None) -> bool:
        """True when the header carries a configured key (always True when auth is off)."""
        return not self._entries or self.identify(authorization) is not None


def cross_site(request: Any, trusted: Callable[[str], bool]) -> bool:
    """True for a browser request that another site sent (``trusted(origin)`` exempts an origin).

    Browsers say where a request comes from in ``Sec-Fetch-Site``; older ones only in ``Origin``,
    compared with ``Host`` here. A request with neither is not from a browser page.
    """
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site in ("same-origin", "none"):
        return False
    if site is None:
        if origin is None or urlsplit(origin).netloc.lower() == (request.headers.get("Host") or "").lower():
            return False
    return not (origin and trusted(origin))


class ApiKeyHandler(VerbDispatchMixin, RequestHandler):
    """Auth base for the standalone server: API key, or loopback-only when none is set."""

    auth_required = True
    #: set on the handlers of ``/admin/*`` routes by ``routes.build_routes``
    admin_only = False
    #: the admitted caller's key id while its request holds a concurrency slot
    xllm_key_id: str | None = None
    #: whether that key has the admin role
    xllm_admin = False
    #: the caller is the one anonymous caller of a keyless server (its key id ``anonymous`` is no user's name)
    xllm_keyless = False
    _limited = False

    async def prepare(self) -> None:
        """Authenticate, authorize and admit (rate limits) before the body is read."""
        auth: ApiKeyAuth = self.settings[AUTH_KEY]
        if not auth.enabled:
            if not is_loopback(host_name(self.request.host or "")):
                raise PermissionDenied("Without an API key this server only answers requests addressed to localhost.")
            # our own check, not Tornado's cross_origin_protection (Tornado >= 6.6 only): where it is
            # missing, any web page could POST text/plain JSON here (pull, load, generate)
            policy = self.settings.get(POLICY_KEY)
            if self.request.method not in ("GET", "HEAD", "OPTIONS") and cross_site(
                    self.request, policy.origin_allowed if policy is not None else lambda _: False):
                raise PermissionDenied("Without an API key this server refuses requests from other sites' web pages "
                                       "(add the page's origin to http.cors_origins to allow it).")
            # keyless loopback mode: the local user may do everything, as one anonymous caller
            principal = Principal(ADMIN, "anonymous")
            self.xllm_keyless = True
        elif not self.auth_required:
            return
        else:
            found = await self.key_principal()
            if found is None:
                raise AuthenticationError("Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.")
            principal = found
        if admin_required(self) and principal.role != ADMIN:
            raise PermissionDenied("This API key may not call admin endpoints; use an admin key (auth.admin_keys).")
        if not self.auth_required:
            return
        self.xllm_key_id, self.xllm_admin = principal.key_id, principal.role == ADMIN
        limiter: Limiter | None = self.settings.get(LIMITS_KEY)
        if limiter is not None and limiter.enabled:
            # the token budget gates generation only (as the per-user quotas do: handlers.dispatch)
            limiter.admit(principal.key_id, generates=generates(getattr(self, "route", ""), self.request.method or ""))
            self._limited = True

    async def key_principal(self, wait: bool = True) -> Principal | None:
        """The caller the request's key names; None for a missing or wrong key (a wrong one counts towards the
        failed-auth cap). From a capped address the key waits its turn (``FailedAuthLimiter.past_cap``), or with
        ``wait`` False is not looked at: RateLimited; unless it is the key this connection already proved
        (``FailedAuthLimiter.vouched``)."""
        failures: FailedAuthLimiter | None = self.settings.get(FAILURES_KEY)
        if failures is None:
            return self._identify(None, None)
        client = failures.client(self.request)
        if failures.vouched(self.request, self.request.headers.get("Authorization")):
            # the key this connection already proved: no turn to wait for, no full line to be refused by (a guesser
            # at the same address cannot send on this connection, and gains no check: FailedAuthLimiter.vouched)
            return self._identify(failures, client)
        try:
            failures.check(client)
        except RateLimited:
            if not wait or not self.request.headers.get("Authorization"):
                raise
            # the address is no proof of who calls (a NAT, a name a trusted proxy's clients can give): a right
            # key from it gets in after the guesses ahead of it, which pass no faster than the cap's rate
            async with failures.past_cap(client, gone=lambda: connection_gone(self.request)):
                return self._identify(failures, client)
        return self._identify(failures, client)

    def _identify(self, failures: FailedAuthLimiter | None, client: str | None) -> Principal | None:
        header = self.request.headers.get("Authorization")
        found = self.settings[AUTH_KEY].identify(header)
        if failures is not None and header:
            if found is None:  # a wrong key, not a client that sent none
                failures.failed(client)
            else:
                # its next requests on this connection wait no turn, nor do its next connections' (the cookie)
                cookie = failures.vouch(self.request, header)
                if cookie is not None:
                    self.add_header("Set-Cookie", cookie)
        return found

    def _release(self) -> None:
        if self._limited:
            self._limited = False
            self.settings[LIMITS_KEY].release(self.xllm_key_id)

    def on_finish(self) -> None:
        """Give the key's concurrency slot back."""
        self._release()
        super().on_finish()

    def on_connection_close(self) -> None:
        """The client left: its slot is free even if the generation takes a step to unwind."""
        self._release()
        super().on_connection_close()


class PublicApiKeyHandler(ApiKeyHandler):
    """The same base without the key check (only ``/health`` uses it)."""

    auth_required = False

    async def caller_known(self) -> bool:
        """True when the request carries a key (or the server is keyless: every caller is the local user).

        A wrong key counts towards the failed-auth cap as on every other route, and a capped address's key
        is not even looked at, so this route is no uncapped way to test keys.
        """
        if not self.settings[AUTH_KEY].enabled:
            return True
        if not self.request.headers.get("Authorization"):
            return False
        try:
            return await self.key_principal(wait=False) is not None
        except RateLimited:
            return False
