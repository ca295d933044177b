"""The standalone Tornado application: the shared routes on the API-key auth base."""

from __future__ import annotations

import logging
from typing import Any

import tornado.web

from ..core.config import XllmConfig
from .auth import AUTH_KEY, ApiKeyAuth, ApiKeyHandler, PublicApiKeyHandler
from .auth_failures import FAILURES_KEY, FailedAuthLimiter
from .edge import XllmApplication, edge_settings, edge_transforms
from .handlers import CONTEXT_KEY, NotFoundMixin, XllmContext
from .limits import LIMITS_KEY, Limiter
from .routes import build_routes, handler_class

log = logging.getLogger("xllm_jupyter.server")


def make_app(config: XllmConfig, engine: Any, *, prefix: str = "") -> tornado.web.Application:
    """A Tornado app serving ``engine`` under ``prefix`` with user and admin keys and per-key limits."""
    auth = ApiKeyAuth(config.server.api_keys, config.auth.admin_keys)
    # counted as ApiKeyAuth reads them: stripped, and an empty or blank key ("$UNSET") is no key
    keys = {k.strip() for k in config.server.api_keys} - {""}
    if len(keys) > 1 and not {k.strip() for k in config.auth.admin_keys} - {""}:
        # the documented default, but a server shared by several keys rarely means it: say so at start
        log.warning("%d API keys and no auth.admin_keys: every key may call /admin/* (pull server-local paths, "
                    "load and unload models, read everyone's usage); set auth.admin_keys to keep that to admins",
                    len(keys))
    context = XllmContext(engine, config)
    context.limiter = Limiter(config.auth)  # per-key limits; metrics read context.limiter.rejections
    context.limiter.listeners.append(context.metrics.record_rate_limited)
    settings: dict[str, Any] = {
        CONTEXT_KEY: context,
        AUTH_KEY: auth,
        LIMITS_KEY: context.limiter,
        FAILURES_KEY: FailedAuthLimiter(config.auth),  # per-address cap on wrong keys
        "default_handler_class": handler_class(NotFoundMixin, ApiKeyHandler),
        # keyless mode refuses cross-site browser requests itself (auth.cross_site), on every Tornado
    }
    settings.update(edge_settings(config, any_host_ok=auth.enabled))  # Host/CORS policy, access log
    app = XllmApplication(build_routes(prefix, ApiKeyHandler, PublicApiKeyHandler), **settings)
    app.transforms.extend(edge_transforms(config))  # gzip for JSON (never SSE), request-id/CORS headers
    return app
