"""Clients for a running xllm server (sync and async), plus the in-process shortcut."""

from __future__ import annotations

from .aio import AsyncXllmClient
from .base import DEFAULT_BASE_URL, ServerUnavailable, resolve_base_url
from .client import XllmClient
from .discovery import (
    ServerLocation,
    connect,
    find_server,
    get_async_client,
    get_client,
    locate,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "AsyncXllmClient",
    "ServerLocation",
    "ServerUnavailable",
    "XllmClient",
    "connect",
    "find_server",
    "get_async_client",
    "get_client",
    "locate",
    "resolve_base_url",
]
