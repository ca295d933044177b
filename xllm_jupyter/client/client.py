"""Synchronous httpx client for a running xllm server (standalone or inside Jupyter)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping
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
from .sse_lines import sse_lines
from .thinking import Thinking, delta_thinking

Messages = Iterable[Mapping[str, Any]] | str


class XllmClient:
    """Talks to an xllm server: OpenAI routes under ``base_url``, admin routes beside them.

    ``base_url`` ends in ``/v1`` (``http://127.0.0.1:8900/v1`` or
    ``http://host:8888/{base_url}xllm/v1``); it and ``api_key`` default to
    ``XLLM_BASE_URL`` / ``XLLM_API_KEY`` (the key only for the server ``XLLM_BASE_URL`` names: a client for
    another sends none unless given one). Every failure is raised as an ``XllmError``.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: httpx.Timeout | float = DEFAULT_TIMEOUT):
        self.base_url = resolve_base_url(base_url)
        self.root_url = root_url(self.base_url)
        self.admin_url = self.root_url + "/admin"
        self.api_key = api_key if api_key is not None else env_key_for(base_url)
        self._http = httpx.Client(headers=auth_headers(self.api_key), timeout=timeout)
        self._probe = probe_timeout(timeout)
        self._load = load_timeout(timeout)
        #: the last stream's finish reason and usage (``stream_chunks``)
        self.last_finish_reason: str | None = None
        self.last_usage: dict[str, Any] = {}

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def __enter__(self) -> "XllmClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, **kw: Any) -> Any:
        try:
            response = self._http.request(method, url, **kw)
        except httpx.TransportError as exc:
            raise unreachable(self.root_url, exc) from None
        return json_body(response, self.root_url)

    @contextmanager
    def _stream(self, url: str, body: dict[str, Any], timeout: httpx.Timeout | None = None,
                missing: XllmError | None = None) -> Iterator[httpx.Response]:
        """POST ``body`` and hold the SSE response open; ``missing`` is raised for a 404 instead of the server's error."""
        answered = False  # (a transport error once the response's head came is no scheme problem)
        try:
            with self._http.stream("POST", url, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT) as response:
                answered = True
                if not is_event_stream(response):
                    response.read()
                    raise stream_error(response, self.root_url, missing)
                yield response  # a transport error while it is read lands in the except below
        except httpx.TransportError as exc:
            raise unreachable(self.root_url, exc, answered) from None

    def _events(self, url: str, body: dict[str, Any], timeout: httpx.Timeout | None = None,
                missing: XllmError | None = None) -> Iterator[dict[str, Any]]:
        """The JSON events of a streamed POST, until ``[DONE]``; closing the iterator closes the response."""
        with self._stream(url, body, timeout, missing) as response:
            for line in sse_lines(response.iter_text()):  # (split at CR, LF, CRLF only: sse_lines.py)
                event = parse_sse_line(line)
                if event is DONE:
                    return
                if event is not None:
                    yield event
        raise cut_short(self.root_url)

    # -------------------------------------------------------------------- models
    def health(self) -> dict[str, Any]:
        """The server's ``/health`` body."""
        return self._request("GET", self.root_url + "/health", timeout=self._probe) or {}

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: every model the server can serve."""
        return (self._request("GET", self.base_url + "/models", timeout=self._probe) or {}).get("data", [])

    def server_version(self) -> str | None:
        """The server's version, as ``GET /v1/models`` says it to any caller (None from servers that do not)."""
        body = self._request("GET", self.base_url + "/models", timeout=self._probe) or {}
        version = (body.get("xllm") or {}).get("server_version") if isinstance(body, dict) else None
        return version if isinstance(version, str) else None

    def model(self, name: str) -> dict[str, Any]:
        """``GET /v1/models/{name}``: one model's entry; ``ModelNotFound`` when the server has none by that name."""
        # a quick look-up like the listing (widgets ask it while being built): the probe timeout, not a generation's
        return self._request("GET", self.base_url + "/models/" + quote(name, safe=""), timeout=self._probe) or {}

    def loaded(self) -> list[dict[str, Any]]:
        """``GET /admin/models``: the models in memory now (id, backend, details)."""
        body = self._request("GET", self.admin_url + "/models", timeout=self._probe)
        return body.get("data", []) if isinstance(body, dict) else list(body or [])

    def load(self, name: str, keep_alive: float | str | None = None) -> dict[str, Any]:
        """Load ``name`` on the server; returns its ``/v1/models`` entry.

        ``keep_alive`` (seconds or a duration like ``"5m"``; 0 unloads it once idle, negative keeps it loaded) sets
        how long it stays loaded once idle, as Ollama's load request does; None: the server's default.
        A key that may not load models (a user key where admin keys exist: 403) only
        checks that ``name`` exists; its first request loads it (``xllm.loaded`` says so).
        """
        body = {"model": name, **({"keep_alive": keep_alive} if keep_alive is not None else {})}
        try:
            return self._request("POST", self.admin_url + "/models/load", json=body, timeout=self._load) or {}
        except PermissionDenied:
            # user keys may chat but not manage models: failing here would block `xllm run`
            return self.model(name)

    def unload(self, name: str, removed: bool = False, wait_for_load: bool = False) -> dict[str, Any]:
        """Unload ``name`` on the server (returns the server's reply). ``removed``: the caller is removing it from the
        server's store, so the requests the unload cuts end with a 404 saying so (``xllm rm``), not a 503 to retry.
        ``wait_for_load``: a load of it under way ends first, then it is unloaded (``xllm stop``); without it such a
        load only reads its files again (``"unloaded": false``)."""
        body = {"model": name, **({"removed": True} if removed else {}), **({"wait_for_load": True} if wait_for_load else {})}
        # (a wait lasts as long as a load may: the load timeout)
        try:
            return self._request("POST", self.admin_url + "/models/unload", json=body,
                                 **({"timeout": self._load} if wait_for_load else {})) or {}
        except InvalidRequest as exc:
            if not (wait_for_load and refuses_field(exc, "wait_for_load")):
                raise
        # a server older than wait_for_load: a plain unload (as before it, a model still loading is not waited for)
        plain = {"model": name, **({"removed": True} if removed else {})}
        return self._request("POST", self.admin_url + "/models/unload", json=plain) or {}

    def remove(self, name: str) -> dict[str, Any]:
        """``DELETE /v1/models/{name}``: remove ``name`` from the server's store, as ``xllm rm`` does (admins only).

        The server unloads it first; returns ``{"id", "object": "model", "deleted": True}``. ``ModelNotFound``
        when the store has no such model, ``PermissionDenied`` for a key that is not an admin's.
        """
        return self._request("DELETE", self.base_url + "/models/" + quote(name, safe="")) or {}

    def pull(self, source: str, name: str | None = None, revision: str | None = None, force: bool = False,
             convert: bool = False, base: str | None = None) -> Iterator[dict[str, Any]]:
        """``POST /admin/models/pull``: pull ``source`` into the server's store, yielding its events.

        Progress events (``status``, ``file``, ``completed``, ``total``, ``unit`` when not bytes, ``stage``
        when it is not ``status``: "copy" for a local source, whose status says "download") come first,
        then ``{"status": "success", "id", "digest", "format", "size", ...}``. A failed
        pull raises the XllmError the server reports; closing the iterator early stops the pull.
        ``base`` names the stored model a LoRA adapter applies to (as ``xllm pull --base``); the
        server answers ``ModelNotFound`` (param ``base``) when it has no such model.
        """
        body = pull_body(source, name, revision, force, convert, base)
        yield from self._events(self.admin_url + "/models/pull", body, timeout=PULL_TIMEOUT, missing=cannot_pull())

    def manifest(self, name: str | None = None) -> dict[str, Any]:
        """``GET /admin/models/manifest``: a stored model's digest and source, and the server version (only that without ``name``)."""
        body = self._request("GET", self.admin_url + "/models/manifest", params={"model": name} if name else None)
        return body if isinstance(body, dict) else {}

    def metrics_text(self) -> str:
        """``GET /metrics``: the server's Prometheus text exposition."""
        try:
            response = self._http.get(self.root_url + "/metrics")
        except httpx.TransportError as exc:
            raise unreachable(self.root_url, exc) from None
        if response.status_code >= 300:
            json_body(response, self.root_url)  # raises the error the response stands for
        return response.text

    def default_model(self, listing: list[dict[str, Any]] | None = None) -> str | None:
        """``XLLM_MODEL``, else a loaded chat model, else the server's default, else the first servable chat model.

        One ``/v1/models`` call, which any key may make (``listing``: its data, when the caller
        has it already): its entries say which models are loaded, what each serves (embedding
        models are skipped) and which is the server's ``engine.default_model`` (``xllm.details.default``).
        """
        return os.environ.get("XLLM_MODEL") or pick_default_model(self.models() if listing is None else listing)

    def _model(self, model: str | None) -> str:
        """``model``, else the one ``default_model()`` picks (a request must name one)."""
        picked = model or self.default_model()
        if not picked:
            raise no_chat_model()
        return picked

    # ---------------------------------------------------------------------- chat
    def chat_completion(self, messages: Messages, model: str | None = None, **params: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions`` (not streamed): the whole response body (no ``model``: ``default_model()``)."""
        body = chat_body(messages, self._model(model), False, params)
        # nothing comes back before the whole answer: a model load, a wait in the shared queue and every token (a
        # stream's keep-alives come every few seconds). A generation's 300 s ended a long one in "did not answer in
        # time", and the server dropped it: it waits as a load does
        return self._request("POST", self.base_url + "/chat/completions", json=body, timeout=self._load)

    def chat(self, messages: Messages, model: str | None = None, **params: Any) -> str:
        """The assistant's reply text for ``messages``."""
        return message_text(self.chat_completion(messages, model, **params))

    def stream_chunks(self, messages: Messages, model: str | None = None, **params: Any) -> Iterator[dict[str, Any]]:
        """Every chunk of a streamed chat completion, until ``[DONE]``.

        Closing the iterator early closes the HTTP response, so the server cancels the job. The stream's finish reason
        and usage (where it asked for it) are kept as ``last_finish_reason`` and ``last_usage``, as the in-process
        engine's ``LocalChat`` keeps its usage: a front-end says why a reply gave no answer from them.
        """
        self.last_finish_reason, self.last_usage = None, {}
        events = self._events(self.base_url + "/chat/completions", chat_body(messages, self._model(model), True, params))
        try:
            for chunk in events:
                choices = chunk.get("choices") or ()
                if choices and choices[0].get("index", 0) == 0 and choices[0].get("finish_reason"):
                    self.last_finish_reason = choices[0]["finish_reason"]
                if isinstance(chunk.get("usage"), dict):
                    self.last_usage = chunk["usage"]
                yield chunk
        finally:
            events.close()  # at once (not when collected): the HTTP response closes, the server cancels the job

    def stream_chat(self, messages: Messages, model: str | None = None, *, thinking: bool = False,
                    **params: Any) -> Iterator[str]:
        """The reply's text pieces as they are generated (close the iterator to cancel); with ``thinking``, a
        reasoning model's thinking too, as ``Thinking`` pieces (else it is left out: it is not the answer), and the
        usage asked for (``last_usage``: a reply all thinking says how many tokens it spent)."""
        if thinking:
            params.setdefault("stream_options", {"include_usage": True})
        chunks = self.stream_chunks(messages, model, **params)
        try:
            for chunk in chunks:
                thought = delta_thinking(chunk) if thinking else ""
                if thought:
                    yield Thinking(thought)
                text = delta_text(chunk)
                if text:
                    yield text
        finally:
            chunks.close()

