"""Admin routes for the model store from a notebook: pull with streamed progress, and a model's manifest.

``POST /admin/models/pull`` with ``{"model": SOURCE, "name"?, "revision"?, "force"?, "convert"?, "base"?}``
(``base``: the stored model a LoRA adapter applies to, as ``xllm pull --base``)
answers with server-sent events: ``{"status": stage, "file", "completed", "total"}`` while the
store pulls (stages as in ``store.progress.PullProgress``; a copy from a local or packaged source keeps the
``status`` "download" it always had, with ``"stage": "copy"`` added), then ``{"status": "success", "model",
"digest", ...}`` and ``[DONE]``. A client that disconnects stops the pull at once, through the store's
own cancel (the one a shutdown sets): even inside a long step that reports nothing (a GGUF conversion),
the route lets go within the store's grace and the pull's files are deleted as it unwinds. A pull of a
name whose cancelled pull is still converting (left in a library call) first waits for that to end, on the
IOLoop (no pull thread held), with one ``{"status": "waiting for the cancelled pull of 'NAME' to finish"}``
event; its client leaving or a shutdown stops that wait too. A pull that would only return the model stored under
that name (same source, no ``force``) answers at once instead.
``GET /admin/models/manifest?model=NAME`` gives a stored model's digest and source plus the server
version, for the provenance a notebook records with each answer, and the store's random id (``store_id``), by
which ``xllm rm`` knows whether the server serves from its store.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from .. import __version__
from ..core.errors import (
    InvalidRequest,
    ModelNotFound,
    PullStopped,
    StoreError,
    UnknownParameter,
    Unsupported,
    XllmError,
    quoted,
)
from ..core.slow_work import SLOW_WORKERS, ThreadLane
from ..openai.json_body import strict_json
from ..store.cancel import waiting_status
from ..store.names import canonical_name, validate_name
from ..store.progress import wire_status
from ..store.sources import parse_source
from .handlers import BodyMixin, RequestMixin

log = logging.getLogger("xllm_jupyter.server")

#: at most this many progress events a second per file (the store reports every chunk)
PROGRESS_INTERVAL = 0.1
#: how often a pull waiting for its name's cancelled pull to end looks again (on the IOLoop: no thread waits)
LEFT_PULL_POLL = 0.25
#: the threads admins' pulls wait on (each for minutes: a download, a conversion, another pull of the name): a lane
#: of their own, as on the slow-work pool that many pulls at once held every thread and loads waited behind them
PULLS = ThreadLane(SLOW_WORKERS, "xllm-pull")
#: the fields a pull body may have (``source``: another name for ``model``); any other is a 400 naming it
PULL_FIELDS = ("model", "source", "name", "revision", "force", "convert", "base")
#: fields of the other admin routes, and which: what the 400 for one sent here says
_ELSEWHERE = {"keep_alive": "POST /admin/models/load", "removed": "POST /admin/models/unload"}


class PullCancelled(Exception):
    """Raised from the progress callback when the client has gone: unwinds a store's pull that takes no cancel."""


def server_store(context: Any) -> Any:
    """The store the server's engine loads from (pull, manifest and removal routes); 400 when it has none."""
    store = getattr(context.engine, "catalog", None)
    if store is None or not hasattr(store, "pull"):
        raise Unsupported("This server has no model store to pull into.")
    return store


def public_source(source: str) -> str:
    """A manifest's source as clients see it: a local path as ``local:<its last part>``, anything else as is."""
    # the server's file system stays private, as the store's own directory does
    text = str(source)
    if text.startswith(("/", "\\")) or PureWindowsPath(text).drive:
        return "local:" + (PurePosixPath(text).name if text.startswith("/") else PureWindowsPath(text).name)
    return text


def manifest_summary(manifest: Any) -> dict[str, Any]:
    """The public facts of a stored model (no paths)."""
    return {
        "id": manifest.name,
        "object": "model",
        "digest": manifest.digest,
        "format": manifest.format,
        "size": manifest.size,
        "source": public_source(manifest.source),
        "created": getattr(manifest, "created", None),
        "server_version": __version__,
    }


