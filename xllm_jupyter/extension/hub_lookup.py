"""Is this Jupyter server a JupyterHub single-user server whose hub runs the xllm service?

Then kernels should use that one shared engine (docs/jupyterhub.md) rather than this
server's: the extension exports no ``XLLM_BASE_URL`` (which would win over hub discovery),
loads no model, and forwards its own ``{base_url}xllm/`` API to the service
(extension/hub_forward.py). Asked with the server's own ``JUPYTERHUB_API_TOKEN``, which
needs ``read:services!service=xllm`` (the doc's ``c.Spawner.server_token_scopes``). A hub
that does not answer is asked again soon, a final no rarely (extension/hub_link.py).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from ..core.hub_url import TLS_HINT, hub_ssl_context, service_root

#: the hub service looked up when XLLM_HUB_SERVICE is not set (as client/discovery.py does)
DEFAULT_HUB_SERVICE = "xllm"
#: the hub answers from its database; a hub slower than this has not answered yet (asked again later)
LOOKUP_TIMEOUT = 5.0


@dataclass(frozen=True)
class HubService:
    """The hub's xllm service as this server reaches it: its name, URL root (``.../services/xllm/``) and our token."""

    name: str
    root: str
    token: str

    def __repr__(self) -> str:  # never show the token in a log line
        return f"HubService(name={self.name!r}, root={self.root!r})"


@dataclass(frozen=True)
class HubLookup:
    """One answer of the hub about the service: found, a no (``final``: the hub's word), or no answer yet (ask again soon)."""

    service: HubService | None
    final: bool
    reason: str  # for the log: why there is no service, or where it is
    fault: bool = False  # this server's set-up is at fault (TLS): the log says so as a warning
    lasting: bool = False  # no hub to ask at all (no JUPYTERHUB_API_URL/TOKEN): never asked again
    #: a 403: this server's token lacks the read scope. Only a role's grant is mended by a re-check; a token made
    #: without the scope keeps that lack until its server restarts (the hub fixes a token's scopes when it makes it)
    missing_scope: bool = False


def scope_advice(name: str) -> str:
    """What a user whose server's token may not look up hub service ``name`` can do (``/xllm/health``'s ``hub``)."""
    return (f"this server's JupyterHub token may not look up the hub's xllm service (it lacks the scope "
            f"read:services!service={name}): if the hub runs that service, its admin grants the scope to users and "
            "their servers' tokens (docs/jupyterhub.md); then restart this server (Hub Control Panel: Stop My Server, "
            "Start My Server), as a server's token keeps the scopes it was made with")


async def lookup_hub_service(env: Mapping[str, str]) -> HubLookup:
    """Ask the hub API (``JUPYTERHUB_API_URL``) for the xllm service with this server's token.

    A 403 (the token may not read it: the hub is not set up for xllm), a 404 (no such service) or a
    model without a URL are final (the hub's word: the caller acts on it and asks again only rarely); no
    answer, a timeout, a 5xx or a body that is not the service's model are not (a hub restarting or slow
    under a burst of spawns): the caller asks again soon.
    """
    api_url = env.get("JUPYTERHUB_API_URL", "").strip().rstrip("/")
    token = env.get("JUPYTERHUB_API_TOKEN", "").strip()
    if not api_url or not token:
        return HubLookup(None, True, "not a JupyterHub single-user server (no JUPYTERHUB_API_URL/TOKEN)", lasting=True)
    name = env.get("XLLM_HUB_SERVICE", "").strip() or DEFAULT_HUB_SERVICE
    try:
        tls = hub_ssl_context(env)
    except (OSError, ssl.SSLError) as exc:  # a fault in this server's setup: asking again would not mend it
        return HubLookup(None, True, f"this server's TLS certificate for the hub could not be loaded ({exc}); {TLS_HINT}",
                         fault=True)
    try:
        response = await AsyncHTTPClient().fetch(
            f"{api_url}/services/{quote(name, safe='')}",
            headers={"Authorization": f"token {token}"},
            request_timeout=LOOKUP_TIMEOUT,
            connect_timeout=LOOKUP_TIMEOUT,
            ssl_options=tls,  # None: Tornado's default verification
        )
        model = json.loads(response.body)
    except ssl.SSLError as exc:  # an untrusted hub certificate, or no client certificate: set-up, not an outage
        return HubLookup(None, True, f"the TLS handshake with the hub API failed ({exc.reason or exc}); {TLS_HINT}",
                         fault=True)
    except HTTPClientError as exc:
        if exc.code == 403:  # (the hub API's 403 is its scope check: "requires any of [read:services, ...]")
            return HubLookup(None, True, f"this server's token may not read the hub service {name!r} (403: it lacks "
                                         f"the scope read:services!service={name})", missing_scope=True)
        if exc.code == 401:
            return HubLookup(None, True, f"this server's token may not read the hub service {name!r} (401)")
        if exc.code == 404:
            return HubLookup(None, True, f"the hub has no service {name!r} (404)")
        # 599: Tornado's code for a timeout or a connection that broke; 5xx: the hub (or its proxy) is not well
        return HubLookup(None, 400 <= exc.code < 500, f"the hub API answered {exc.code} {exc.message or ''}".rstrip())
    except OSError as exc:  # refused, unreachable, DNS: the hub is not up (yet)
        return HubLookup(None, False, f"the hub API could not be reached ({type(exc).__name__})")
    except ValueError:
        return HubLookup(None, False, "the hub API answered something that is not JSON")
    if not isinstance(model, dict) or model.get("name") != name:
        return HubLookup(None, True, f"the hub API's answer is not the model of service {name!r}")
    root = service_root(env, name, model)
    if not root:
        return HubLookup(None, True, f"the hub service {name!r} has no URL this server can use")
    return HubLookup(HubService(name, root, token), True, f"the hub service {name!r} at {root}")


async def find_hub_service(env: Mapping[str, str]) -> HubService | None:
    """The xllm hub service when the hub API (``JUPYTERHUB_API_URL``) shows it to this server's token, else None."""
    return (await lookup_hub_service(env)).service
