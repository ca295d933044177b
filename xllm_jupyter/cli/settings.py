"""The server a command talks to: ``--url``/``--api-key``, before or after the subcommand."""

from __future__ import annotations

from typing import Any, Callable

import click

URL_HELP = "Server base URL ending in /v1 [env XLLM_BASE_URL; default http://127.0.0.1:8900/v1]."
KEY_HELP = "API key (or Jupyter token) for the server [env XLLM_API_KEY]."


class Settings:
    """Global options, and the client built from them on first use."""

    def __init__(self, url: str | None = None, api_key: str | None = None):
        self.url = url
        self.api_key = api_key
        self._client = None

    def client(self):
        """The XllmClient for ``--url``/``--api-key`` (env XLLM_BASE_URL/XLLM_API_KEY)."""
        if self._client is None:
            from ..client import XllmClient

            self._client = XllmClient(self.url, self.api_key)
            click.get_current_context().call_on_close(self._client.close)
        return self._client


def _setter(attr: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is not None:  # given after the subcommand: it wins over the group's (and the env's)
            setattr(ctx.ensure_object(Settings), attr, value)

    return store


def server_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``--url``/``--api-key`` after the subcommand too (``xllm ps --url URL``), as the README shows."""
    command = click.option("--api-key", metavar="KEY", expose_value=False, callback=_setter("api_key"), help=KEY_HELP)(command)
    return click.option("--url", metavar="URL", expose_value=False, callback=_setter("url"), help=URL_HELP)(command)
