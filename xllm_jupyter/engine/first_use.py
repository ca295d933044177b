"""Resolving a model name whose first use pulls it, with no thread held while the pull runs.

A request naming a packaged default not in the store yet pulls it (a copy, or a GGUF conversion: minutes). The
resolve ran on a slow-work thread (core/slow_work.py) and the store's pull waited there for its own thread, so
each first use (and each wait for another process's pull of the name) held one slow-work thread for minutes,
which loads and DELETEs share. The store now starts the pull and hands back a future, awaited here on the loop;
only the short resolve after it takes a slow-work thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..backends.base import ModelSpec
from ..core.slow_work import run_slow


async def first_uses_pulled(catalog: Any, *names: str | None) -> None:
    """Await the pulls the catalog starts for those of ``names`` that are packaged defaults not stored yet."""
    start = getattr(catalog, "first_use_pull", None)  # (a catalog without it pulls inside ``resolve``, as before)
    if start is None:
        return
    for name in dict.fromkeys(n for n in names if n):
        pulling = await run_slow(start, name)  # (a manifest read; the pull runs on a thread of its own)
        if pulling is not None:
            # shielded: a request that leaves stops its own wait, not the pull other requests may share
            await asyncio.shield(asyncio.wrap_future(pulling))


async def resolve_pulled(engine: Any, name: str) -> ModelSpec:
    """``engine._resolve(name)`` on a slow-work thread once the first-use pulls of ``name`` (and of the engine's
    draft model) are done."""
    if getattr(engine.catalog, "first_use_pull", None) is not None:  # (a catalog without it pulls in ``resolve``)
        await first_uses_pulled(engine.catalog, name, engine.config.draft_model)
    return await run_slow(engine._resolve, name)