def _pull_args(body: bytes) -> dict[str, Any]:
    """Validated pull arguments from the JSON body (``source`` is accepted as an alias of ``model``)."""
    data = strict_json(body or b"{}")  # UTF-8, well-formed, each key once (as every route reads its body)
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    unknown = next((key for key in data if key not in PULL_FIELDS), None)
    if unknown is not None:  # a typo ("revison") or another route's field pulled something else than was asked
        raise UnknownParameter(unknown, tuple(k for k in PULL_FIELDS if k != "source"), _ELSEWHERE.get(unknown))
    if "model" in data and "source" in data:  # one of the two was silently ignored
        raise InvalidRequest("'source' is another name for 'model': send one of them.", param="source")
    source = data.get("model", data.get("source"))
    if not isinstance(source, str) or not source.strip():
        raise InvalidRequest("'model' (what to pull: a packaged name, a Hugging Face repo or a local path) is required", param="model")
    args: dict[str, Any] = {"source": source.strip()}
    for key in ("name", "revision", "base"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"'{key}' must be a string", param=key)
        args[key] = value or None
    for key in ("force", "convert"):
        value = data.get(key, False)
        if not isinstance(value, bool):
            raise InvalidRequest(f"'{key}' must be a boolean", param=key)
        args[key] = value
    return args


def check_pull(args: dict[str, Any]) -> None:
    """Raise the StoreError a pull would fail with at once (unknown source, missing local path, bad name).

    Checked before the stream starts, so these answer a plain 400 error instead of a 200 whose
    stream then holds the error; failures during the pull itself stay stream events.
    """
    try:
        parse_source(args["source"], args["revision"])
    except StoreError as exc:
        if exc.param == "source":  # the store's word for what this route calls "model"
            exc.param = "model"
        raise
    if args["name"] is not None:
        try:
            validate_name(args["name"])
        except StoreError as exc:
            exc.param = "name"  # the body field that holds it
            raise


def check_base(store: Any, base: str | None) -> None:
    """Raise unless ``base`` (a LoRA adapter's base model) names a full model in ``store``: 400 malformed or
    itself an adapter (the store's ``check_base``), 404 absent.

    The store records a base not stored yet (with a warning: it may be pulled later); over HTTP a base
    that is not stored is refused before anything is pulled, as the admin pulling can pull it first.
    """
    if base is None:
        return
    if store.check_base(base) is None:
        missing = ModelNotFound(base, param="base")
        missing.message = f"The base model '{quoted(base)}' is not in the server's store: pull it first"
        raise missing


def _pull_name(args: dict[str, Any]) -> str | None:
    """The name the pull of ``args`` stores its model under (as the store's ``pull`` picks it); None for a name or
    source the store refuses (its ``pull`` says why, as an error event like any other pull failure)."""
    try:
        return validate_name(args["name"]) if args["name"] else parse_source(args["source"], args["revision"]).default_name
    except XllmError:
        return None


async def _wait_left_pulls(store: Any, name: str, gone: threading.Event) -> None:
    """Return once no cancelled pull of ``name`` is left converting; PullStopped if ``gone`` is set first (a
    shutdown's ``cancel_pulls``; a client leaving cancels this wait's task)."""
    while store.left_pulls(name):
        if gone.is_set():
            raise PullStopped(f"The pull of '{quoted(name)}' was stopped before it started (the server is shutting "
                              "down); nothing was added to the store: pull it again")
        await asyncio.sleep(LEFT_PULL_POLL)


async def _installed_as_pulled(store: Any, args: dict[str, Any]) -> bool:
    """Whether the store would answer the pull of ``args`` with the model it holds, at once (no wait for a left
    pull of the name: the store's own pull returns it without one)."""
    if not hasattr(store, "installed_as_pulled"):
        return False
    return await PULLS.run(lambda: store.installed_as_pulled(  # (a Hub source asks the Hub for its commit)
        args["source"], args["name"], revision=args["revision"], force=args["force"], base=args.get("base")) is not None)


