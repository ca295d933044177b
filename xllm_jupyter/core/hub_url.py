"""Where a JupyterHub service answers, from the hub API's model of it and the spawner's variables.

Kernels (client/discovery.py) and the Jupyter extension (extension/hub_lookup.py) both turn
``GET {JUPYTERHUB_API_URL}/services/<name>`` into the service's URL root; one reading keeps
them pointed at the same place.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

#: where the spawner tells a single-user server (and its kernels) the hub's public address, best first
PUBLIC_KEYS = ("JUPYTERHUB_PUBLIC_HUB_URL", "JUPYTERHUB_PUBLIC_URL", "JUPYTERHUB_HOST")
#: with ``c.JupyterHub.internal_ssl`` the hub API is https and wants a client certificate: the spawner
#: hands each server (and a managed service) its certificate, key and the CA bundle it should trust
TLS_KEYS = ("JUPYTERHUB_SSL_CERTFILE", "JUPYTERHUB_SSL_KEYFILE", "JUPYTERHUB_SSL_CLIENT_CA")
#: what a TLS failure with the hub API points at (docs/jupyterhub.md)
TLS_HINT = ("with JupyterHub's internal_ssl, calls to the hub API need JUPYTERHUB_SSL_CERTFILE, JUPYTERHUB_SSL_KEYFILE "
            "and JUPYTERHUB_SSL_CLIENT_CA (docs/jupyterhub.md, 'Internal TLS')")


def hub_ssl_context(env: Mapping[str, str]) -> ssl.SSLContext | None:
    """A client TLS context with the spawner's certificate (``TLS_KEYS``) for an internal_ssl hub, or None without one.

    Raises OSError or ssl.SSLError when the files named cannot be read or do not hold a key pair.
    """
    certfile, keyfile, cafile = (env.get(key, "").strip() for key in TLS_KEYS)
    if not certfile or not keyfile:
        return None
    # the hub's certificate is signed by its own internal CA: trust that bundle (and the system's, for
    # a hub API behind a public certificate), check the host name, present our certificate
    context = ssl.create_default_context(cafile=cafile or None)
    if cafile:
        context.load_default_certs()
    context.load_cert_chain(certfile, keyfile)
    return context


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
