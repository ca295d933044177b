"""Is this Jupyter server a JupyterHub single-user server whose hub runs the xllm service?

Then kernels should use that one shared engine (docs/jupyterhub.md) rather than this
server's: the extension exports no ``XLLM_BASE_URL`` (which would win over hub discovery)
and loads no model at start. Asked with the server's own ``JUPYTERHUB_API_TOKEN``, which
needs ``read:services!service=xllm`` (the doc's ``c.Spawner.server_token_scopes``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

#: the hub service looked up when XLLM_HUB_SERVICE is not set (as client/discovery.py does)
DEFAULT_HUB_SERVICE = "xllm"
#: the hub answers from its database; a hub slower than this is treated as having no service
LOOKUP_TIMEOUT = 5.0


async def hub_service_name(env: Mapping[str, str]) -> str | None:
    """The xllm hub service's name when the hub API (``JUPYTERHUB_API_URL``) shows it to this server's token, else None."""
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
    return name if isinstance(model, dict) and model.get("name") == name else None
