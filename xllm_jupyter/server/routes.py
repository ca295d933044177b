"""The route table, built once for any URL prefix and any auth base.

Standalone serves it under ``""`` (so ``/v1/...``), the Jupyter extension under
``"/xllm"`` (ExtensionApp prepends ``base_url`` itself).
"""

from __future__ import annotations

import re
from typing import Any

from tornado.web import RequestHandler, stream_request_body

from .chat_store import StoredCompletionMessagesMixin, StoredCompletionMixin
from .embeddings import EmbeddingsMixin
from .handlers import (
    AdminLoadMixin,
    AdminModelsMixin,
    AdminUnloadMixin,
    ChatCompletionsMixin,
    CompletionsMixin,
    HealthMixin,
    ModelsMixin,
    NotFoundMixin,
)
from .ops import MetricsMixin, ReadyMixin
from .pull import AdminManifestMixin, AdminPullMixin
from .model_route import ModelMixin
from .responses import (
    ResponseCancelMixin,
    ResponseCompactMixin,
    ResponseInputItemsMixin,
    ResponseInputTokensMixin,
    ResponseMixin,
    ResponsesMixin,
)
from .stats import AdminStatsMixin
from .usage import AdminUsageMixin

#: the only paths served without credentials; every other route authenticates (and
#: tests/test_auth_limits.py walks ROUTES to prove it). The public? column of ROUTES
#: must agree with this set.
PUBLIC_PATHS: frozenset[str] = frozenset({r"/health", r"/health/ready"})
#: routes under this path need an admin key (auth.admin_keys) on the standalone server
ADMIN_PREFIX = "/admin/"
#: other admin-only routes: ``/metrics`` has every user's request and token counts (as ``/admin/usage`` has)
ADMIN_PATHS: frozenset[str] = frozenset({r"/metrics"})
#: the methods Tornado hands to a route's handler (every one RequestHandler has a default for): a method
#: the route does not serve is a 405 only after authentication, so nothing but PUBLIC_PATHS answers an
#: anonymous caller (other verbs, e.g. TRACE, Tornado refuses before any handler code runs)
HANDLED_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

#: (path under the prefix, request-logic mixin, public?) — only PUBLIC_PATHS are public
ROUTES: tuple[tuple[str, type, bool], ...] = (
    (r"/v1/models", ModelsMixin, False),
    # model ids may contain ':', '.', '-' and even '/' (HF-style names)
    (r"/v1/models/(?P<model_id>.+)", ModelMixin, False),  # DELETE: admins only (ADMIN_METHODS)
    (r"/v1/chat/completions", ChatCompletionsMixin, False),
    (r"/v1/chat/completions/(?P<completion_id>[^/]+)/messages", StoredCompletionMessagesMixin, False),
    (r"/v1/chat/completions/(?P<completion_id>[^/]+)", StoredCompletionMixin, False),
    (r"/v1/completions", CompletionsMixin, False),
    (r"/v1/responses", ResponsesMixin, False),
    # before the {id} routes below, which would take "input_tokens" for a response id
    (r"/v1/responses/input_tokens", ResponseInputTokensMixin, False),
    (r"/v1/responses/compact", ResponseCompactMixin, False),
    (r"/v1/responses/(?P<response_id>[^/]+)/input_items", ResponseInputItemsMixin, False),
    (r"/v1/responses/(?P<response_id>[^/]+)/cancel", ResponseCancelMixin, False),
    (r"/v1/responses/(?P<response_id>[^/]+)", ResponseMixin, False),
    (r"/v1/embeddings", EmbeddingsMixin, False),
    (r"/admin/models", AdminModelsMixin, False),
    (r"/admin/models/load", AdminLoadMixin, False),
    (r"/admin/models/unload", AdminUnloadMixin, False),
    (r"/admin/usage", AdminUsageMixin, False),
    (r"/admin/models/pull", AdminPullMixin, False),
    (r"/admin/models/manifest", AdminManifestMixin, False),
    (r"/admin/stats", AdminStatsMixin, False),
    (r"/health", HealthMixin, True),
    (r"/health/ready", ReadyMixin, True),
    (r"/metrics", MetricsMixin, False),
)


def served_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """A route's methods as it answers them (its ``Allow``): ``HEAD`` wherever ``GET`` is (GET's status and
    headers, no body), and ``OPTIONS`` everywhere (every base answers it: edge.PreflightHandler, Jupyter's
    APIHandler, ``RequestMixin.handle_options``)."""
    if "GET" in methods and "HEAD" not in methods:
        i = methods.index("GET") + 1
        methods = methods[:i] + ("HEAD",) + methods[i:]
    return methods if "OPTIONS" in methods else methods + ("OPTIONS",)


def handler_class(mixin: type, base: type[RequestHandler]) -> type[RequestHandler]:
    """The concrete handler for ``mixin`` on ``base``.

    Every handler streams its request body, so Tornado never buffers one itself: the
    mixins drop bodies they do not need and cap the ones they read (413). Tornado passes it
    every ``HANDLED_METHODS`` request; the route's own methods (``allowed_methods``: ``served_methods``) are
    checked after authentication (``RequestMixin.dispatch``).
    """
    name = mixin.__name__.replace("Mixin", "") + "Handler"
    attrs = {"__module__": base.__module__, "SUPPORTED_METHODS": HANDLED_METHODS,
             "allowed_methods": served_methods(mixin.SUPPORTED_METHODS)}
    return stream_request_body(type(name, (mixin, base), attrs))


def build_routes(prefix: str, base: type[RequestHandler], public_base: type[RequestHandler]) -> list[tuple[str, type, dict[str, Any]]]:
    """``[(pattern, handler, kwargs)]`` for every route under ``prefix``, ending in a 404 catch-all."""
    p = re.escape(prefix.rstrip("/"))
    routes: list[tuple[str, type, dict[str, Any]]] = []
    for path, mixin, _ in ROUTES:
        handler = handler_class(mixin, public_base if path in PUBLIC_PATHS else base)
        handler.admin_only = path.startswith(ADMIN_PREFIX) or path in ADMIN_PATHS  # type: ignore[attr-defined]
        handler.route = path  # type: ignore[attr-defined]  # the metrics label
        routes.append((p + path, handler, {}))
    routes.append((p + r"/(.*)", handler_class(NotFoundMixin, base), {}))
    return routes