async def pull_events(store: Any, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Run ``store.pull`` on a thread and yield its (coalesced) progress, then the result."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()
    last: dict[str, Any] = {"key": None, "at": 0.0}

    def report(event: Any) -> None:
        if gone.is_set():
            raise PullCancelled()
        key = (event.stage, event.file)
        now = time.monotonic()
        finished = bool(event.total) and event.done >= event.total
        if key == last["key"] and not finished and now - last["at"] < PROGRESS_INTERVAL:
            return
        last.update(key=key, at=now)
        item = {"status": wire_status(event.stage), "file": event.file, "completed": event.done, "total": event.total}
        if item["status"] != event.stage:  # a copy: "download" as before for clients that switch on it, named here
            item["stage"] = event.stage
        if event.unit != "bytes":  # Ollama's events count bytes; say when these count something else
            item["unit"] = event.unit
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> Any:
        # ``gone`` is the pull's cancel: set, the store stops it within its grace even mid-conversion (a check at
        # progress reports alone waited out a step that reports nothing for tens of seconds)
        return store.pull(args["source"], args["name"], revision=args["revision"], progress=report,
                          force=args["force"], convert=args["convert"], base=args.get("base"), cancel=gone)

    job: asyncio.Future | None = None
    getter: asyncio.Future | None = None
    try:
        name = _pull_name(args) if hasattr(store, "left_pulls") else None
        if name is not None and store.left_pulls(name) and not await _installed_as_pulled(store, args):
            # the store would wait for it on a pull thread: wait here instead, where a waiting pull holds none
            with store.stoppable(name, gone):  # ``cancel_pulls`` (a shutdown) sets ``gone`` meanwhile
                yield {"status": waiting_status(name), "file": None, "completed": 0, "total": None}
                await _wait_left_pulls(store, name, gone)
        job = asyncio.ensure_future(PULLS.run(work))  # downloads, converts: minutes, off the shared and slow-work pools
        while True:
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            manifest = job.result()  # raises the store's error, sent as an error event
            yield {"status": "success", **manifest_summary(manifest)}
            return
    finally:
        # the client left (or the stream failed): cancel the store's pull, which returns within its grace
        gone.set()
        if getter is not None:
            getter.cancel()  # (left waiting on the queue when the client left mid-wait, it outlived the loop)
        if job is not None and not job.done():
            log.info("the client of the pull of %s left: stopping the pull", args["name"] or args["source"])
            await asyncio.gather(job, return_exceptions=True)


class AdminPullMixin(BodyMixin):
    """``POST /admin/models/pull``: pull into the server's store, progress as SSE."""

    async def handle_post(self) -> None:
        """Validate (what can fail before the pull starts answers 400), then stream the pull's progress."""
        args = _pull_args(self.body)
        store = server_store(self.xllm)
        await asyncio.to_thread(check_pull, args)  # (a stat of a local path: off the IOLoop)
        await asyncio.to_thread(check_base, store, args["base"])
        await self.stream_events(self._unloading_replaced(store, pull_events(store, args), args["base"]))

    async def _unloading_replaced(self, store: Any, events: AsyncIterator[dict[str, Any]],
                                  base: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """``events``, unloading a model the pull replaced with other files or settings (a forced pull of a loaded
        name would otherwise go on serving the old weights, a created model's Modelfile settings, or an adapter on
        the base it no longer names (``base``), until it idles out)."""
        before = await asyncio.to_thread(lambda: {m.name: (m.digest, bool(m.modelfile), m.parameters.get("base_model"))
                                                  for m in store.list()})
        async for event in events:
            old = before.get(event["id"]) if event.get("status") == "success" else None
            # (a pull that succeeds over a created model replaced it: no pull source is a created model's)
            if old is not None and (old[0] != event["digest"] or old[1]
                                    or (base is not None and canonical_name(base) != old[2])):
                await self.xllm.engine.unload(event["id"])
            yield event


class AdminManifestMixin(RequestMixin):
    """``GET /admin/models/manifest?model=NAME``: a stored model's digest and source, its store's id, and the server
    version."""

    async def handle_get(self) -> None:
        """The manifest summary; 404 for a model not in the store; only the version without ``model``."""
        name = self.get_argument("model", "")  # type: ignore[attr-defined]
        if not name:
            self.write_json({"object": "server", "server_version": __version__})
            return
        store = server_store(self.xllm)

        def read() -> dict[str, Any]:
            summary = manifest_summary(store.show(name))
            # which store serves it (a random id, no path): `xllm rm` tells this store from another holding the same files
            summary["store_id"] = store.store_id() if hasattr(store, "store_id") else None
            return summary

        self.write_json(await asyncio.to_thread(read))


__all__ = ["AdminManifestMixin", "AdminPullMixin", "check_base", "check_pull", "manifest_summary", "public_source", "pull_events", "server_store"]
