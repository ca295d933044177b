"""``xllm_jupyter.chat``: one call from a script or notebook cell to the shared engine."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..client import XllmClient
from ..core.errors import InvalidRequest
from .clients import ClientLike, pick_model, sync_client
from .streams import build_messages


def chat(
    prompt: str | Sequence[Mapping[str, Any]],
    model: str | None = None,
    *,
    system: str | None = None,
    stream: bool = False,
    client: ClientLike = None,
    **params: Any,
) -> str | Iterator[str]:
    """Ask ``model`` (default: the server's) and return the reply text.

    ``prompt`` is a string or OpenAI-style messages; ``system`` is put first.
    ``params`` are OpenAI chat parameters (``max_tokens``, ``temperature``, ``stop``...).
    With ``stream=True`` the text comes back piece by piece as an iterator; closing it
    early (or breaking out of the loop) cancels the generation on the server.
    Errors are raised as ``XllmError`` with the server's message; ``n`` above 1 is an ``InvalidRequest``.
    """
    if params.get("n") not in (None, 1):
        # one reply's text is all this returns: the engine, shared, would generate the others only to be dropped
        # (a stream mixed them before f0205e1, then kept the first alone)
        raise InvalidRequest(f"chat() returns one reply, so n must be 1 (got {params['n']!r}); every choice comes "
                             "from XllmClient.chat_completion / stream_chunks or the openai SDK", param="n")
    messages = build_messages(prompt, system)
    c, owned = sync_client(client)
    try:
        name = pick_model(model, c)
        if stream:
            # A client made for this call is closed now (the finally below; picking the model may have opened a
            # connection) and the stream opens its own on its first read: a stream never read holds nothing open.
            # A generator closed or dropped unread never runs its body, so it could not close one it was handed.
            return _stream(c if not owned else (c.base_url, c.api_key), messages, name, params)
        return c.chat(messages, name, **params)
    finally:
        if owned:
            c.close()


def _stream(client: XllmClient | tuple[str, str | None], messages: list[dict[str, Any]], model: str,
            params: dict[str, Any]) -> Iterator[str]:
    """The reply's pieces, through ``client``, or a client of its own for ``(base_url, api_key)`` that is made on
    the first read and closed with the stream."""
    owned = not isinstance(client, XllmClient)
    c = XllmClient(*client) if owned else client
    try:
        yield from c.stream_chat(messages, model, **params)
    finally:
        if owned:
            c.close()
