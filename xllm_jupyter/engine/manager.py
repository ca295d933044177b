"""Model residency: memory budgets, LRU eviction, keep_alive expiry and replicas.

The engine keeps several models loaded at once. Before a load it estimates the
model's footprint from its files on disk and makes room inside the device's budget
(swaps.py) by unloading idle models least-recently-used first; a model with running,
queued or in-flight requests is never a victim. Each model carries a keep_alive expiry
(Ollama semantics) that an asyncio reaper task on the engine's loop enforces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from ..backends import released_tokenizers
from ..backends.base import LoadedModel
from ..backends.torch_device import device_kind
from ..core import gc_freeze
from ..core.errors import InvalidRequest, Overloaded, PermissionDenied, quoted
from ..core.slow_work import run_slow
from ..core.types import EngineStats, UserSequences
from ..store.names import canonical_name
from .delivery import RequestHandle
from .runner import ModelRunner

log = logging.getLogger(__name__)

#: how long an eviction waits for a runner still in a step to unload its model before counting it free
EVICT_WAIT_SECONDS = 600.0

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_keep_alive(value: Any, *, param: str = "keep_alive") -> float | None:
    """Seconds to keep a model loaded after use; None = forever (a negative value).

    Accepts a number of seconds or a Go-style duration ("30s", "5m", "1h30m"), as Ollama does.
    """
    if isinstance(value, bool) or value is None:
        raise InvalidRequest(f"{param} must be a number of seconds or a duration like '5m'", param=param)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            if not body or _PART.sub("", body):
                raise InvalidRequest(f"Invalid {param} '{quoted(value)}': use seconds or a duration like '30s', '5m', '1h'",
                                     param=param) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in _PART.findall(body))
    if not math.isfinite(seconds):
        # "inf", "nan" and a 400-digit "999…h" parse as floats: an infinite expiry broke every model listing (int(inf))
        raise InvalidRequest(f"Invalid {param} '{quoted(value)}': the number of seconds must be finite", param=param)
    return None if seconds < 0 else seconds


def request_keep_alive(value: Any, allowed: bool = True) -> float | None:
    """A request's ``keep_alive`` for ``GenerationRequest.keep_alive``: None = default, -1.0 = forever.

    It decides for every user how long a model stays loaded (0 unloads it, negative pins it), so a
    caller who may not manage models (a user key where keys have roles) gets a 403 for sending one.
    """
    if value is None:
        return None
    if not allowed:
        raise PermissionDenied("keep_alive sets how long a model stays loaded for every user: it needs an admin "
                               "key (auth.admin_keys) or a service admin", param="keep_alive")
    seconds = parse_keep_alive(value)
    return -1.0 if seconds is None else seconds


MAX_REPLICAS = 64  # runners of one model: more is a typo, not a plan


def parse_replicas(items: tuple[str, ...]) -> dict[str, int]:
    """``("tiny=2", ...)`` (config ``engine.replicas``) as a name -> count mapping."""
    out: dict[str, int] = {}
    for item in items:
        name, _, count = item.partition("=")
        try:
            runners = int(count)
        except ValueError:
            raise InvalidRequest(f"Invalid engine.replicas entry '{item}': use name=count", param="replicas") from None
        # 0 once quietly meant 1, and an unbounded count would try to load that many copies of the model
        if not 1 <= runners <= MAX_REPLICAS:
            raise InvalidRequest(
                f"Invalid engine.replicas entry '{item}': the count must be between 1 and {MAX_REPLICAS}",
                param="replicas",
            )
        out[canonical_name(name.strip())] = runners  # the spelling the engine keeps
    return out


def gpu_indices(spec: Any, backend: Any) -> tuple[int, ...] | None:
    """The GPUs a load of ``spec`` takes memory on: None for all visible ones (a backend that splits a model
    over every GPU, like exllama), else the one its ``device`` option names (``cuda``/``auto``: the first)."""
    if backend is not None and backend.splits_over_gpus:
        return None
    return named_gpu(spec.options.device)


def named_gpu(device: str) -> tuple[int]:
    """The GPU a device name means: ``cuda:N`` is N; ``cuda``, ``auto`` (and anything else) the first."""
    _, _, index = device.strip().lower().partition(":")
    return (int(index),) if index.isdigit() else (0,)


def gib(n: int) -> str:
    """``n`` bytes as GiB for messages."""
    return f"{n / 2**30:.1f} GiB"


class ReplicaSet:
    """N runners of one model behaving like one ModelRunner; requests go to the least-loaded (ties rotate)."""

    def __init__(self, runners: list[ModelRunner]):
        self.runners = runners
        self.model: LoadedModel = runners[0].model  # tokenizer and facts: every replica is the same model
        self.max_batch_size = runners[0].max_batch_size
        self.created = runners[0].created
        self._turn = itertools.count()

    def start(self) -> None:
        """Start every replica's thread."""
        for r in self.runners:
            r.start()

    def wait_ready(self) -> None:
        """Block until every replica has warmed up; EngineError if one failed."""
        for r in self.runners:
            r.wait_ready()

    @property
    def alive(self) -> bool:
        """True while every replica's thread runs."""
        return all(r.alive for r in self.runners)

    def __len__(self) -> int:
        """Sequences running or waiting over all replicas."""
        return sum(len(r) for r in self.runners)

    def submit(self, request: Any, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue ``request`` on the replica with the fewest sequences."""
        if request.adapter:  # LoRA adapters are attached to the first replica's model only
            return self.runners[0].submit(request, loop)
        start = next(self._turn) % len(self.runners)  # ties rotate, so idle replicas take turns
        order = self.runners[start:] + self.runners[:start]
        return min(order, key=len).submit(request, loop)

    def retire_adapter(self, adapter: str, reason: Any) -> None:
        """Fail the requests of LoRA ``adapter`` with ``reason`` (they all run on the first replica)."""
        self.runners[0].retire_adapter(adapter, reason)

    def stats(self) -> EngineStats:
        """Counters summed over the replicas."""
        parts = [r.stats() for r in self.runners]
        return EngineStats(
            running=sum(p.running for p in parts),
            queued=sum(p.queued for p in parts),
            steps=sum(p.steps for p in parts),
            max_batch=max(p.max_batch for p in parts),
            batched_steps=sum(p.batched_steps for p in parts),
            completed=sum(p.completed for p in parts),
            cancelled=sum(p.cancelled for p in parts),
            failed_steps=sum(p.failed_steps for p in parts),
            isolated_failures=sum(p.isolated_failures for p in parts),
            tokens=sum(p.tokens for p in parts),
        )

    def user_counts(self) -> dict[str, UserSequences]:
        """Each user's sequences summed over the replicas."""
        return UserSequences.summed(r.user_counts() for r in self.runners)

    def replica_stats(self) -> list[EngineStats]:
        """Each replica's own counters."""
        return [r.stats() for r in self.runners]

    def shutdown(self, timeout: float | None = 30.0, reason: Any = None) -> bool:
        """Stop every replica and unload its model, failing open requests with ``reason`` (False: some unload
        waits for a step to end)."""
        return all([r.shutdown(timeout, reason) for r in self.runners])

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until every replica's model is unloaded."""
        return all(r.wait_closed(timeout) for r in self.runners)


def shares_room(record: Residency, device: str, gpus: tuple[int, ...] | None) -> bool:
    """Whether the model of ``record`` holds memory a load on ``device`` and ``gpus`` (None: all) could use;
    a model on other GPUs frees nothing there."""
    return record.device == device and (gpus is None or record.gpus is None or bool(set(gpus) & set(record.gpus)))


def runner_memory_bytes(runner: Any) -> int:
    """Bytes a ModelRunner's or ReplicaSet's models hold now (0 if one cannot say: keep the last figure)."""
    try:
        return sum(max(0, int(r.model.memory_bytes()))
                   for r in (runner.runners if isinstance(runner, ReplicaSet) else [runner]))
    except Exception:  # e.g. a model unloading on its thread right now
        log.debug("memory_bytes() failed", exc_info=True)
        return 0


def replica_stats(runner: Any) -> list[EngineStats]:
    """Per-replica counters of a ModelRunner or ReplicaSet."""
    return runner.replica_stats() if isinstance(runner, ReplicaSet) else [runner.stats()]


@dataclass
class Residency:
    """What the manager knows about one loaded (or loading) model."""

    device: str = "cpu"
    memory_bytes: int = 0
    last_used: float = field(default_factory=time.time)
    in_use: int = 0  # requests between their first engine call and the end of their generation
    expires_at: float | None = None  # None = kept until unloaded or evicted
    keep_alive: float | None = None  # seconds the expiry counts from the end of a use (None: none)
    gpus: tuple[int, ...] | None = None  # the GPUs it holds memory on (None: every visible one, or not a GPU)
    pinned: bool = False  # preloaded: a request without its own keep_alive leaves it without expiry
    sequences: Counter[str] = field(default_factory=Counter)  # user -> sequences of their requests in flight


class MemoryBudget:
    """Per-device budgets and the accounting of what is loaded and loading."""

    def __init__(self, budgets: Mapping[str, int]):
        self.budgets = dict(budgets)  # device kind -> bytes; 0 = unlimited
        self.reserved: dict[str, int] = {}  # loading models' estimates, by device

    def used(self, device: str, records: Mapping[str, Residency]) -> int:
        """Bytes held on ``device`` by loaded models plus loads in progress."""
        return sum(r.memory_bytes for r in records.values() if r.device == device) + self.reserved.get(device, 0)

    def plan(self, name: str, needed: int, device: str, records: Mapping[str, Residency],
             idle: list[str], *, device_room: int | None = None, gpus: tuple[int, ...] | None = None) -> list[str]:
        """Victims (from ``idle``, LRU first) to unload so ``needed`` fits; Overloaded (503) if it cannot.

        Without a configured budget, ``device_room`` (what the device could still take, measured
        now) plus what the models here hold stands in for one, so a load that cannot fit evicts
        idle models or fails before it runs the GPU out of memory under the models serving.
        """
        budget = self.budgets.get(device, 0)
        if not budget and device_room is not None:
            return self._plan_measured(name, needed, device, records, idle, device_room, gpus)
        if not budget:
            return []
        if needed > budget:
            raise Overloaded(f"The model '{name}' needs about {needed} bytes but the {device} memory budget is "
                             f"{budget} bytes: it can never be loaded here", code="model_does_not_fit")
        used = self.used(device, records)
        victims: list[str] = []
        for victim in sorted(idle, key=lambda n: records[n].last_used):
            if used + needed <= budget:
                break
            if records[victim].device == device:
                victims.append(victim)
                used -= records[victim].memory_bytes
        if used + needed > budget:
            busy = sum(r.memory_bytes for n, r in records.items() if r.device == device and n not in victims)
            raise Overloaded(f"Not enough memory to load '{name}': it needs about {needed} bytes, the {device} budget "
                             f"is {budget} bytes and {busy + self.reserved.get(device, 0)} bytes are held by models "
                             "in use or loading; retry later", code="insufficient_memory")
        return victims

    @staticmethod
    def _plan_measured(name: str, needed: int, device: str, records: Mapping[str, Residency], idle: list[str],
                       device_room: int, gpus: tuple[int, ...] | None = None) -> list[str]:
        """``plan`` against memory measured on ``gpus``: what is free now, plus what evicting idle models there
        frees. Reservations do not count here: a model warming up or being unloaded holds its memory, so the
        measurement has already left it out (and the caller holds the GPU turn, so no load is under way)."""

        records = {n: r for n, r in records.items() if shares_room(r, device, gpus)}
        idle = [n for n in idle if n in records]
        held = sum(r.memory_bytes for r in records.values())
        if needed > device_room + held:
            raise Overloaded(f"The model '{name}' needs about {gib(needed)} of GPU memory but only "
                             f"{gib(device_room + held)} are free, counting every model loaded here: it cannot be "
                             "loaded on this GPU (a smaller engine.cache_tokens or context_length lowers its cache)",
                             code="model_does_not_fit")
        room, victims = device_room, []
        for victim in sorted(idle, key=lambda n: records[n].last_used):
            if needed <= room:
                break
            victims.append(victim)
            room += records[victim].memory_bytes
        if needed > room:
            raise Overloaded(f"Not enough GPU memory to load '{name}': it needs about {gib(needed)}, "
                             f"{gib(device_room)} are free and the models loaded here are in use; retry later",
                             code="insufficient_memory")
        return victims


async def reap_forever(engine: Any, interval: float = 0.25) -> None:
    """The idle timer: unload models whose keep_alive expired (runs on the engine's loop)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await engine._reap_expired()
        except Exception:  # the timer must outlive one bad unload
            log.exception("unloading expired models failed")


class ResidencyMixin:
    """Engine methods that decide which models stay loaded; the Engine owns the state they use."""

    _runners: dict[str, Any]
    _res: dict[str, Residency]
    _budget: MemoryBudget
    _grace: float
    _adapters: dict[str, str]
    residency_changes: Counter[tuple[str, str]]
    _embeddings: Any
    _embed_expiry: dict[str, float | None]
    _default_keep_alive: float | None
    _retired_tokens: int
    _retired_requests: tuple[int, int]

    def _idle(self, name: str, now: float) -> bool:
        """True when nothing uses ``name``: no jobs, no request in flight, not touched within the grace."""
        runner, rec = self._runners.get(name), self._res.get(name)
        if runner is None or rec is None:
            return False
        # the grace covers a request between its tokenization and its submit
        return rec.in_use == 0 and len(runner) == 0 and now - rec.last_used >= self._grace

    def _memory_records(self) -> dict[str, Residency]:
        """What every loaded model holds now, by name: chat models as measured now (an eager KV cache
        grows after load), embedding models too (never evicted for room, but they take it)."""
        for name, rec in self._res.items():
            runner = self._runners.get(name)
            if runner is not None:
                rec.memory_bytes = runner_memory_bytes(runner) or rec.memory_bytes
        records = dict(self._res)
        for name, slot in self._embeddings.slots.items():
            details = slot.model.details()
            where = str(details.get("device", "cpu"))
            records[name] = Residency(device=device_kind(where), memory_bytes=slot.model.memory_bytes(),
                                      gpus=named_gpu(where))
        return records

    async def _evict(self, name: str, reason: Any = None) -> None:
        """Unload ``name``; the runner leaves the table before any await, its memory counts until it is freed.

        Its open requests fail with ``reason`` (None: a 503 saying it was unloaded, to retry)."""
        # the worker threads get the box, not the runner: a worker may still hold its finished call when the
        # collection in _retire runs, and the runner (with its model) must be unreferenced by then
        box = [self._runners.pop(name, None)]
        rec = self._res.pop(name, None)
        for adapter in [a for a, b in self._adapters.items() if b == name]:
            del self._adapters[adapter]  # they go with their base
            self.residency_changes[adapter, "unload"] += 1
        if box[0] is None:
            return
        self.residency_changes[name, "unload"] += 1
        await self._retire(name, box, rec, reason)

    async def _retire(self, name: str, box: list[Any], rec: Residency | None, reason: Any = None) -> None:
        """Shut down the runner in ``box`` (a one-item list, out of the tables already, emptied here so no frame
        keeps the model) and unload its model, failing its open requests with ``reason``; its memory counts as
        taken until it is freed."""
        # held as reserved while the weights are being freed: a load meanwhile must not count them free
        held = rec.memory_bytes if rec is not None else 0
        device = rec.device if rec is not None else "cpu"
        self._budget.reserved[device] = self._budget.reserved.get(device, 0) + held
        # made at its load: unless a freeze caught it since, the collection below need not walk the frozen objects
        full = await asyncio.to_thread(gc_freeze.is_frozen, box[0])
        try:
            await run_slow(lambda: box[0].shutdown(reason=reason))
            # a runner still in a step unloads when the step ends; its memory is not free before. Bounded:
            # a step that never returns must not hang every later load (nor the process's exit)
            if not await run_slow(lambda: box[0].wait_closed(EVICT_WAIT_SECONDS)):
                log.error("%s is still in a step %ss after its unload; counting its memory as free", name,
                          EVICT_WAIT_SECONDS)
        finally:
            self._budget.reserved[device] -= held
            last = box[0].stats()
            self._retired_tokens += last.tokens  # the engine-wide counts go on without it
            self._retired_requests = (self._retired_requests[0] + last.completed, self._retired_requests[1] + last.cancelled)
        box.clear()  # the model's last reference here: what it leaves in cycles, the collection below frees
        await asyncio.to_thread(gc_freeze.release, full)  # (frozen cycles: only a collection that unfreezes finds them)

    @contextlib.contextmanager
    def _busy(self, name: str) -> Iterator[None]:
        """Count ``name`` (a model or adapter) in use while a request works on it before its generation
        (tokenizing a long prompt, compiling a grammar: they can outlast the idle grace), and restart the grace
        when the work ends: a keep_alive that expires meanwhile must not unload the model under the request."""
        rec = self._res.get(self._adapters.get(name, name))
        if rec is None:
            yield
            return
        rec.in_use += 1
        try:
            yield
        finally:
            rec.in_use -= 1
            rec.last_used = time.time()

    def _touch(self, name: str, keep_alive: float | None | str = "default") -> None:
        """Mark ``name`` used now and restart its keep_alive (``"default"`` = the config's)."""
        rec = self._res.get(name)
        if rec is None:
            return
        rec.last_used = time.time()
        if keep_alive == "default":
            keep_alive = None if rec.pinned else self._default_keep_alive
        rec.keep_alive = None if keep_alive is None else float(keep_alive)
        rec.expires_at = None if rec.keep_alive is None else rec.last_used + rec.keep_alive

    async def _reap_expired(self) -> None:
        """Unload every model whose keep_alive has passed and that nothing uses."""
        now = time.time()
        for name, rec in list(self._res.items()):
            if rec.expires_at is not None and rec.expires_at <= now:
                if self._idle(name, now):
                    log.info("keep_alive of %s expired; unloading it", name)
                    await self._evict(name)
        for name, expiry in list(self._embed_expiry.items()):
            if expiry is not None and expiry <= now and not self._embeddings.busy(name):  # (in use: a later pass)
                self._embed_expiry.pop(name, None)
                await self._embeddings.unload(name)
        if released_tokenizers.RELEASED.due():  # tokenizers kept for reloads go after theirs (released_tokenizers.py)
            await asyncio.to_thread(released_tokenizers.RELEASED.expire)

    def _finished(self, name: str, keep_alive: float | None) -> None:
        """Restart ``name``'s keep_alive after a request.

        keep_alive 0 expires it now; the reaper unloads it once nothing has used it for the idle
        grace (a request may be between its tokenization and its submit), within 0.25 s after that.
        """
        if self._res.get(name) is None:
            return
        self._touch(name, "default" if keep_alive is None else (None if keep_alive < 0 else keep_alive))
