"""The server a command talks to: ``--url``/``--api-key``, before or after the subcommand."""

from __future__ import annotations

import os
from typing import Any, Callable

import click

URL_HELP = "Server base URL ending in /v1 [env XLLM_BASE_URL; default http://127.0.0.1:8900/v1]."
KEY_HELP = ("API key (or Jupyter token) for the server [env XLLM_API_KEY, sent only to the server XLLM_BASE_URL "
            "(or the default URL) names].")


class Settings:
    """Global options, and the client built from them on first use."""

    def __init__(self, url: str | None = None, api_key: str | None = None):
        self.url = url
        self.api_key = api_key
        #: True once a client was built without the XLLM_API_KEY the environment holds (``--url`` names another
        #: server), so a 401 can say why no key went
        self.env_key_withheld = False
        self._client = None

    def client(self):
        """The XllmClient for ``--url``/``--api-key`` (env XLLM_BASE_URL; XLLM_API_KEY only for XLLM_BASE_URL's server)."""
        if self._client is None:
            from ..client import XllmClient

            _check_url(self.url)
            # no --api-key: the client takes XLLM_API_KEY only where --url is the server XLLM_BASE_URL names. In a
            # Jupyter terminal the variable holds the Jupyter server's token (the extension exports it), which
            # `xllm --url OTHER` sent to OTHER when click read it as --api-key
            self._client = XllmClient(self.url, self.api_key)
            self.env_key_withheld = self.api_key is None and self._client.api_key is None and bool(os.environ.get("XLLM_API_KEY"))
            click.get_current_context().call_on_close(self._client.close)
        return self._client


def _check_url(url: str | None) -> None:
    """A usage error for a URL httpx cannot use (``http://[::1``, bytes that are not UTF-8), not its traceback."""
    import httpx

    from ..client.base import resolve_base_url
    from ..core.errors import InvalidRequest

    try:
        resolved = resolve_base_url(url)  # as the client will: http:// and /v1 added where missing
    except InvalidRequest as exc:  # another scheme (ftp://)
        raise click.BadParameter(exc.message, param_hint="'--url' / XLLM_BASE_URL") from None
    try:
        resolved.encode("utf-8")
        httpx.URL(resolved)
    except (httpx.InvalidURL, UnicodeError) as exc:
        shown = resolved.encode("utf-8", "replace").decode()
        raise click.BadParameter(f"{shown!r} is not a usable URL ({exc})", param_hint="'--url' / XLLM_BASE_URL") from None


def _setter(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:  # given after the subcommand: it wins over the group's (and the env's)
            setattr(ctx.ensure_object(Settings), attr, value)

    return store


def server_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``--url``/``--api-key`` after the subcommand too (``xllm ps --url URL``), as the README shows."""
    command = click.option("--api-key", metavar="KEY", expose_value=False, callback=_setter("api_key"), help=KEY_HELP)(command)
    return click.option("--url", metavar="URL", expose_value=False, callback=_setter("url"), help=URL_HELP)(command)
