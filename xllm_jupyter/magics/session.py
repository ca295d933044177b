"""What the magics remember in one kernel: the server, the chosen model, defaults, the conversation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..client import XllmClient, discovery
from ..core.errors import XllmError
from .render import FORMATS, error

log = logging.getLogger("xllm_jupyter.magics")

#: settings `%xllm config key=value` may change, with their parsers
CONFIG_KEYS = ("model", "system", "temperature", "max_tokens", "format", "stream")


@dataclass
class Defaults:
    """Per-kernel defaults for ``%%xllm`` options (``%xllm config``, ``%xllm use``)."""

    model: str | None = None
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    format: str = "markdown"
    stream: bool = True

    def set(self, key: str, raw: str) -> None:
        """Set ``key`` from its text form; XllmError naming the key on a bad value."""
        key = key.replace("-", "_")
        if key not in CONFIG_KEYS:
            raise XllmError(f"unknown setting {key!r}; settings are: {', '.join(CONFIG_KEYS)}")
        value: Any = raw.strip()
        if value.lower() in ("", "none", "default"):
            setattr(self, key, Defaults.__dataclass_fields__[key].default)
            return
        try:
            if key == "temperature":
                value = float(value)
                if not math.isfinite(value):  # float() takes "nan" and "inf", which no request can carry (JSON)
                    raise ValueError
            elif key == "max_tokens":
                value = int(value)
                if value < 1:
                    raise ValueError
            elif key == "stream":
                if value.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                    raise ValueError
                value = value.lower() in ("true", "yes", "on", "1")
            elif key == "format" and value not in FORMATS:
                raise ValueError
        except ValueError:
            raise XllmError(f"bad value for {key}: {raw!r}") from None
        setattr(self, key, value)


@dataclass
class Conversation:
    """The notebook's ``--chat`` conversation: user/assistant turns, their system prompt and model."""

    messages: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None
    model: str | None = None

    def clear(self) -> None:
        """Forget every turn."""
        self.messages.clear()
        self.system = None
        self.model = None

    @property
    def turns(self) -> int:
        """Completed user/assistant exchanges."""
        return sum(1 for m in self.messages if m["role"] == "assistant")


class MagicState:
    """One per magics instance (so per kernel, so per notebook)."""

    def __init__(self) -> None:
        self.defaults = Defaults()
        self.chat = Conversation()
        self.location: discovery.ServerLocation | None = None
        self._client: XllmClient | None = None
        self._about: dict[tuple[str, str | None], dict[str, Any]] = {}

    # ------------------------------------------------------------- the server
    def locate(self) -> discovery.ServerLocation:
        """Where to send requests now (discovery runs every time: env and connect() may change)."""
        return discovery.locate(start_local=True, announce=error)

    def client(self) -> XllmClient:
        """The client for the current location (rebuilt when it changes)."""
        location = self.locate()
        if self._client is None or location != self.location:
            self.drop_client()
            self._client = discovery.client_for(location)
            self.location = location
        return self._client

    def drop_client(self) -> None:
        """Close the pooled connections (an interrupted request's connection among them)."""
        # let go of it first: an interrupt inside its close left this kernel holding a closed client, and every
        # later cell failed with "Cannot send a request, as the client has been closed"
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def about(self, model: str | None) -> dict[str, Any]:
        """The model's digest, or without a model the server version (cached); ``{}`` where the server does not say.

        A digest is asked each time: a pull can replace the model under its name at any moment (``%xllm pull
        --force``, ``xllm pull`` in a terminal), and a kept one recorded the replaced model's in later answers.
        """
        client = self.client()
        key = (client.base_url, model)
        if key not in self._about:
            try:
                # routes every caller may read (the manifest route is the admins'): a hub user is rarely one
                if model is not None:
                    digest = (client.model(model).get("xllm") or {}).get("digest")
                    return {"digest": digest} if isinstance(digest, str) and digest else {}
                version = client.server_version()
                self._about[key] = {"server_version": version} if version else {}
            except XllmError as exc:  # a model the server does not know, a server still waiting for the hub
                log.debug("no facts for %s: %s", model, exc.message)
                if exc.status == 503 or model is not None:  # busy, or a Jupyter server still waiting for the hub
                    return {}
                self._about[key] = {}
        return self._about[key]

    def default_model(self) -> str | None:
        """``%xllm use`` / config model, else the client's default (XLLM_MODEL, a loaded chat model, the server's default...)."""
        return self.defaults.model or self.client().default_model()

    def close(self) -> None:
        """Release connections."""
        self.drop_client()


def provenance(state: MagicState, *, model: str | None, params: dict[str, Any], finish_reason: str | None,
               usage: dict[str, Any] | None, fingerprint: str | None, fmt: str, chat_turn: int | None,
               interrupted: bool) -> dict[str, Any]:
    """What produced an answer, kept in the output's metadata so a notebook records it."""
    try:
        about, server = state.about(model), state.about(None)
    except KeyboardInterrupt:  # an interrupt once the answer came: keep the answer, without the facts being fetched
        about, server = {}, {}
    location = state.location
    return {
        "model": model,
        "digest": about.get("digest"),
        "parameters": {k: v for k, v in params.items() if v is not None and k not in ("seed", "stream_options")},
        "seed": params.get("seed"),
        "format": fmt,
        "finish_reason": "interrupted" if interrupted else finish_reason,
        "usage": usage,
        "system_fingerprint": fingerprint,
        "server_version": server.get("server_version"),
        "server": {"url": location.base_url, "source": location.source} if location else None,
        "client_version": __version__,
        "chat_turn": chat_turn,
    }
