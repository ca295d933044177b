"""Operations routes: ``/health/ready`` (readiness) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from ..core.errors import Overloaded
from .handlers import RequestMixin
from .metrics import CONTENT_TYPE


def readiness(engine: Any, startup_models: tuple[str, ...], pending: set[str] | None = None, *,
              names: bool = True) -> str | None:
    """None when the engine can serve, else why not (shown to the caller); ``pending``: start-up models not
    loaded yet, whether or not their load has begun; ``names=False`` counts them instead of naming them."""
    if not engine.healthy:
        # (the next request for that model unloads the dead runner and loads the model afresh: loading.py, _load)
        return "An engine thread has died; the next request for its model loads the model again."
    if not engine.started:
        return "The engine is starting."
    loading = sorted({name for name in startup_models if engine.is_loading(name)} | set(pending or ()))
    if loading and not names:
        return f"Still loading {len(loading)} start-up model{'s' if len(loading) > 1 else ''}."
    if loading:
        return f"Still loading {', '.join(loading)}."
    return None


def finish_typed(handler: Any, body: str | bytes, content_type: str) -> Any:
    """Finish ``handler`` with ``body`` labelled ``content_type``.

    A base whose ``finish`` sets a content type of its own (Jupyter's APIHandler labels every body JSON)
    names the keyword that keeps this one in ``content_type_option``.
    """
    handler.set_header("Content-Type", content_type)
    option = getattr(handler, "content_type_option", None)
    return handler.finish(body, **({option: content_type} if option else {}))


class ReadyMixin(RequestMixin):
    """``GET /health/ready``: 200 when requests can be served now, else 503 saying why."""

    async def handle_get(self) -> None:
        """Readiness for load balancers and orchestrators."""
        c = self.xllm.config.engine
        startup = tuple(n for n in (c.default_model, *c.preload) if n)
        # this route needs no key: what the server is loading is named only to a caller whose credentials
        # would be accepted elsewhere (a probe needs the status code only; /v1/models names them too)
        known = getattr(self, "caller_known", None)
        names = known is not None and await known()
        why = readiness(self.xllm.engine, startup, self.xllm.startup_pending, names=names)
        if why is None:  # (no model names even then: /v1/models says what is loaded)
            self.write_json({"status": "ready"})
        else:
            self.write_json(Overloaded(why, code="not_ready").to_openai(), 503)


class MetricsMixin(RequestMixin):
    """``GET /metrics``: the Prometheus text exposition of this server's metrics."""

    async def handle_get(self) -> None:
        """Every metric, scraped now."""
        self.set_status(200)  # type: ignore[attr-defined]
        # (under Jupyter a plain finish() labelled it application/json, which Prometheus 3 refuses to scrape)
        finish_typed(self, self.xllm.metrics.exposition(), CONTENT_TYPE)


__all__ = ["ReadyMixin", "MetricsMixin", "readiness"]
