"""Clients for a running xllm server (sync and async), plus the in-process shortcut."""

from __future__ import annotations

from .aio import AsyncXllmClient
from .base import DEFAULT_BASE_URL, ServerUnavailable, resolve_base_url
from .client import XllmClient

__all__ = ["XllmClient", "AsyncXllmClient", "ServerUnavailable", "DEFAULT_BASE_URL", "resolve_base_url"]
