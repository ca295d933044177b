"""Is this Jupyter server a JupyterHub single-user server whose hub runs the xllm service?

Then kernels should use that one shared engine (docs/jupyterhub.md) rather than this
server's: the extension exports no ``XLLM_BASE_URL`` (which would win over hub discovery),
loads no model, and forwards its own ``{base_url}xllm/`` API to the service
(extension/hub_forward.py). Asked with the server's own ``JUPYTERHUB_API_TOKEN``, which
needs ``read:services!service=xllm`` (the doc's ``c.Spawner.server_token_scopes``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from ..core.hub_url import service_root

#: the hub service looked up when XLLM_HUB_SERVICE is not set (as client/discovery.py does)
DEFAULT_HUB_SERVICE = "xllm"
#: the hub answers from its database; a hub slower than this is treated as having no service
LOOKUP_TIMEOUT = 5.0


@dataclass(frozen=True)
class HubService:
    """The hub's xllm service as this server reaches it: its name, URL root (``.../services/xllm/``) and our token."""

    name: str
    root: str
    token: str

    def __repr__(self) -> str:  # never show the token in a log line
        return f"HubService(name={self.name!r}, root={self.root!r})"


async def find_hub_service(env: Mapping[str, str]) -> HubService | None:
    """The xllm hub service when the hub API (``JUPYTERHUB_API_URL``) shows it to this server's token, else None."""
    api_url = env.get("JUPYTERHUB_API_URL", "").strip().rstrip("/")
    token = env.get("JUPYTERHUB_API_TOKEN", "").strip()
    if not api_url or not token:
        return None
    name = env.get("XLLM_HUB_SERVICE", "").strip() or DEFAULT_HUB_SERVICE
    try:
        response = await AsyncHTTPClient().fetch(
            f"{api_url}/services/{quote(name, safe='')}",
            headers={"Authorization": f"token {token}"},
            request_timeout=LOOKUP_TIMEOUT,
            connect_timeout=LOOKUP_TIMEOUT,
        )
        model = json.loads(response.body)
    except (HTTPClientError, OSError, ValueError):  # 403/404 (no scope, no service), hub down, not JSON
        return None
    if not isinstance(model, dict) or model.get("name") != name:
        return None
    root = service_root(env, name, model)
    return HubService(name, root, token) if root else None
