"""Turn the ``client=`` argument of the notebook API into a client (or an endpoint).

Accepted: an ``XllmClient`` or ``AsyncXllmClient``, a ``(base_url, api_key)`` pair, a
base URL string, or anything with ``base_url`` and ``api_key`` attributes (an openai SDK
client, say). ``None`` asks ``xllm_jupyter.client.discovery`` for the server this
kernel should use, falling back to ``XLLM_BASE_URL`` / ``XLLM_API_KEY``.
"""

from __future__ import annotations

from typing import Any

from ..client import AsyncXllmClient, XllmClient
from ..client.base import ServerUnavailable, can_chat, env_key_for, listed
from ..core.errors import InvalidRequest, ModelNotFound, XllmError

ClientLike = Any  # XllmClient | AsyncXllmClient | tuple[str, str | None] | str | None


def discovered_client() -> XllmClient:
    """A new client for the server discovery picks for this kernel (env/default settings without it).

    Discovery may start a private server when none is found (``locate``), so this is
    only called when the caller passed no ``client=``.
    """
    try:
        from ..client import discovery  # written separately; optional until it lands
    except ImportError:
        return XllmClient()
    return discovery.get_client()


def endpoint_of(client: ClientLike) -> tuple[str, str | None]:
    """``(base_url, api_key)`` of whatever ``client`` names."""
    if client is None:
        found = discovered_client()
        try:
            return found.base_url, found.api_key
        finally:
            found.close()
    if isinstance(client, (XllmClient, AsyncXllmClient)):
        return client.base_url, client.api_key
    if isinstance(client, str):
        return client, _env_key_for(client)
    if isinstance(client, (tuple, list)) and len(client) in (1, 2) and isinstance(client[0], str):
        key = client[1] if len(client) == 2 else None
        return client[0], (str(key) if key else _env_key_for(client[0]))
    base = getattr(client, "base_url", None)
    if base is not None:
        return str(base), (getattr(client, "api_key", None) or _env_key_for(str(base)))
    raise InvalidRequest(
        f"client= takes an XllmClient, an AsyncXllmClient or a (base_url, api_key) pair, not {type(client).__name__}",
        param="client",
    )


def _env_key_for(url: str) -> str:
    """The key for a server named without one: ``XLLM_API_KEY`` where ``XLLM_BASE_URL`` names the same server, else
    none ("", which no client reads as "ask the environment")."""
    return env_key_for(url) or ""


def sync_client(client: ClientLike) -> tuple[XllmClient, bool]:
    """An ``XllmClient`` for ``client`` and whether the caller owns (and must close) it."""
    if isinstance(client, XllmClient):
        return client, False
    if client is None:
        return discovered_client(), True  # discovery hands out a new client each time
    base, key = endpoint_of(client)
    return XllmClient(base, key), True


def async_client(client: ClientLike, max_connections: int = 100) -> AsyncXllmClient:
    """A fresh ``AsyncXllmClient`` for the same server, owned by the caller.

    Always fresh: an httpx async client belongs to the loop that first used it, and the
    notebook API runs its streams on a loop of its own.
    """
    base, key = endpoint_of(client)
    return AsyncXllmClient(base, key, max_connections=max_connections)


def pick_model(model: str | None, client: XllmClient) -> str:
    """``model``, else ``XllmClient.default_model`` (``XLLM_MODEL``, a loaded chat model, the server's default, a servable chat model)."""
    if model is not None:
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequest("model must be a non-empty model name", param="model")
        return model
    found = client.default_model()
    if not found:
        raise XllmError("the server has no model to use: pass model=... (see `xllm list`)")
    return found


def unknown_models(client: Any, names: list[str], options: list[str]) -> str | None:
    """A status line naming each of ``names`` the server cannot chat with, and the ones it can; None if all can.

    A name missing from ``options`` (the server's chat models) is asked of ``GET /v1/models/{name}``,
    so the server's own spelling rules decide (``NAME:latest``, case); only its clear "no such model"
    or an entry saying it is not for chat (an embedding model) counts against it.
    """
    missing, not_chat = [], []
    for name in names:
        if not name or name in options:
            continue
        try:
            entry = client.model(name)
        except ModelNotFound:
            missing.append(name)
            continue
        except ServerUnavailable:  # no answer (a hung server: each look-up would wait its timeout out): ask no more
            break
        except XllmError:  # busy: the first request will say what is wrong
            continue
        if not can_chat(entry):
            not_chat.append(name)
    if not missing and not not_chat:
        return None
    problems = []
    if missing:
        problems.append(f"The server has no model {', '.join(map(repr, missing))}")
    if not_chat:
        problems.append(f"{', '.join(map(repr, not_chat))} {'is not a chat model' if len(not_chat) == 1 else 'are not chat models'}")
    have = f"chat models: {listed(options)}" if options else "it has no chat models (pull one: `%xllm pull smollm2`)"
    return "; ".join(problems) + f" — {have}."


def entry_defaults(entry: Any) -> dict[str, float]:
    """A ``/v1/models`` entry's numeric ``xllm.defaults``: what a request leaving them unset gets ({} if not said)."""
    xllm = entry.get("xllm") if isinstance(entry, dict) else None
    said = xllm.get("defaults") if isinstance(xllm, dict) else None
    if not isinstance(said, dict):  # an older server, or another OpenAI-compatible one
        return {}
    return {k: v for k, v in said.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def listed_defaults(client: Any) -> dict[str, dict[str, float]]:
    """Each listed model's ``entry_defaults``, from one ``GET /v1/models`` ({} when the server cannot be asked)."""
    try:
        listing = client.models()
    except XllmError:
        return {}
    return {m["id"]: entry_defaults(m) for m in listing if isinstance(m, dict) and isinstance(m.get("id"), str)}
