"""Prometheus metrics for one server: its own registry, so servers in one process never collide.

Request, latency and token metrics are recorded as requests run; engine-derived figures
(queue depth, per-model memory, response-cache counts, loads/unloads) are read when
``/metrics`` is scraped. Names and labels are documented in ``docs/metrics.md``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import aclosing
from contextvars import ContextVar
from typing import Any, AsyncIterator, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.types import Admission, ChoiceDelta, GenerationDone, Usage
from ..store.names import canonical_name
from .limits import note_stream_tokens

log = logging.getLogger("xllm_jupyter.server")

#: the ``Content-Type`` of the text exposition format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: CPU tiny models answer in ms, big GPU models in seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class TokenClock:
    """One request's inter-token timing, per output token as vLLM's: each delta of a choice after its first observes
    the gap since that choice's previous delta once for each of its tokens, as gap / tokens.

    The engine merges the tokens made within ``engine.stream_interval_ms`` into one delta (several on a GPU), so
    the gaps between deltas or stream chunks are not per token; ``ObservedEngine`` counts each delta's tokens here.
    """

    __slots__ = ("itl", "made", "endpoint")

    def __init__(self, endpoint: str | None = None) -> None:
        #: the inter-token histogram (its endpoint's child) once the answer is a stream; None: nothing is observed
        self.itl: Any = None
        #: the model made a token for this request (a replay from the response cache makes none)
        self.made = False
        #: the route served (each finished generation's time per output token is observed under it); None: not observed
        self.endpoint = endpoint

    def tokens(self, last: dict[int, float], index: int, count: int, now: float) -> None:
        """``count`` tokens of choice ``index`` arrived at ``now`` (``last``: one generation's previous arrivals)."""
        self.made = True
        before = last.get(index)
        last[index] = now
        itl = self.itl
        if before is not None and itl is not None:
            per_token = (now - before) / count
            for _ in range(count):
                itl.observe(per_token)


#: the request served in this task; set before its serving call, so that the tasks the call starts (a stream's first
#: engine step, one per prompt of a legacy completion) time their deltas into the same clock
_token_clock: ContextVar[TokenClock | None] = ContextVar("xllm_token_clock", default=None)


def open_token_clock(endpoint: str | None = None) -> None:
    """Give this request's task a fresh ``TokenClock`` (of route ``endpoint``) before its serving call runs."""
    _token_clock.set(TokenClock(endpoint))


def note_span(spans: dict[int, list[float]], index: int, count: int, now: float) -> None:
    """``count`` tokens of choice ``index`` arrived at ``now``: ``spans`` keeps each choice's [first arrival, tokens in
    it, last arrival, tokens in all] for its time per output token."""
    span = spans.get(index)
    if span is None:
        spans[index] = [now, count, now, count]
    else:
        span[2] = now
        span[3] += count


def per_output_token(span: list[float]) -> float | None:
    """A choice's mean time per output token after its first delivery, as vLLM's request_time_per_output_token:
    the time from its first delta to its last over the tokens after the first delta (the engine sends the first
    token alone, so that is (tokens - 1)); None for a choice of one delivery."""
    first, first_count, last, total = span
    return (last - first) / (total - first_count) if total > first_count else None


def _has_content(chunk: dict[str, Any]) -> bool:
    """True for a chunk that carries generated text (a reasoning model's thinking too) or a tool or legacy function
    call (not role/finish/usage)."""
    choices = chunk.get("choices")
    if choices:
        c = choices[0]
        delta = c.get("delta")
        if delta is not None:
            return bool(delta.get("content") or delta.get("tool_calls") or delta.get("function_call") or delta.get("refusal")
                        or delta.get("reasoning_content"))
        return bool(c.get("text"))
    kind = chunk.get("type")  # Responses API typed events
    return isinstance(kind, str) and kind.endswith(".delta") and bool(chunk.get("delta"))


class ServerMetrics:
    """Every metric of one server, in one ``CollectorRegistry``."""

    def __init__(self, engine: Any, response_cache: Any = None):
        self.engine = engine
        self.response_cache = response_cache
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: the HTTP server's ConnectionGuard (standalone and hub; None under Jupyter), read at scrape
        self.connections: Any = None
        r.register(_EngineCollector(self))
        self.requests = Counter("xllm_requests", "HTTP requests finished, by route and status.", ("endpoint", "status"), registry=r)
        self.in_flight = Gauge("xllm_requests_in_flight", "HTTP requests being handled now.", registry=r)
        self.ttft = Histogram(
            "xllm_time_to_first_token_seconds", "Streamed requests: time to the first content chunk.", ("endpoint",), buckets=_TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "xllm_inter_token_latency_seconds", "Streamed requests: time per output token after the first.", ("endpoint",), buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "xllm_request_duration_seconds", "Generation requests: end-to-end time.", ("endpoint",), buckets=_E2E_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "xllm_request_time_per_output_token_seconds", "Finished generations: each choice's mean time per output "
            "token after its first.", ("endpoint",), buckets=_ITL_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("xllm_prompt_tokens", "Prompt tokens processed.", ("model",), registry=r)
        self.generation_tokens = Counter("xllm_generation_tokens", "Tokens generated.", ("model",), registry=r)
        self.prefix_hits = Counter("xllm_prefix_cache_hits", "Generations that reused cached prompt tokens.", ("model",), registry=r)
        self.prefix_misses = Counter("xllm_prefix_cache_misses", "Generations that reused no cached prompt tokens.", ("model",), registry=r)
        self.rate_limited = Counter("xllm_rate_limited", "Requests refused with 429, by API key id and limit.", ("key", "reason"), registry=r)
        self._children: dict[str, tuple[Any, Any, Any]] = {}

    # ---------------------------------------------------------------- recording
    def record_request(self, endpoint: str, status: int) -> None:
        """One finished HTTP request."""
        self.requests.labels(endpoint, str(status)).inc()

    def record_rate_limited(self, key_id: str, reason: str = "requests") -> None:
        """One request refused over ``key_id``'s limit (a ``Limiter`` listener)."""
        self.rate_limited.labels(key_id, reason).inc()

    def record_usage(self, model: str, usage: Any, prefix: bool = True) -> None:
        """Token counts of one generation; with ``prefix`` (it finished, so its cache count is known), cached
        prompt tokens count as a prefix hit and none as a miss."""
        # the model's one spelling, as the engine and the load/memory metrics name it: the request's own ("TINY",
        # "tiny:latest") split one model's counts over label values any client could multiply
        model = canonical_name(model)
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.generation_tokens.labels(model).inc(usage.completion_tokens)
        if prefix:
            (self.prefix_hits if usage.cached_tokens > 0 else self.prefix_misses).labels(model).inc()

    def _timers(self, endpoint: str) -> tuple[Any, Any, Any]:
        """Prebound histogram children: no label lookup per chunk."""
        t = self._children.get(endpoint)
        if t is None:
            t = self._children[endpoint] = (self.ttft.labels(endpoint), self.itl.labels(endpoint), self.e2e.labels(endpoint))
        return t

    def observe_duration(self, endpoint: str, seconds: float) -> None:
        """End-to-end time of one generation request."""
        self._timers(endpoint)[2].observe(seconds)

    def observe_time_per_output_token(self, endpoint: str, spans: Iterable[list[float]]) -> None:
        """One finished generation's choices (``note_span``'s spans): each one's mean time per output token."""
        child = self.tpot.labels(endpoint)
        for span in spans:
            seconds = per_output_token(span)
            if seconds is not None:
                child.observe(seconds)

    async def timed_stream(self, endpoint: str, stream: AsyncIterator[dict[str, Any]], start: float) -> AsyncIterator[dict[str, Any]]:
        """``stream`` unchanged, observing the time to its first content chunk if the model made it (a replay from the
        response cache answers in ~0 s without it: TTFT is the model's, as vLLM's); its inter-token latency is observed
        per token as the engine's deltas arrive (``TokenClock``), from now on."""
        ttft, itl, _ = self._timers(endpoint)
        clock = _token_clock.get()
        if clock is not None:
            clock.itl = itl
        first = True
        async with aclosing(stream):  # type: ignore[type-var]
            async for chunk in stream:
                if first and _has_content(chunk):
                    first = False
                    if clock is None or clock.made:
                        ttft.observe(time.perf_counter() - start)
                yield chunk

    # ----------------------------------------------------------- engine facts
    def observed(self, engine: Any, *on_done: Callable[[Any, Usage], None],
                 hold: Callable[[Any], Callable[[], None]] | None = None) -> "ObservedEngine":
        """``engine`` with token counts added (for the serving layer; the engine counts its own loads and unloads).

        ``on_done(request, usage)`` callbacks also see each generation's final usage (per-user
        accounting), so the token stream passes through one wrapper, not one per observer.
        ``hold(request)`` runs before each generation (it may refuse it by raising) and returns
        what to call when it ends (the daily quota's reservation).
        """
        return ObservedEngine(engine, self, on_done, hold)

    def exposition(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Figures read from the engine and the response cache at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        """Nothing up front: the families depend on what is loaded."""
        return []

    def collect(self) -> Iterable[Any]:
        """Queue depth, per-model memory and response-cache counts."""
        m = self.metrics
        infos = m.engine.loaded_models()
        queued = GaugeMetricFamily("xllm_requests_queued", "Sequences waiting for a batch slot.")
        try:
            queued.add_metric([], float(getattr(m.engine.stats(), "queued", 0)))
        except Exception:  # an engine mid-shutdown has no stats; report nothing rather than fail the scrape
            log.debug("engine.stats() failed", exc_info=True)
            queued.add_metric([], 0.0)
        yield queued
        memory = GaugeMetricFamily("xllm_model_memory_bytes", "Memory held by each loaded model.", labels=("model",))
        for info in infos:
            memory.add_metric([info.name], float(info.runtime.memory_bytes if info.runtime is not None else 0))
        yield memory
        yield _failed_steps(infos)
        yield from _residency(m.engine)
        cache = m.response_cache
        hits = CounterMetricFamily("xllm_response_cache_hits", "Requests answered from the response cache.")
        misses = CounterMetricFamily("xllm_response_cache_misses", "Cacheable requests that had to be generated.")
        hits.add_metric([], float(getattr(cache, "hits", 0)))
        misses.add_metric([], float(getattr(cache, "misses", 0)))
        yield hits
        yield misses
        entries = GaugeMetricFamily("xllm_response_cache_entries", "Responses held in the response cache.")
        entries.add_metric([], float(len(cache) if cache is not None else 0))
        yield entries
        yield from _connections(m.connections)


def _connections(guard: Any) -> Iterable[Any]:
    """Connections open now and those refused as they arrived (server/connections.py): a refused one is answered 429
    or 503 ``too_many_connections`` before any handler runs, so ``xllm_requests_total`` never sees it."""
    if guard is None:
        return
    open_now = GaugeMetricFamily("xllm_connections_open", "HTTP connections open now.")
    open_now.add_metric([], float(guard.open))
    yield open_now
    refused = CounterMetricFamily("xllm_connections_refused", "Connections answered 429/503 too_many_connections and "
                                  "closed on arrival (a client's or the server's cap).")
    refused.add_metric([], float(guard.refused))
    yield refused


def _residency(engine: Any) -> Iterable[CounterMetricFamily]:
    """Each model's loads and unloads, as the engine counted them when they happened (a model evicted and loaded
    again between two scrapes counts in both; comparing what was loaded at each scrape missed it)."""
    loads = CounterMetricFamily("xllm_model_loads", "Models that came into memory.", labels=("model",))
    unloads = CounterMetricFamily("xllm_model_unloads", "Models that left memory.", labels=("model",))
    for (name, change), count in sorted(dict(engine.residency_changes).items()):
        (loads if change == "load" else unloads).add_metric([name], float(count))
    yield loads
    yield unloads


def _failed_steps(infos: list[Any]) -> CounterMetricFamily:
    """Each loaded model's steps that raised: ``isolated`` failed only the requests that had just joined the
    batch, ``batch`` every running request (engine/step_failures.py)."""
    failed = CounterMetricFamily("xllm_failed_steps", "Engine steps a backend raised in, by what they failed.",
                                 labels=("model", "outcome"))
    for info in infos:
        replicas = info.runtime.replicas if info.runtime is not None else ()
        steps = sum(r.failed_steps for r in replicas)
        isolated = sum(r.isolated_failures for r in replicas)
        failed.add_metric([info.name, "isolated"], float(isolated))
        failed.add_metric([info.name, "batch"], float(steps - isolated))
    return failed


class ObservedEngine:
    """The engine as the serving layer sees it: its generations are also counted."""

    def __init__(self, engine: Any, metrics: ServerMetrics, on_done: tuple[Callable[[Any, Usage], None], ...] = (),
                 hold: Callable[[Any], Callable[[], None]] | None = None):
        self._engine = engine
        self._metrics = metrics
        self._on_done = on_done
        self._hold = hold

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, request: Any) -> AsyncIterator[Any]:
        """The engine's events, passed through; the final usage is counted and handed to ``on_done``.

        A generation its consumer closes early (the client left, a forced tool reply stopped
        repeating itself) never sends its final usage: it is charged the prompt and the tokens
        it delivered, so leaving a stream just before its end does not make it free; one closed
        before its first token is charged its prompt once the engine admitted it to the batch (its
        prefill ran), nothing while it was queued or its model loading. One that fails mid-stream
        is counted in the token metrics but charged to nobody.
        """
        delivered = 0
        clock, arrivals = _token_clock.get(), {}  # (each choice's last delta, for the inter-token latency)
        spans: dict[int, list[float]] = {}  # (each choice's first and last delta, for its time per output token)
        admission = request.admission
        if admission is None:  # (the engine marks it once a job enters the batch)
            request = dataclasses.replace(request, admission=(admission := Admission()))
        release = self._hold(request) if self._hold is not None else None
        try:
            async with aclosing(self._engine.generate(request)) as events:
                async for ev in events:
                    if type(ev) is ChoiceDelta:
                        count = len(ev.token_ids)
                        delivered += count
                        if count and clock is not None:
                            now = time.perf_counter()
                            clock.tokens(arrivals, ev.index, count, now)
                            note_span(spans, ev.index, count, now)
                    elif isinstance(ev, GenerationDone):
                        delivered = -1  # charged in full below; nothing left to charge on close
                        self._charge(request, ev.usage)
                        if clock is not None and clock.endpoint is not None:
                            self._metrics.observe_time_per_output_token(clock.endpoint, spans.values())
                    yield ev
        except (GeneratorExit, asyncio.CancelledError):
            # read after the engine stream closed (its cancel takes the runner's lock): admitted or never will be
            if delivered > 0 or (delivered == 0 and admission.admitted):
                self._charge(request, Usage(len(request.prompt_ids), delivered), finished=False)
            raise
        except Exception:
            # Failed mid-stream (its model unloaded, a step raised): the engine generated these
            # tokens and counts them (/admin/stats), so the token counters do too; the user is
            # not charged for a request the server failed.
            if delivered > 0:
                self._metrics.record_usage(request.model, Usage(len(request.prompt_ids), delivered), prefix=False)
            raise
        finally:
            if release is not None:
                release()  # after the charge: the tokens count as used, never as free, in between

    def _charge(self, request: Any, usage: Usage, finished: bool = True) -> None:
        """Count ``usage`` in the metrics and hand it to every ``on_done`` callback."""
        self._metrics.record_usage(request.model, usage, prefix=finished)
        note_stream_tokens(usage.total_tokens)
        for callback in self._on_done:
            callback(request, usage)


__all__ = ["CONTENT_TYPE", "ServerMetrics", "ObservedEngine", "TokenClock", "open_token_clock"]
