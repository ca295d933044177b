"""API-key authentication for the standalone server.

Keys are kept only as SHA-256 digests and compared with ``hmac.compare_digest``
against every configured digest, so neither the key nor its position leaks through
timing. With no key configured the server is loopback-only (see ``standalone.py``),
and requests must carry a loopback ``Host`` so a web page cannot reach it through DNS
rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any, Iterable

from tornado.web import RequestHandler

from ..core.errors import AuthenticationError, PermissionDenied

#: the settings key holding the ApiKeyAuth
AUTH_KEY = "xllm_auth"

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (``127.0.0.0/8``, ``::1``)."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8900`` -> ``::1``)."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class ApiKeyAuth:
    """Checks ``Authorization: Bearer <key>`` against hashed keys."""

    def __init__(self, keys: Iterable[str] = ()):
        self._digests = tuple(hashlib.sha256(k.encode("utf-8")).digest() for k in keys if k)

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True when the header carries a configured key (always True when auth is off)."""
        if not self._digests:
            return True
        if not authorization:
            return False
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        digest = hashlib.sha256(key.strip().encode("utf-8")).digest()
        ok = False
        for ref in self._digests:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(digest, ref)
        return ok


class ApiKeyHandler(RequestHandler):
    """Auth base for the standalone server: API key, or loopback-only when none is set."""

    auth_required = True

    async def prepare(self) -> None:
        """Authenticate before the body is read."""
        auth: ApiKeyAuth = self.settings[AUTH_KEY]
        if not auth.enabled:
            if not is_loopback(_host_name(self.request.host or "")):
                raise PermissionDenied("Without an API key this server only answers requests addressed to localhost.")
            return
        if self.auth_required and not auth.check(self.request.headers.get("Authorization")):
            raise AuthenticationError("Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.")

    async def get(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("get", *args, **kwargs)  # type: ignore[attr-defined]

    async def post(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("post", *args, **kwargs)  # type: ignore[attr-defined]

    async def delete(self, *args: Any, **kwargs: Any) -> None:
        """Dispatch to the route mixin."""
        await self.dispatch("delete", *args, **kwargs)  # type: ignore[attr-defined]


class PublicApiKeyHandler(ApiKeyHandler):
    """The same base without the key check (only ``/health`` uses it)."""

    auth_required = False
