"""Where a JupyterHub service answers, from the hub API's model of it and the spawner's variables.

Kernels (client/discovery.py) and the Jupyter extension (extension/hub_lookup.py) both turn
``GET {JUPYTERHUB_API_URL}/services/<name>`` into the service's URL root; one reading keeps
them pointed at the same place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

#: where the spawner tells a single-user server (and its kernels) the hub's public address, best first
PUBLIC_KEYS = ("JUPYTERHUB_PUBLIC_HUB_URL", "JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_HOST")


def hub_public_origin(env: Mapping[str, str]) -> str:
    """``scheme://host[:port]`` of the hub's public URL, when the spawner told us, else ''."""
    for key in PUBLIC_KEYS:
        parts = urlsplit(env.get(key, "").strip())
        if parts.scheme and parts.netloc:
            return f"{parts.scheme}://{parts.netloc}"
    return ""


def service_root(env: Mapping[str, str], name: str, model: Mapping[str, Any]) -> str | None:
    """``<origin>/<prefix>/`` of hub service ``name`` (its routes are under it), or None when no origin is known.

    The origin is the service's own ``url`` (reachable from user servers, docs/jupyterhub.md), else the
    hub's public address (through the proxy). The hub shows the exact prefix only to tokens with
    ``read:services``, so the conventional ``{base_url}services/<name>/`` stands in for it.
    """
    base = env.get("JUPYTERHUB_BASE_URL", "/") or "/"
    prefix = model.get("prefix") or f"{base.rstrip('/')}/services/{name}/"
    origin = str(model.get("url") or "").strip().rstrip("/") or hub_public_origin(env)
    if not origin:
        return None
    return origin + "/" + str(prefix).strip("/") + "/"
