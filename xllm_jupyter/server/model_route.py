"""``/v1/models/{id}``: one model (GET, anyone); DELETE removes it from the server's store as ``xllm rm`` does (admins).

The model stops serving before its files go (an unload, which also tells a load of it under way to
read its manifest again; the requests it cuts fail with ``ModelRemoved``, a 404 saying so), then leaves the store in one rename, then is unloaded once more: a load
that finished between the two steps must not keep serving files that are gone. The answer is
OpenAI's ``{"id", "object": "model", "deleted": true}`` (the SDK's ``ModelDeleted``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from typing import Any

from ..core.errors import InvalidModelName, InvalidRequest, ModelNotFound, ModelRemoved
from ..core.slow_work import run_slow
from ..store.names import validate_name
from ..store.packaged import PACKAGED
from .handlers import RequestMixin
from .pull import server_store

log = logging.getLogger("xllm_jupyter.server")


class PackagedNotStored(InvalidRequest):
    """A packaged default that is listed from its installed wheel, not from the store: nothing to remove (400)."""

    code = "model_not_removable"


def stored_name(store: Any, model_id: str) -> str:
    """The store's name for ``model_id``; ModelNotFound (404) when the store has no such model, however spelt."""
    try:
        name = validate_name(model_id)
    except InvalidModelName:  # a name no model can have (a path, '..'): not found, as GET says of it
        raise ModelNotFound(model_id) from None
    if store.exists(name):
        return name
    packaged = PACKAGED.get(name)
    if packaged is not None and packaged.locate() is not None:
        raise PackagedNotStored(
            f"The model '{name}' is a packaged default read from the installed {packaged.pip_name} wheel and is "
            f"not in the store, so there is nothing to delete (pip uninstall {packaged.pip_name} removes it)",
            param="model")
    raise ModelNotFound(name)


#: the longest pause between two tries at a removal whose name a pull holds (the first pauses are shorter)
RM_RETRY_SECONDS = 0.25


async def _removed(store: Any, name: str, engine: Any, left: asyncio.Event) -> bool:
    """``store.rm(name)`` once no pull or removal of the name holds its lock, waiting between tries on the loop;
    False (nothing removed) once ``left`` is set: the caller left meanwhile."""
    pause = 0.01
    # (each try takes the lock without blocking; the removal itself, once it has it, deletes files: the slow pool)
    while not await run_slow(store.rm, name, wait=False):
        stopped = engine.stop_reason
        if stopped is not None:  # a shutdown (the lock may be another process's pull): its 503, not a cut connection
            raise copy.copy(stopped)  # (one instance raised in many requests would chain their tracebacks)
        if left.is_set():  # nobody waits for the answer: a removal it could no longer report is not made
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(left.wait(), pause)  # (woken at once when the client leaves)
        pause = min(pause * 2, RM_RETRY_SECONDS)
    return True


async def remove_model(context: Any, model_id: str, left: asyncio.Event | None = None) -> dict[str, Any] | None:
    """Unload ``model_id``, remove it from the store and unload it again; the OpenAI ``ModelDeleted`` body, or
    None when ``left`` was set (its caller left) while the removal waited for a pull of the model: it stays stored."""
    store = server_store(context)
    name = await asyncio.to_thread(stored_name, store, model_id)
    engine = context.engine
    # it stops serving before its files go; requests it cuts hear that it is gone (a 404, as their retry would
    # get), not the 503 "retry" of a plain unload
    await engine.unload(name, ModelRemoved(name))
    # (a concurrent removal got there first: ModelNotFound, 404.) The removal waits for the name's lock, which a pull
    # or a first-use load of it holds for minutes. It waits here, holding no thread: blocked on the shared pool, a few
    # such waits stalled the whole server, and on the slow-work pool 64 of them stalled every load
    if not await _removed(store, name, engine, left if left is not None else asyncio.Event()):
        log.info("the client of the removal of %s left while a pull of it held it: the model stays in the store", name)
        return None
    # a load under way when it was unloaded above may have registered since, from files now gone
    await engine.unload(name, ModelRemoved(name))
    return {"id": name, "object": "model", "deleted": True}


class ModelMixin(RequestMixin):
    """``GET /v1/models/{id}`` (anyone) and ``DELETE /v1/models/{id}`` (admins: removes it from the store)."""

    SUPPORTED_METHODS: tuple[str, ...] = ("GET", "DELETE")
    ADMIN_METHODS: tuple[str, ...] = ("DELETE",)
    _left: asyncio.Event | None = None  # a DELETE's: set once its client has left

    async def handle_get(self, model_id: str) -> None:
        """One model, 404 if unknown."""
        self.write_json(await self.xllm.serving.retrieve_model(model_id, self.caller.user, admin=self.caller.admin))

    async def handle_delete(self, model_id: str) -> None:
        """Remove the model; 404 when the store has no such model."""
        self._left = asyncio.Event()  # set when the client leaves: a removal waiting for a pull stops waiting
        if self._client_gone:  # (it left before this ran)
            self._left.set()
        deleted = await remove_model(self.xllm, model_id, self._left)
        if deleted is not None:
            self.write_json(deleted)

    def on_connection_close(self) -> None:
        """The client left: a removal still waiting for a pull's lock gives up (Tornado does not cancel it)."""
        super().on_connection_close()
        if self._left is not None:
            self._left.set()


__all__ = ["ModelMixin", "PackagedNotStored", "remove_model", "stored_name"]
