"""xllm as a JupyterHub service: the shared routes under the service prefix, hub auth on top.

API calls carry a hub token (``Authorization: token <t>`` or ``Bearer <t>``, so the
OpenAI SDK works with ``api_key=<token>``); ``HubAuth`` asks the hub who owns it and
which scopes it has, and the token must hold ``access:services!service=<name>``.
Browsers get a page at the prefix through hub OAuth (``HubOAuth``, callback at
``{prefix}oauth_callback``). The caller is the hub account (name and creation time, see
accounts.py) and their groups; quotas, fair scheduling and the ownership of stored responses
all key on it. The service's own token needs ``read:users`` to learn an account's creation
time (without it users are keyed by name); identifying a token uses that token itself.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping
from typing import Any, Awaitable

import tornado.web
from jupyterhub.services.auth import (
    HubOAuth,
    HubOAuthCallbackHandler,
    HubOAuthenticated,
    UserNotAllowed,
)
from tornado.web import HTTPError, RequestHandler

from ..core.config import XllmConfig
from ..core.errors import AuthenticationError, HubMisconfigured, Overloaded, PermissionDenied, RateLimited
from ..server.auth_failures import FAILURES_KEY, FailedAuthLimiter
from ..server.edge import RequestIdMixin, log_access
from ..server.handlers import CONTEXT_KEY, NotFoundMixin, VerbDispatchMixin, XllmContext, admin_required
from ..server.routes import build_routes, handler_class
from ..server.usage import Caller
from .accounts import ACCOUNT_TIMES_KEY, AccountTimes, account_created, model_created, service_reads_users, user_key
from .known_tokens import KNOWN_TOKENS_KEY, KnownTokens, ask_under_cap
from .oauth_states import BoundedStates

#: settings key of the HubOAuth instance
log = logging.getLogger("xllm_jupyter.hub")

HUB_AUTH_KEY = "xllm_hub_auth"
#: the service name when JUPYTERHUB_SERVICE_NAME is not set
DEFAULT_SERVICE_NAME = "xllm"


def service_prefix(env: Mapping[str, str]) -> str:
    """The service's URL prefix, ``/services/<name>/`` unless the hub says otherwise."""
    name = env.get("JUPYTERHUB_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    prefix = env.get("JUPYTERHUB_SERVICE_PREFIX") or f"/services/{name}/"
    return "/" + prefix.strip("/") + "/"


def make_hub_auth(env: Mapping[str, str] | None = None) -> HubOAuth:
    """A ``HubOAuth`` for this service from the hub's environment variables (``env``: os.environ)."""
    env = os.environ if env is None else env
    name = env.get("JUPYTERHUB_SERVICE_NAME") or DEFAULT_SERVICE_NAME
    token = env.get("JUPYTERHUB_API_TOKEN", "")
    if not token:
        raise AuthenticationError("JUPYTERHUB_API_TOKEN is not set: run xllm as a JupyterHub service (see docs/jupyterhub.md).")
    prefix = service_prefix(env)
    api_url = (env.get("JUPYTERHUB_API_URL") or "http://127.0.0.1:8081/hub/api").rstrip("/")
    scopes = env.get("JUPYTERHUB_OAUTH_ACCESS_SCOPES")
    auth = HubOAuth(
        api_token=token,
        api_url=api_url,
        base_url=prefix,
        hub_prefix=((env.get("JUPYTERHUB_BASE_URL") or "/").rstrip("/") + "/hub/"),
        hub_host=env.get("JUPYTERHUB_HOST", ""),
        oauth_client_id=env.get("JUPYTERHUB_CLIENT_ID") or f"service-{name}",
        oauth_redirect_uri=env.get("JUPYTERHUB_OAUTH_CALLBACK_URL") or prefix + "oauth_callback",
        access_scopes=set(json.loads(scopes)) if scopes else {f"access:services!service={name}"},
        cache_max_age=60,  # a revoked token keeps working for at most a minute
        # JupyterHub's internal_ssl: the hub API wants this client certificate (a managed service gets them)
        certfile=env.get("JUPYTERHUB_SSL_CERTFILE", ""),
        keyfile=env.get("JUPYTERHUB_SSL_KEYFILE", ""),
        client_ca=env.get("JUPYTERHUB_SSL_CLIENT_CA", ""),
    )
    if auth.has_trait("_oauth_states"):  # JupyterHub 5+ keeps logins begun by anyone, unauthenticated, in memory
        # (4.x keeps each in its browser's state cookie: nothing to bound there)
        auth._oauth_states = BoundedStates(auth.oauth_state_max_age)
    return auth


def caller_from_model(model: Mapping[str, Any], config: XllmConfig) -> Caller:
    """The Caller a hub user (or service) model describes; admins per ``hub.admin_users/admin_groups``."""
    name = str(model.get("name") or "")
    key = name
    if model.get("kind") == "service":
        # never the key of a user: hub user names may hold ':' (a user "service:x" had service x's
        # quota and stored responses), never '/'
        name = key = "service/" + name
    else:  # the account, not just its name: a re-created user is someone else (accounts.py)
        key = user_key(name, model_created(model)[1])
    groups = tuple(str(g) for g in model.get("groups") or ())
    hub = config.hub
    admin = name in hub.admin_users or bool(set(groups) & set(hub.admin_groups))
    return Caller(key, groups, admin, name=None if key == name else name)


async def with_account(handler: RequestHandler, model: Mapping[str, Any], token: str = "") -> Mapping[str, Any]:
    """``model`` with its account's ``created`` (asked of the hub, cached per ``token``, when the token could not
    read its own account), or with none when the service may not read users: then every token of a user, even one
    showing its own ``created``, gives the one name key; a service's model as it is."""
    if model.get("kind") == "service":
        return model
    auth, times = handler.settings[HUB_AUTH_KEY], handler.settings[ACCOUNT_TIMES_KEY]
    timeout = handler.settings[CONTEXT_KEY].config.hub.api_timeout_seconds
    if not await ask_hub(handler, service_reads_users(auth, times, timeout)):
        return {**model, "created": None}
    if model_created(model)[0]:
        return model
    known, created = times.get(token) if token else (False, None)
    if not known:
        created = await ask_hub(handler, account_created(auth, str(model.get("name") or ""), times))
        if token:
            times.put(token, created)
    return {**model, "created": created}


#: how HubAuth's HTTPError 500 begins when the hub answered a 4xx (jupyterhub.services.auth ``_api_request``)
_HUB_REFUSED = ("Failed to check authorization", "Permission failure checking authorization")


async def ask_hub(handler: RequestHandler, answer: Awaitable[Any], *, login_code: bool = False) -> Any:
    """The hub's ``answer`` (a user model or None), or Overloaded ``hub_unavailable`` when the hub cannot be reached,
    fails (HubAuth's HTTPError 500/502) or has not answered within ``hub.api_timeout_seconds``;
    HubMisconfigured (500) when it refuses the service's request (a 4xx other than a token's 403), except that
    with ``login_code`` (the OAuth callback trading the browser's code) a 4xx is the code's refusal: a 403."""
    # HubAuth's HTTP client waits up to 5 minutes, so a hub that takes the connection and hangs (overloaded, paused,
    # a stuck proxy) held every request that long
    timeout = handler.settings[CONTEXT_KEY].config.hub.api_timeout_seconds
    try:
        return await asyncio.wait_for(answer, timeout)
    except HTTPError as exc:
        if exc.status_code < 500:  # the OAuth callback's own refusals (a bad or stale state): not the hub's
            raise
        if login_code and exc.status_code == 500 and (exc.log_message or "").startswith(_HUB_REFUSED[0]):
            # the hub refused the code (a stale, replayed or made-up one: anyone can begin a login and send any
            # code): the browser's fault, not the setup's; HubAuth logged it as a warning
            raise HTTPError(403, "JupyterHub refused this login's code: open the page again to log in") from None
        if exc.status_code == 500 and (exc.log_message or "").startswith(_HUB_REFUSED):
            # the hub answered a 4xx other than a token's 403 (a wrong JUPYTERHUB_API_URL: 404): "retry later"
            # misled, as no retry helps; HubAuth logged the hub's status and body just before
            log.error("the hub API refused the service's request (%s): check JUPYTERHUB_API_URL and the service's "
                      "token", exc.log_message)
            raise HubMisconfigured("The xllm hub service is misconfigured: JupyterHub refused its request (the "
                                   "service's log says why); retrying will not help.") from None
    except asyncio.TimeoutError:
        pass
    raise Overloaded("JupyterHub could not be asked who owns this token; retry later.", code="hub_unavailable")


def request_token(auth: HubOAuth, handler: RequestHandler) -> str:
    """The token of an API request: its ``Authorization`` header, or ``?token=`` only where the hub allows tokens
    in URLs (HubAuth's ``get_token`` also takes the URL's from any request that says ``Sec-Fetch-Mode: websocket``)."""
    if auth.allow_token_in_url:
        return auth.get_token(handler, in_cookie=False)
    found = auth.auth_header_pat.match(handler.request.headers.get(auth.auth_header_name, ""))
    return found.group(1) if found else ""


def public_scheme(request: Any) -> str:
    """The scheme the browser used: the hub's proxy (or TLS in front of it) says so in X-Forwarded-Proto."""
    # configurable-http-proxy appends its own hop, so the first value is the client's; the page only
    # shows the URL to whoever sent the header, so trusting it misleads nobody else
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return forwarded if forwarded in ("http", "https") else request.protocol


class HubXllmHandler(RequestIdMixin, VerbDispatchMixin, RequestHandler):
    """Auth base for API routes: a hub token with the service's access scope; every answer has an ``X-Request-ID``."""

    auth_required = True
    #: set on ``/admin/*`` handlers by ``routes.build_routes``
    admin_only = False

    @property
    def hub_auth(self) -> HubOAuth:
        """The service's HubOAuth."""
        return self.settings[HUB_AUTH_KEY]

    async def prepare(self) -> None:
        """Identify the token's owner with the hub, check the access scope, then admin rights."""
        if not self.auth_required:
            return
        auth = self.hub_auth
        # header (or ?token= where the hub allows tokens in URLs) only, never the OAuth cookie: API calls
        # then need no XSRF guard
        failures: FailedAuthLimiter = self.settings[FAILURES_KEY]
        known: KnownTokens = self.settings[KNOWN_TOKENS_KEY]
        client = failures.client(self.request)
        token = request_token(auth, self)
        if not token:
            failures.check(client)  # a capped address is told so first, as for any request of its
            raise AuthenticationError("Missing JupyterHub token. Pass it as 'Authorization: token <JUPYTERHUB_API_TOKEN>'.")
        model = await ask_under_cap(failures, client, self.request,
                                    lambda: ask_hub(self, auth.user_for_token(token, sync=False)),
                                    confirmed=token in known)
        if model:
            known.add(token)
        else:
            known.discard(token)
        if not model:
            raise AuthenticationError("Invalid or expired JupyterHub token.")
        if not auth.check_scopes(auth.access_scopes, model):
            # a managed service's hub sends both access:services and access:services!service=NAME: either will do
            scopes = sorted(auth.access_scopes)
            need = f"the scope {scopes[0]}" if len(scopes) == 1 else "one of the scopes " + ", ".join(scopes)
            raise PermissionDenied(f"This token may not use the xllm service: it needs {need}.")
        caller = caller_from_model(await with_account(self, model, token), self.settings[CONTEXT_KEY].config)
        if admin_required(self) and not caller.admin:
            raise PermissionDenied("Only the service's admins (hub.admin_users, hub.admin_groups) may call admin endpoints.")
        self.xllm_caller = caller


class HubPublicHandler(HubXllmHandler):
    """The same base without authentication (``/health``)."""

    auth_required = False


class _HubAuthFromSettings:
    """``hub_auth`` is the app's HubOAuth, not HubOAuth's process-wide singleton."""

    @property
    def hub_auth(self) -> HubOAuth:
        """The service's HubOAuth."""
        return self.settings[HUB_AUTH_KEY]  # type: ignore[attr-defined]

    @hub_auth.setter
    def hub_auth(self, auth: HubOAuth) -> None:
        pass  # always the app's


class _NoBody:
    """A browser route that takes no request body refuses one (413) before it is read.

    The service lets Tornado accept bodies up to 1 GiB, which its API routes stream and cap themselves; a
    route Tornado does not stream would hold such a body whole in memory, credentials unchecked, before
    answering it. So these routes stream (``stream_request_body``) and refuse any body in ``prepare``.
    """

    def refuse_body(self) -> None:
        """HTTPError 413 when the request carries a body."""
        headers = self.request.headers  # type: ignore[attr-defined]
        if headers.get("Transfer-Encoding") or headers.get("Content-Length", "0") not in ("", "0"):
            raise HTTPError(413)

    def data_received(self, chunk: bytes) -> None:
        """Nothing to read: ``prepare`` refused any body first."""

    def close_after(self) -> None:
        """Tell the client not to reuse the connection: an answer given in ``prepare`` comes before Tornado has read
        the request's end, so Tornado closes the connection after it, and a client that sent its next request on it
        saw a reset."""
        self.set_header("Connection", "close")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Tornado's error page, marked ``Connection: close`` (see ``close_after``)."""
        self.close_after()
        super().write_error(status_code, **kwargs)  # type: ignore[misc]

    def answer_now(self, exc: RateLimited | Overloaded | HubMisconfigured) -> None:
        """``exc`` as a plain-text answer with its ``Retry-After`` (an HTTPError's page would drop that header)."""
        self.set_status(exc.status)  # type: ignore[attr-defined]
        if not isinstance(exc, HubMisconfigured):  # (no retry helps)
            self.set_header("Retry-After", str(int(getattr(exc, "retry_after", 1))))  # type: ignore[attr-defined]
        self.set_header("Content-Type", "text/plain; charset=utf-8")  # type: ignore[attr-defined]
        self.close_after()
        self.finish(exc.message + "\n")  # type: ignore[attr-defined]


@tornado.web.stream_request_body
class OAuthCallbackHandler(RequestIdMixin, _NoBody, _HubAuthFromSettings, HubOAuthCallbackHandler):
    """``{prefix}oauth_callback``: finishes the hub OAuth login and sets the service cookie."""

    async def prepare(self) -> None:
        """Refuse a body before it is read; find who the login cookie names, awaited here.

        JupyterHub's callback asks ``current_user`` when the state cookie is missing (a reload, a forged link), and
        its ``current_user`` asks the hub synchronously: the IOLoop waited for the hub's answer, and about any token
        in the request's headers, unbounded by the failed-auth cap (a redirect told a right token from a 403).
        """
        self.refuse_body()
        self._hub_auth_user_cache = None
        token = self.get_secure_cookie(self.hub_auth.cookie_name)  # signed with the service's secret: no guess
        if not token:
            return
        try:
            model = await ask_hub(self, self.hub_auth.user_for_token(token.decode("ascii", "replace"), sync=False,
                                                               session_id=self.hub_auth.get_session_id(self)))
        except (Overloaded, HubMisconfigured) as exc:
            self.answer_now(exc)
            return
        if model:
            try:
                self._hub_auth_user_cache = self.check_hub_user(model)
            except UserNotAllowed:  # logged in, but without the access scope: the login goes on
                pass

    async def get(self) -> None:
        """Finish the login: JupyterHub's callback, or 503 when the hub cannot be asked (``ask_hub``)."""
        state = self.get_argument("state", "")
        pending = getattr(self.hub_auth, "_oauth_states", None)  # JupyterHub 5+; 4.x keeps states in the cookie
        if state and self.get_argument("code", "") and pending is not None and state not in pending \
                and (self.get_secure_cookie(self.hub_auth.get_state_cookie_name(state)) or b"").decode() == state:
            # this browser's own login, but its state was forgotten (the oldest past MAX_PENDING, oauth_states.py,
            # or past its 10 minutes): without its PKCE verifier the hub refuses the code, which read as "hub
            # unavailable, retry" though no retry could work; the page begins a new login instead
            self.hub_auth.clear_oauth_state_cookies(self)
            self.redirect(self.hub_auth.base_url)
            return
        try:
            await ask_hub(self, super().get(), login_code=True)
        except (Overloaded, HubMisconfigured) as exc:
            self.answer_now(exc)


@tornado.web.stream_request_body
class HubPageHandler(RequestIdMixin, _NoBody, _HubAuthFromSettings, HubOAuthenticated, RequestHandler):
    """``{prefix}``: who you are, where the API is, and your usage (browser, via hub OAuth)."""

    async def prepare(self) -> None:
        """Refuse a body; resolve the hub user (token or OAuth cookie) without blocking the IOLoop."""
        self.refuse_body()
        failures: FailedAuthLimiter = self.settings[FAILURES_KEY]
        known: KnownTokens = self.settings[KNOWN_TOKENS_KEY]
        client = failures.client(self.request)
        if not self.hub_auth.allow_token_in_url:  # the API routes' rule (request_token): HubAuth's get_user also
            # took ?token= from any request saying Sec-Fetch-Mode: websocket, a header any client sends
            self.request.arguments.pop("token", None)
            self.request.query_arguments.pop("token", None)
        token = request_token(self.hub_auth, self)
        try:
            if token and token not in known:  # tokens guessed in ?token= here are capped as on the API routes
                model = await ask_under_cap(failures, client, self.request,
                                            lambda: ask_hub(self, self.hub_auth.get_user(self, sync=False)))
            else:
                # no guess: only the OAuth cookie (signed with the service's secret, checked here before the hub
                # is asked), or a token the hub confirmed before; a capped address (which another user can make
                # of anyone's, hub/known_tokens.py) does not keep its user from the page
                model = await ask_hub(self, self.hub_auth.get_user(self, sync=False))
                if token and not model:  # revoked: past the cap it is a guess again, as on the API routes
                    known.discard(token)
        except (RateLimited, Overloaded, HubMisconfigured) as exc:  # answered here: anything else raised (the
            # shutdown's Overloaded for a request waiting its turn, a hub that is down or hangs: ask_hub) is a 500
            self.answer_now(exc)
            return
        self._hub_auth_user_cache = None
        if model:
            try:
                self._hub_auth_user_cache = self.check_hub_user(model)
            except UserNotAllowed:  # logged in, but without the access scope
                raise HTTPError(403) from None

    def get_login_url(self) -> str:
        """The hub's login URL, whose state returns to the page itself: HubOAuth keeps the request's URI for 10
        minutes, and the page takes no query, so a long one was memory spent by whoever sent it (oauth_states.py)."""
        uri, self.request.uri = self.request.uri, self.request.path
        try:
            return super().get_login_url()
        finally:
            self.request.uri = uri

    @tornado.web.authenticated  # not logged in: redirect into the hub's OAuth flow
    async def get(self) -> None:
        """A small HTML page."""
        context: XllmContext = self.settings[CONTEXT_KEY]
        try:
            caller = caller_from_model(await with_account(self, self.current_user), context.config)
        except (Overloaded, HubMisconfigured) as exc:  # the account's lookup, as the login's own (prepare)
            self.answer_now(exc)
            return
        except AuthenticationError:  # the user was deleted since the login was checked
            raise HTTPError(403) from None
        rows = context.usage.snapshot(caller.user)
        used = rows[0] if rows else {"requests": 0, "total_tokens": 0, "tokens_today": 0, "running": 0, "queued": 0}
        conc, per_day = context.usage.limits(caller)
        base = public_scheme(self.request) + "://" + self.request.host + self.hub_auth.base_url + "v1"
        e = html.escape
        self.set_header("Content-Type", "text/html; charset=utf-8")
        # never inside another site's frame (the page shows the user's name and usage); the hub's own pages
        # may frame it, as JupyterHub's pages set frame-ancestors 'self'
        self.set_header("Content-Security-Policy", "frame-ancestors 'self'")
        self.set_header("X-Frame-Options", "SAMEORIGIN")
        self.finish(
            "<!doctype html><html><head><meta charset='utf-8'><title>xllm</title></head><body>"
            f"<h1>xllm</h1><p>Signed in as <b>{e(caller.name or caller.user or '')}</b>.</p>"
            f"<p>OpenAI-compatible API: <code>{e(base)}</code>; use your JupyterHub token as the API key "
            "(in a notebook: <code>JUPYTERHUB_API_TOKEN</code>).</p>"
            f"<p>Your usage: {used['requests']} requests, {used['total_tokens']} tokens "
            f"({used['tokens_today']} today). Sequences generating now: {used['running']}; waiting for a "
            f"batch slot: {used['queued']}. Limits: "
            f"{conc or 'no limit on'} concurrent requests, {per_day or 'no limit on'} tokens per day.</p>"
            "</body></html>"
        )


#: ``auth`` settings of ``xllm serve``'s API keys, which the hub service (hub accounts, hub tokens) does not apply
_API_KEY_SETTINGS = ("admin_keys", "requests_per_minute", "tokens_per_minute", "max_concurrent_per_key")


def make_hub_app(config: XllmConfig, engine: Any, hub_auth: HubOAuth, *, cookie_secret: bytes | None = None) -> tornado.web.Application:
    """A Tornado app serving ``engine`` under the hub service prefix with hub token/OAuth auth."""
    prefix = hub_auth.base_url.rstrip("/")
    ignored = [f"auth.{k}" for k in _API_KEY_SETTINGS if getattr(config.auth, k)]
    if ignored:  # a limit the admin believes holds, silently not applied, is worse than none
        log.warning("the hub service does not apply %s (xllm serve's API-key settings): limit hub users with quotas.* "
                    "and name admins in hub.admin_users / hub.admin_groups", ", ".join(ignored))
    context = XllmContext(engine, config, shared_usage=True)  # a shared endpoint: usage outlives restarts
    settings: dict[str, Any] = {
        CONTEXT_KEY: context,
        HUB_AUTH_KEY: hub_auth,
        FAILURES_KEY: FailedAuthLimiter(config.auth),  # per-address cap on tokens the hub does not know
        KNOWN_TOKENS_KEY: KnownTokens(config.auth.failed_auth_max_clients),  # served past the cap
        ACCOUNT_TIMES_KEY: AccountTimes(hub_auth.cache_max_age),  # as long as HubAuth trusts a token's model
        "cookie_secret": cookie_secret or secrets.token_bytes(32),  # signs the OAuth state cookie
        "default_handler_class": handler_class(NotFoundMixin, HubXllmHandler),
        # path, never the query: Tornado's own line logs the URI, and a client's ?token= is a hub token
        "log_function": log_access,
    }
    # escaped: JupyterHub allows '+', '$' and the like in a service's name, which a pattern would read as its own
    escaped = re.escape(prefix)
    routes: list[Any] = [
        (escaped + "/oauth_callback", OAuthCallbackHandler),
        (escaped + "/?", HubPageHandler),
    ]
    routes += build_routes(prefix, HubXllmHandler, HubPublicHandler)
    return tornado.web.Application(routes, **settings)


__all__ = ["HUB_AUTH_KEY", "HubPageHandler", "HubXllmHandler", "caller_from_model", "make_hub_app", "make_hub_auth", "service_prefix"]
