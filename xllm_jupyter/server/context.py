"""The shared context every handler reads from the app settings: engine, serving layers, metrics, usage, config."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..core.config import XllmConfig
from ..openai.responses import ResponsesServing
from ..openai.serving import OpenAIServing
from .metrics import ServerMetrics

#: key of the XllmContext in the Tornado application settings
CONTEXT_KEY = "xllm_context"
#: settings key of a callable giving ``/health`` more public facts (the Jupyter extension: which engine serves)
HEALTH_FACTS_KEY = "xllm_health_facts"


class XllmContext:
    """What every handler needs: the engine, its OpenAI serving layer and the config."""

    def __init__(self, engine: Any, config: XllmConfig, *, shared_usage: bool = False):
        self.engine = engine
        self.config = config
        self.serving = OpenAIServing(engine, config.server, config.cache, config.engine.default_max_tokens)
        self.metrics = ServerMetrics(engine, self.serving.cache)
        from .usage import UsageTracker  # usage.py builds on handlers.py, which imports this module
        from .usage_file import usage_path

        #: per-user quotas and usage (server/usage.py); generations are charged to their user.
        #: ``shared_usage`` (the hub service) keeps usage across restarts with ``usage_file: auto``
        self.usage = UsageTracker(config.quotas, self.metrics.registry, path=usage_path(config, shared=shared_usage))
        self.usage.queues = getattr(engine, "user_counts", None)  # each user's running/queued sequences
        # counts tokens and loads, and charges each finished generation to its user
        self.serving.engine = self.metrics.observed(engine, self.usage.charge_generation, hold=self.usage.hold_generation)
        self.serving.share_prefix_cache = config.quotas.share_prefix_cache
        self.responses = ResponsesServing(self.serving)
        #: the standalone server's per-key Limiter (server/limits.py); None in Jupyter
        self.limiter: Any = None
        #: requests being handled now (a shutdown lets them write their last words before closing connections)
        self.active = 0
        #: models the server still loads at start (``xllm serve -m``), for /health/ready; None: the config's
        #: default_model and preload, as far as the engine is loading them
        self.startup_pending: set[str] | None = None

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled (False: ``timeout`` s passed first)."""
        deadline = time.monotonic() + timeout
        while self.active:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    def close(self) -> None:
        """The server stops: save usage one last time (blocking file I/O: call it off the IOLoop)."""
        self.usage.close()
