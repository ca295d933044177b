"""The standalone Tornado application: the shared routes on the API-key auth base."""

from __future__ import annotations

from typing import Any

import tornado.web

from ..core.config import XllmConfig
from .auth import AUTH_KEY, ApiKeyAuth, ApiKeyHandler, PublicApiKeyHandler
from .handlers import CONTEXT_KEY, NotFoundMixin, XllmContext
from .routes import build_routes, handler_class


def make_app(config: XllmConfig, engine: Any, *, prefix: str = "") -> tornado.web.Application:
    """A Tornado app serving ``engine`` under ``prefix`` with ``config.server.api_keys``."""
    auth = ApiKeyAuth(config.server.api_keys)
    settings: dict[str, Any] = {
        CONTEXT_KEY: XllmContext(engine, config),
        AUTH_KEY: auth,
        "default_handler_class": handler_class(NotFoundMixin, ApiKeyHandler),
        # Keyless mode trusts anything on loopback, so a web page in the user's browser
        # must not be able to POST to it: refuse cross-origin browser requests.
        "cross_origin_protection": not auth.enabled,
    }
    return tornado.web.Application(build_routes(prefix, ApiKeyHandler, PublicApiKeyHandler), **settings)
