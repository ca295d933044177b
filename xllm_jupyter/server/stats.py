"""``GET /admin/stats``: one JSON snapshot for dashboards such as the JupyterLab panel.

Engine status, per-model memory against the memory budgets, queue depth and a live
generation rate. The rate comes from counters sampled here, on the server, each time
the route is read: the tokens of finished generations (the ``xllm_generation_tokens``
counter) plus the tokens that running sequences have produced so far, so a long
generation shows up while it runs, not only when it ends. Nothing is added to the
per-token path.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from ..core.types import ModelRuntime
from .handlers import RequestMixin
from .ops import readiness

log = logging.getLogger("xllm_jupyter.server")

#: the span the rate is averaged over (longer when the route is read less often)
RATE_WINDOW_SECONDS = 5.0


class TokenRate:
    """Tokens per second over the last few seconds, from samples of a growing counter."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._last = 0

    def sample(self, total: int) -> tuple[float, float]:
        """Record ``total`` now; (tokens per second, seconds the rate spans). (0.0, 0.0) on the first sample."""
        # The counter can dip for a moment while a finished sequence moves from "running"
        # to "finished"; holding the highest value seen keeps the rate from going negative.
        total = max(total, self._last)
        self._last = total
        now = self.clock()
        samples = self._samples
        samples.append((now, total))
        # the baseline is the oldest sample inside the window, else the one before now
        while len(samples) > 2 and samples[0][0] < now - self.window:
            samples.popleft()
        start, base = samples[0]
        span = now - start
        if span <= 0:
            return 0.0, 0.0
        return (total - base) / span, span


def _device(details: dict[str, Any]) -> str:
    return "cuda" if str(details.get("device", "cpu")).lower().startswith("cuda") else "cpu"


#: where a container's memory limit is read (cgroup v2, then v1); "max" or a huge number means none
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _memory_limit() -> int | None:
    """This process's cgroup memory limit (a JupyterHub user's pod, a container), or None when it has none."""
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        return int(text) if text.isdigit() else None
    return None


