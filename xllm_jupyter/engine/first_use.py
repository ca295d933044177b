"""Resolving a model name whose first use pulls it, with no thread held while the pull runs.

A request naming a packaged default not in the store yet pulls it (a copy, or a GGUF conversion: minutes). The
resolve ran on a slow-work thread (core/slow_work.py) and the store's pull waited there for its own thread, so
each first use (and each wait for another process's pull of the name) held one slow-work thread for minutes,
which loads and DELETEs share. The store now starts the pull and hands back a future, awaited here on the loop;
only the short resolve after it takes a slow-work thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..backends.base import ModelSpec
from ..core.slow_work import run_slow


async def first_uses_pulled(engine: Any, *names: str | None) -> None:
    """Await the pulls ``engine``'s catalog starts for those of ``names`` that are packaged defaults not stored yet."""
    start = getattr(engine.catalog, "first_use_pull", None)  # (a catalog without it pulls inside ``resolve``)
    if start is None:
        return
    for name in dict.fromkeys(n for n in names if n):
        pulling = await run_slow(_start_unless_stopped, engine, start, name)  # (the pull runs on a thread of its own)
        if pulling is not None:
            # shielded: a request that leaves stops its own wait, not the pull other requests may share
            await asyncio.shield(asyncio.wrap_future(pulling))


def _start_unless_stopped(engine: Any, start: Callable[[str], Future | None], name: str) -> Future | None:
    """``start(name)``, refused with the engine's stop error once it is stopping (on the slow-work thread).

    A shutdown stops the pulls in flight (``cancel_pulls``), then the engine: a pull this thread began after that
    ran on for minutes, its request cancelled, its files written into a store being shut down.
    """
    engine._refuse_if_stopped()
    pulling = start(name)
    if pulling is not None and engine.stop_reason is not None:  # the shutdown came as it began
        cancel = getattr(engine.catalog, "cancel_pulls", None)
        if cancel is not None:  # the shutdown's own call ran just before this pull counted as in flight
            cancel()
        engine._refuse_if_stopped()
    return pulling


async def resolve_pulled(engine: Any, name: str) -> ModelSpec:
    """``engine._resolve(name)`` on a slow-work thread once the first-use pulls of ``name`` (and of the engine's
    draft model) are done."""
    if getattr(engine.catalog, "first_use_pull", None) is not None:  # (a catalog without it pulls in ``resolve``)
        await first_uses_pulled(engine, name, engine.config.draft_model)
    return await run_slow(engine._resolve, name)
