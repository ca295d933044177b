"""Start, show and stop the playground: ports, proxy root paths, secret URLs, inline display."""

from __future__ import annotations

import errno
import html
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..client import XllmClient, resolve_base_url
from ..client.base import can_chat
from ..core.errors import InvalidRequest, XllmError
from ..core.hosts import unspecified_address
from ..notebook.clients import endpoint_of, entry_defaults, unknown_models
from ..notebook.streams import check_params
from .app import CHAT_API_NAME, Endpoint, build_app, shown_settings
from .guard import Guard, new_secret
from .webserver import WebServer, bind, close_tunnel, guarded_app, open_share_tunnel

#: Gradio's customary port range; a fixed range keeps proxy URLs predictable
PORT_RANGE = range(7860, 7960)
DEFAULT_HOST = "127.0.0.1"


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """True when nothing listens on ``host:port`` (a server could bind it now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As a web server binds: connections of a closed app lingering in TIME_WAIT don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(host: str = DEFAULT_HOST, candidates: range = PORT_RANGE) -> int:
    """The first free port in ``candidates`` (chosen before launch so the proxy path is known)."""
    for port in candidates:
        if port_is_free(port, host):
            return port
    raise XllmError(
        f"no free port in {candidates.start}-{candidates.stop - 1} for the playground: pass port="
    )


def detect_root_path(port: int, env: Mapping[str, str] | None = None) -> str | None:
    """The public path prefix the playground is served under, or None when served directly.

    ``XLLM_PLAYGROUND_ROOT_PATH`` wins (``{port}`` is replaced); else inside JupyterHub
    (``JUPYTERHUB_SERVICE_PREFIX`` set, e.g. ``/user/alice/``) the app is reached through
    jupyter-server-proxy at ``{prefix}proxy/{port}``, which strips that prefix before
    forwarding, so Gradio must be told it to build its own URLs.
    """
    env = os.environ if env is None else env
    template = env.get("XLLM_PLAYGROUND_ROOT_PATH", "").strip()
    if template:
        return normalize_root_path(template.replace("{port}", str(port)))
    prefix = env.get("JUPYTERHUB_SERVICE_PREFIX", "").strip()
    if prefix:
        return normalize_root_path(f"{prefix.rstrip('/')}/proxy/{port}")
    return None


def normalize_root_path(root_path: str) -> str | None:
    """``root_path`` with one leading and no trailing slash (a full URL is kept as given)."""
    root_path = root_path.strip().rstrip("/")
    if not root_path:
        return None
    if root_path.startswith(("http://", "https://")):
        return root_path
    return "/" + root_path.lstrip("/")


def resolve_endpoint(client: Any | None) -> Endpoint:
    """Where the app sends requests: ``client``'s server, else the one discovery finds.

    ``client`` is anything the notebook API takes: an ``XllmClient``/``AsyncXllmClient``,
    a ``(base_url, api_key)`` pair, a base URL, or an object with ``base_url``/``api_key``.
    """
    if client is None:
        # Imported here: discovery may look up a hub service or start a private server.
        from ..client.discovery import get_client

        found = get_client()
        try:
            return Endpoint(found.base_url, found.api_key)
        finally:
            found.close()
    base, key = endpoint_of(client)
    return Endpoint(resolve_base_url(base), key)


def list_models(endpoint: Endpoint) -> tuple[list[str], str | None]:
    """(every model id the server can chat with, the default model) from the server at ``endpoint``.

    Embedding models are left out: picked in a chat app they could only answer with an error.
    """
    with XllmClient(endpoint.base_url, endpoint.api_key) as client:
        listing = client.models()
        models = [m.get("id") or m.get("name") for m in listing if can_chat(m)]
        default = client.default_model(listing)  # the same listing: one /v1/models call
    return [m for m in models if m], default


def model_problem(endpoint: Endpoint, model: str | None, models: list[str]) -> str | None:
    """A line naming ``model`` when the server lacks it or cannot chat with it (as the widgets say), else None."""
    if not model or model in models:
        return None
    with XllmClient(endpoint.base_url, endpoint.api_key) as client:
        return unknown_models(client, [model], models)


def first_settings(endpoint: Endpoint, model: str | None) -> dict[str, float]:
    """The sliders' first values: ``model``'s own defaults as the server lists them (a kernel's loop is running
    here, so not ``app.model_settings``)."""
    own: dict[str, float] = {}
    if model:
        try:
            with XllmClient(endpoint.base_url, endpoint.api_key) as client:
                own = entry_defaults(client.model(model))
        except XllmError:  # an unknown name: model_problem says so
            pass
    return shown_settings(own)


class Playground:
    """A running Gradio chat app for the shared engine; shows itself inline, ``close()`` frees the port.

    Its URLs carry a per-playground secret path: only whoever was handed one can use the app.
    """

    def __init__(
        self,
        app: Any,
        *,
        server: WebServer,
        guard: Guard,
        secret: str,
        host: str,
        port: int,
        root_path: str | None,
        model: str | None,
        inline: bool,
        share_url: str | None = None,
        tunnel: Any = None,
        height: int = 640,
    ):
        self.app = app
        self.server = server
        self.guard = guard
        self._secret = secret
        self.host = host
        self.port = port
        self.root_path = root_path
        self.model = model
        self.inline = inline
        self.share_url = share_url
        self.tunnel = tunnel
        self.height = height
        self.closed = False

    @property
    def local_url(self) -> str:
        """The URL on this machine (what code in the kernel, e.g. gradio_client, connects to)."""
        host = self.host
        every = unspecified_address(host)
        if every is not None:  # every interface ("0", "::0" too): reached on loopback, of its family
            host = "::1" if every.version == 6 else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/{self._secret}/"

    @property
    def url(self) -> str:
        """The URL a browser opens: the share link, the proxied path, or the local URL."""
        if self.share_url:
            return f"{self.share_url}/{self._secret}/"
        if self.root_path:
            return f"{self.root_path}/{self._secret}/"
        return self.local_url

    @property
    def api_name(self) -> str:
        """The Gradio API endpoint of the streamed chat (for ``gradio_client``)."""
        return "/" + CHAT_API_NAME

    def close(self) -> None:
        """Stop the web server (and share tunnel) and free the port (idempotent)."""
        if not self.closed:
            self.closed = True
            close_tunnel(self.tunnel)
            # Gradio first: its queue stops and open event streams end, so uvicorn exits promptly.
            self.app.close(verbose=False)
            self.server.close()

    def __enter__(self) -> Playground:  # noqa: PYI034 (py3.10 has no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Without the URL: a repr ends up in logs and tracebacks, the secret must not.
        state = "closed" if self.closed else f"on port {self.port} (open .url)"
        return f"<xllm playground {state} model={self.model!r}>"

    def _repr_html_(self) -> str:
        """An iframe with the app (or a link when ``inline=False``); a note once closed."""
        if self.closed:
            return "<p><em>xllm playground closed.</em></p>"
        url = html.escape(self.url, quote=True)
        link = f'<p>xllm playground: <a href="{url}" target="_blank" rel="noopener">{url}</a></p>'
        if not self.inline:
            return link
        frame = f'<iframe src="{url}" width="100%" height="{int(self.height)}" style="border:0" allow="clipboard-write"></iframe>'
        return frame + link


def close_replaced(playgrounds: Sequence[Playground]) -> None:
    """Close the still-open ``playgrounds`` and say so (a re-run cell replaces its app)."""
    for old in playgrounds:
        if not old.closed:
            old.close()
            print(f"xllm playground: closed the previous playground (port {old.port})")


def launch(
    model: str | None = None,
    *,
    client: Any | None = None,
    port: int | None = None,
    root_path: str | None = None,
    inline: bool = True,
    share: bool = False,
    host: str = DEFAULT_HOST,
    height: int = 640,
    allowed_hosts: Sequence[str] = (),
    replaces: Sequence[Playground] = (),
    params: Mapping[str, Any] | None = None,
) -> Playground:
    """Start the playground against the shared engine and return it (see ``playground``).

    ``replaces`` are earlier playgrounds to close first: only once this call's arguments and
    server were checked (a typo must not kill the running app), and before the port is
    picked, so the new app gets the old one's port (and proxy URL) back.
    """
    try:
        import gradio  # noqa: F401  (an optional dependency: say how to get it)
    except ImportError:
        raise XllmError(
            'the playground needs gradio: pip install "xllm-jupyter[lab]" (or pip install gradio)'
        ) from None
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequest(
                f"port must be an integer in 1-65535, not {port!r}", param="port"
            )
    if isinstance(allowed_hosts, str):
        allowed_hosts = (allowed_hosts,)
    params = dict(params or {})
    check_params(params)  # before anything starts: the app would refuse every question
    endpoint = resolve_endpoint(client)
    models, default = list_models(endpoint)
    # named now, as the widgets do: else the picker offered it and only the first message said it was missing
    problem = model_problem(endpoint, model, models)
    close_replaced(replaces)
    if port is not None and not port_is_free(port, host):
        raise XllmError(
            f"port {port} is already in use: pass another port= or close the other app"
        )
    model = model or default
    app = build_app(endpoint, models, model, settings=first_settings(endpoint, model), params=params)
    app.queue(default_concurrency_limit=32)
    secret = new_secret()
    candidates = PORT_RANGE
    while True:
        chosen = port if port is not None else pick_port(host, candidates)
        root = (
            normalize_root_path(root_path.replace("{port}", str(chosen)))
            if root_path is not None
            else detect_root_path(chosen)
        )
        try:
            guard = guarded_app(
                app, secret=secret, host=host, root=root, allowed_hosts=tuple(allowed_hosts)
            )
            server = WebServer(guard, bind(host, chosen))
            break
        except OSError as exc:
            # another kernel's app took the picked port between the check and the bind: pick the next
            if port is None and exc.errno == errno.EADDRINUSE and chosen + 1 < PORT_RANGE.stop:
                candidates = range(chosen + 1, PORT_RANGE.stop)
                continue
            raise XllmError(f"the playground could not start on {host}:{chosen}: {exc}") from None
        except (ValueError, RuntimeError) as exc:
            raise XllmError(f"the playground could not start on {host}:{chosen}: {exc}") from None
    server.start()
    playground = Playground(
        app,
        server=server,
        guard=guard,
        secret=secret,
        host=host,
        port=chosen,
        root_path=root,
        model=model,
        inline=inline,
        height=height,
    )
    if share:
        try:
            playground.share_url, playground.tunnel = open_share_tunnel(app, host, chosen)
        except XllmError:
            playground.close()
            raise
        guard.allow_host(urlsplit(playground.share_url).hostname or "")
    if problem:
        print(f"xllm playground: {problem}")
    return playground