def _cpu_total() -> int | None:
    """The machine's memory or a container's limit, whichever is lower (a hub user's 2 GiB pod on a 512 GiB node is
    killed past 2 GiB)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not on this platform
        return _memory_limit()
    limit = _memory_limit()
    return physical if limit is None else min(physical, limit)


def _gpu_figures() -> list[tuple[int, int] | None]:
    """Each CUDA device's (free, total) bytes, when they can be known without importing torch; [] otherwise. None for
    a GPU this process has no context on and that is not its current one: reading it (cudaMemGetInfo) would create a
    context there, hundreds of MB of a GPU the server does not use, on every poll; no model of the server is on it."""
    torch = sys.modules.get("torch")  # a CUDA model is loaded only if torch already is
    try:
        if torch is not None and torch.cuda.is_available():
            has_context = getattr(torch._C, "_cuda_hasPrimaryContext", None)  # asks the driver, creates none
            current = torch.cuda.current_device()
            return [tuple(int(x) for x in torch.cuda.mem_get_info(i))
                    if i == current or (has_context is not None and has_context(i)) else None
                    for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a driver error must not fail a dashboard read
        log.debug("torch.cuda.mem_get_info() failed", exc_info=True)
    return []


def gpu_memory(figures: list[tuple[int, int] | None]) -> dict[str, Any]:
    """The CUDA row's device fields from each GPU's (free, total) bytes (None: a GPU not read, left out): every GPU's
    own figures and their summed total (None with no GPU). The models on them may be spread over all of them (a split
    model, one per GPU), so their memory is set against every GPU's, not the first one's."""
    devices = [{"index": i, "used_bytes": f[1] - f[0], "free_bytes": f[0], "total_bytes": f[1]}
               for i, f in enumerate(figures) if f is not None]
    return {"total_bytes": sum(d["total_bytes"] for d in devices) if devices else None, "devices": devices}


def memory_view(models: list[dict[str, Any]], budgets: dict[str, int],
                gpus: list[tuple[int, int] | None] | None = None) -> dict[str, dict[str, Any]]:
    """Per device kind: bytes held by loaded models, the budget (0 = none) and the device's total; the CUDA row also
    lists each GPU (``gpus``: each one's (free, total) bytes, read from torch when not given)."""
    view: dict[str, dict[str, Any]] = {}
    kinds = {"cpu"} | {m["device"] for m in models} | {k for k, v in budgets.items() if v}
    for kind in sorted(kinds):
        used = sum(m["memory_bytes"] for m in models if m["device"] == kind)
        row: dict[str, Any] = {"used_bytes": used, "budget_bytes": int(budgets.get(kind, 0) or 0)}
        if kind == "cpu":
            row["total_bytes"] = _cpu_total()
        else:
            row.update(gpu_memory(_gpu_figures() if gpus is None else gpus))
        view[kind] = row
    return view


class StatsSampler:
    """Builds the snapshots of one server; holds the rate's samples between reads."""

    def __init__(self, context: Any, window: float = RATE_WINDOW_SECONDS):
        self.context = context
        self.rate = TokenRate(window)

    def status(self) -> tuple[str, str | None]:
        """``ready``/``starting``/``loading``/``unhealthy`` and, unless ready, why."""
        engine, c = self.context.engine, self.context.config.engine
        startup = tuple(n for n in (c.default_model, *c.preload) if n)
        # the models `xllm serve -m` still loads too, as /health/ready waits for them
        why = readiness(engine, startup, getattr(self.context, "startup_pending", None))
        if why is None:
            return "ready", None
        if not engine.healthy:
            return "unhealthy", why
        return ("starting" if not engine.started else "loading"), why

    def snapshot(self) -> dict[str, Any]:
        """The whole stats document."""
        engine = self.context.engine
        status, message = self.status()
        models = []
        for info in engine.loaded_models(include_loading=True):
            r = info.runtime or ModelRuntime()
            models.append({
                "id": info.name,
                "state": r.state,
                "waiting_for_room": r.waiting_for_room,  # loading, but models in use hold the memory it needs
                "backend": info.backend,
                "device": _device(info.details),
                "memory_bytes": r.memory_bytes,
                "running": r.running,
                "queued": r.queued,
                "max_batch_size": r.max_batch_size,
                "context_length": info.context_length,
            })
        try:
            stats = engine.stats()
            running, queued, completed, generated = stats.running, stats.queued, stats.completed, stats.tokens
        except Exception:  # noqa: BLE001 - an engine mid-shutdown has no stats; the rest is still worth showing
            log.debug("engine.stats() failed", exc_info=True)
            running = queued = completed = generated = 0
        tps, span = self.rate.sample(generated)
        cfg = self.context.config.engine
        budgets = {"cpu": cfg.memory_budget_bytes, "cuda": cfg.gpu_memory_budget_bytes}
        return {
            "object": "xllm.stats",
            "status": status,
            "message": message,
            "time": time.time(),
            "default_model": cfg.default_model,
            "models": models,
            "memory": memory_view(models, budgets),
            "running": running,
            "queued": queued,
            "completed": completed,
            "generated_tokens": generated,
            "tokens_per_second": round(tps, 2),
            "rate_window_seconds": round(span, 2),
        }


# one sampler per server context: the rate's samples outlive a single request
_samplers: weakref.WeakKeyDictionary[Any, StatsSampler] = weakref.WeakKeyDictionary()


def sampler_for(context: Any) -> StatsSampler:
    """The sampler of ``context``, made on first use."""
    sampler = _samplers.get(context)
    if sampler is None:
        sampler = _samplers[context] = StatsSampler(context)
    return sampler


class AdminStatsMixin(RequestMixin):
    """``GET /admin/stats``: status, models, memory, queue and tok/s in one document."""

    async def handle_get(self) -> None:
        """The current snapshot."""
        self.write_json(sampler_for(self.xllm).snapshot())


__all__ = ["AdminStatsMixin", "StatsSampler", "TokenRate", "gpu_memory", "memory_view", "sampler_for"]
