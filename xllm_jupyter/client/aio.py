"""Asynchronous twin of XllmClient, for code that already runs an event loop."""

from __future__ import annotations

import os
from typing import Any, AsyncIterator
from urllib.parse import quote

import httpx

from ..core.errors import InvalidRequest, PermissionDenied, XllmError
from .base import (
    DEFAULT_TIMEOUT,
    DONE,
    PULL_TIMEOUT,
    auth_headers,
    cannot_pull,
    chat_body,
    cut_short,
    delta_text,
    env_key_for,
    is_event_stream,
    json_body,
    load_timeout,
    message_text,
    no_chat_model,
    parse_sse_line,
    pick_default_model,
    probe_timeout,
    pull_body,
    refuses_field,
    resolve_base_url,
    root_url,
    stream_error,
    unreachable,
)
from .client import Messages
from .sse_lines import asse_lines


class AsyncXllmClient:
    """Async version of ``XllmClient`` with the same URLs, errors and methods."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, *, max_connections: int = 100):
        self.base_url = resolve_base_url(base_url)
        self.root_url = root_url(self.base_url)
        self.admin_url = self.root_url + "/admin"
        self.api_key = api_key if api_key is not None else env_key_for(base_url)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(headers=auth_headers(self.api_key), timeout=timeout, limits=limits)
        self._probe = probe_timeout(timeout)
        self._load = load_timeout(timeout)

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncXllmClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(self, method: str, url: str, **kw: Any) -> Any:
        try:
            response = await self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise unreachable(self.root_url, exc) from None
        return json_body(response, self.root_url)

    async def _events(self, url: str, body: dict[str, Any], timeout: httpx.Timeout | None = None,
                      missing: XllmError | None = None) -> AsyncIterator[dict[str, Any]]:
        """The JSON events of a streamed POST, until ``[DONE]``; ``missing`` is raised for a 404 instead of the server's error."""
        answered = False  # (a transport error once the response's head came is no scheme problem)
        try:
            async with self._http.stream("POST", url, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT) as response:
                answered = True
                if not is_event_stream(response):
                    await response.aread()
                    raise stream_error(response, self.root_url, missing)
                async for line in asse_lines(response.aiter_text()):  # (split at CR, LF, CRLF only: sse_lines.py)
                    event = parse_sse_line(line)
                    if event is DONE:
                        return
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise unreachable(self.root_url, exc, answered) from None
        raise cut_short(self.root_url)

    async def health(self) -> dict[str, Any]:
        """The server's ``/health`` body."""
        return await self._request("GET", self.root_url + "/health", timeout=self._probe) or {}

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: every model the server can serve."""
        return (await self._request("GET", self.base_url + "/models", timeout=self._probe) or {}).get("data", [])

    async def default_model(self) -> str | None:
        """The model a chat without one uses (as ``XllmClient.default_model``)."""
        return os.environ.get("XLLM_MODEL") or pick_default_model(await self.models())

    async def _model(self, model: str | None) -> str:
        picked = model or await self.default_model()
        if not picked:
            raise no_chat_model()
        return picked

    async def model(self, name: str) -> dict[str, Any]:
        """``GET /v1/models/{name}``: one model's entry; ``ModelNotFound`` when unknown."""
        # a quick look-up like the listing: the probe timeout, not a generation's
        return await self._request("GET", self.base_url + "/models/" + quote(name, safe=""), timeout=self._probe) or {}

    async def loaded(self) -> list[dict[str, Any]]:
        """``GET /admin/models``: the models in memory now."""
        body = await self._request("GET", self.admin_url + "/models", timeout=self._probe)
        return body.get("data", []) if isinstance(body, dict) else list(body or [])

    async def load(self, name: str, keep_alive: float | str | None = None) -> dict[str, Any]:
        """Load ``name`` on the server (``keep_alive``: as ``XllmClient.load``); a key that may not (403) only checks that it exists."""
        body = {"model": name, **({"keep_alive": keep_alive} if keep_alive is not None else {})}
        try:
            return await self._request("POST", self.admin_url + "/models/load", json=body, timeout=self._load) or {}
        except PermissionDenied:  # a user key: the first request loads the model
            return await self.model(name)

    async def unload(self, name: str, wait_for_load: bool = False) -> dict[str, Any]:
        """Unload ``name`` on the server (``wait_for_load``: as ``XllmClient.unload``)."""
        body = {"model": name, **({"wait_for_load": True} if wait_for_load else {})}
        try:
            return await self._request("POST", self.admin_url + "/models/unload", json=body,
                                       **({"timeout": self._load} if wait_for_load else {})) or {}
        except InvalidRequest as exc:
            if not (wait_for_load and refuses_field(exc, "wait_for_load")):
                raise
        # a server older than wait_for_load: a plain unload
        return await self._request("POST", self.admin_url + "/models/unload", json={"model": name}) or {}

    async def remove(self, name: str) -> dict[str, Any]:
        """``DELETE /v1/models/{name}``: remove ``name`` from the server's store (admins; as ``XllmClient.remove``)."""
        return await self._request("DELETE", self.base_url + "/models/" + quote(name, safe="")) or {}

    async def pull(self, source: str, name: str | None = None, revision: str | None = None, force: bool = False,
                   convert: bool = False, base: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """``POST /admin/models/pull``: the pull's progress events, then ``{"status": "success", ...}`` (as ``XllmClient.pull``)."""
        body = pull_body(source, name, revision, force, convert, base)
        events = self._events(self.admin_url + "/models/pull", body, timeout=PULL_TIMEOUT, missing=cannot_pull())
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()  # leaving early stops the pull on the server

    async def manifest(self, name: str | None = None) -> dict[str, Any]:
        """``GET /admin/models/manifest``: a stored model's digest and source, and the server version."""
        body = await self._request("GET", self.admin_url + "/models/manifest", params={"model": name} if name else None)
        return body if isinstance(body, dict) else {}

    async def metrics_text(self) -> str:
        """``GET /metrics``: the server's Prometheus text exposition."""
        try:
            response = await self._http.get(self.root_url + "/metrics")
        except httpx.TransportError as exc:
            raise unreachable(self.root_url, exc) from None
        if response.status_code >= 300:
            json_body(response, self.root_url)  # raises the error the response stands for
        return response.text

    async def chat(self, messages: Messages, model: str | None = None, **params: Any) -> str:
        """The assistant's reply text for ``messages``."""
        body = chat_body(messages, await self._model(model), False, params)
        # nothing comes back before the whole answer (a load, the queue, every token): it waits as a load does
        return message_text(await self._request("POST", self.base_url + "/chat/completions", json=body, timeout=self._load))

    async def stream_chunks(self, messages: Messages, model: str | None = None, **params: Any) -> AsyncIterator[dict[str, Any]]:
        """Every chunk of a streamed chat completion; ``aclose()`` it to cancel on the server."""
        events = self._events(self.base_url + "/chat/completions", chat_body(messages, await self._model(model), True, params))
        try:
            async for chunk in events:
                yield chunk
        finally:
            await events.aclose()  # closes the HTTP response at once, so the server cancels the job

    async def stream_chat(self, messages: Messages, model: str | None = None, **params: Any) -> AsyncIterator[str]:
        """The reply's text pieces as they are generated."""
        chunks = self.stream_chunks(messages, model, **params)
        try:
            async for chunk in chunks:
                text = delta_text(chunk)
                if text:
                    yield text
        finally:
            await chunks.aclose()
