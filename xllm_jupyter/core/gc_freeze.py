"""Keeping the long-lived objects of loaded models out of the garbage collector's full collections.

A full collection walks every object the process tracks and holds the GIL while it does: with torch and
transformers loaded that is millions of objects and 0.2 s or more, during which the IOLoop (every stream,
every ``/health``) stands still. Building a big request body (a few hundred thousand objects, on any thread)
sets such collections off. ``gc.freeze()`` moves what exists now into the permanent generation, which
collections skip; so the engine freezes after start-up and after each model load (docs/performance.md).

The catch: frozen objects are still freed by reference counting, but cycles among them are never collected
while they stay frozen. An unloaded model whose objects sit in reference cycles would keep its memory
(GPU memory too) for good. So every collection meant to free memory goes through ``collect()``, which
unfreezes first and re-freezes what survives, and the engine calls ``release()`` after an unload.

That full collection walks every object of the process, GIL held: 0.3-0.8 s with torch loaded, twice per
unload (the backend's, the engine's), the IOLoop standing still. So a model load is not frozen: after a
load, ``tidy()`` collects its garbage and leaves the survivors (a loaded model: a few thousand objects,
next to the hundreds of thousands the start-up and the first imports froze) in the collector's care. An
unload then asks ``is_frozen`` of the model first: a model no freeze has caught since its load is freed by
a plain collection, which skips the frozen objects (milliseconds); one that was frozen still gets the full
one. So no model is frozen where that can be helped: the start freezes before its preloads, a backend's
first load freezes its imports before the weights load where the backend can import ahead
(``Backend.import_libraries``: transformers, exllamav3, exllamav2), and
a GGUF read ends in ``tidy()``.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import threading
from types import TracebackType
from typing import Iterator

from . import heap

# one at a time: an unfreeze must not meet another thread's re-freeze mid-collection; re-entrant, because
# a finalizer run by a collection may unload something, which collects again (a nested collect returns 0)
_lock = threading.RLock()
_enabled = True
_paused = 0  # paused() blocks running
_freezes = 0  # gc.freeze() calls so far: a load that saw one may have had part of itself frozen (freezes())
_saved_thresholds: tuple[int, ...] = gc.get_threshold()  # the collector's thresholds when the first of them began
#: the oldest generation's threshold while paused: young collections this many times over before a full one
NO_FULL_COLLECTIONS = 2**31 - 1
_first_done: set[str] = set()  # first_time() keys already seen


def configure(enabled: bool) -> None:
    """Switch freezing on or off for the process (the engine sets it from ``engine.gc_freeze``)."""
    global _enabled
    with _lock:
        _enabled = bool(enabled)
        if not _enabled:
            gc.unfreeze()  # off means off: what was frozen is the collector's again


def enabled() -> bool:
    """True when the survivors of a collection are frozen."""
    return _enabled


def collect(full: bool = True) -> int:
    """Unfreeze, run a full collection, and (when switched on) freeze what survived; the count collected.

    The one way to collect garbage in order to free memory. It walks every object of the process with the
    GIL held: call it where that is paid anyway (an unload, a failed load), never per request. ``full=False``
    (what was freed is known to be unfrozen: ``is_frozen``) collects only what is not frozen.
    """
    if not full and _enabled:
        with _lock:
            return gc.collect()
    with _lock:
        gc.unfreeze()  # frozen cycles are otherwise never found: an unloaded model's would stay in memory
        found = gc.collect()
        if _enabled:
            _freeze_now()
        return found


def _freeze_now() -> None:
    """``gc.freeze()``, counted (the caller holds ``_lock``)."""
    global _freezes
    gc.freeze()
    _freezes += 1


def freezes() -> int:
    """How many freezes ran so far in this process: a load that failed after one started may have left part of
    what it made frozen (another thread's first load froze mid-way), which only ``release()`` frees."""
    return _freezes


def is_frozen(obj: object) -> bool:
    """Whether ``obj`` may sit in the permanent generation: then only ``collect()`` frees its cycles.

    True when freezing is off too (then nothing is frozen, and the full collection is what frees memory).
    Walks the objects not frozen: few, once the start-up froze its own.
    """
    if not _enabled or not gc.is_tracked(obj):
        return True
    return all(o is not obj for o in gc.get_objects())


def tidy() -> None:
    """After a load: collect what is not frozen (the load's garbage) and leave what survives unfrozen, so its
    unload can be a ``collect(full=False)``; off: the same collection."""
    with _lock:
        gc.collect()


def freeze() -> None:
    """Collect what is not frozen yet and freeze what survives (after start-up and each load); off: nothing.

    Cheaper than ``collect()``: it walks only what was made since the last freeze (the new model's objects).
    Cycles among older frozen objects wait for the next ``collect()``.
    """
    with _lock:
        if _enabled:
            gc.collect()
            _freeze_now()


def freeze_alone() -> None:
    """Freeze what is not frozen, garbage and all, without collecting first (no walk: constant time); off: nothing.
    Only where what is new is known to be (nearly) all long-lived: imports (``FirstBlock.only_imported``)."""
    with _lock:
        if _enabled:
            _freeze_now()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic full collections while the block runs (process-wide; blocks may nest or overlap); off: nothing.

    For work that makes a million objects which live a while (a backend's first load importing torch
    and the model library, transformers reading a GGUF): they set off full collections that walk them
    all, again and again, holding the GIL (three of 0.2-0.37 s in one cold load of the tiny Llama; 23
    of 0.03-0.49 s while it read SmolLM2's GGUF weights). Young collections go on (the short-lived
    cycles of requests served meanwhile are still found); the full ones wait for one ``freeze()`` at the
    block's end (``one_collection``). The thresholds come back when the last block ends.
    """
    global _paused, _saved_thresholds
    with _lock:
        if _enabled:
            if _paused == 0:
                _saved_thresholds = gc.get_threshold()
                gc.set_threshold(*_saved_thresholds[:2], NO_FULL_COLLECTIONS)
            _paused += 1
            entered = True
        else:
            entered = False
    try:
        yield
    finally:
        if entered:
            with _lock:
                _paused -= 1
                if _paused == 0:
                    gc.set_threshold(*_saved_thresholds)


class FirstBlock:
    """What ``first_time`` yields: true in the key's first block, which can say it only imported modules."""

    def __init__(self, first: bool):
        self.first = first
        self.collect = True  # end in freeze() (a full collection first); False: the freeze alone

    def __bool__(self) -> bool:
        return self.first

    def only_imported(self) -> None:
        """This block only imported modules: it ends in a freeze without a full collection before it. That
        collection walked the imports' objects (0.15-0.17 s holding the GIL after torch, again after
        transformers) to find ~160 garbage objects, which are frozen instead (a few kB, once per process)."""
        self.collect = False


@contextlib.contextmanager
def first_time(key: str) -> Iterator[FirstBlock]:
    """The process's first block of ``key`` (a backend's first load, which imports its libraries) runs
    ``one_collection()`` (or, once it calls ``only_imported()``, ``paused()`` and a freeze alone); later blocks
    of ``key``: nothing special. Yields a ``FirstBlock``, true in the first block."""
    with _lock:
        first = key not in _first_done
        _first_done.add(key)  # (a failed first block imported its libraries all the same)
    if not first:
        yield FirstBlock(False)
        return
    block = FirstBlock(True)
    with paused():
        yield block
        if block.collect:
            freeze()
        else:
            freeze_alone()


@contextlib.contextmanager
def one_collection(freeze_after: bool = True) -> Iterator[None]:
    """``paused()`` for the block, then one ``freeze()`` (a full collection) before full collections resume;
    none if the block raises. ``freeze_after=False``: that collection is a ``tidy()``, nothing frozen.

    Transformers reading SmolLM2's GGUF tokenizer (its fields one Python object each) set off 5-9 full
    collections of 0.06-1.3 s each in a process frozen before; inside this block, only the freeze's.
    Such a read leaves garbage and a model, not imports: it needs no freeze (``freeze_after=False``), and
    a freeze would catch the model and every other model loaded since the last one, whose unloads then
    need the full collection ``is_frozen`` asks for.
    """
    with paused():
        yield
        if freeze_after:
            freeze()
        else:
            tidy()


def release(full: bool = True) -> None:
    """After an unload: ``collect(full)`` when freezing is on, so cycles the model left among frozen objects are
    freed (off, the collector finds them by itself), then give the freed heap back to the OS."""
    if _enabled:
        collect(full)
    heap.trim()  # else the allocator keeps what the model freed, and resident memory climbs with every swap


def release_after_failed_load(error: BaseException, freezes_before: int) -> None:
    """After a load that failed with ``error``: ``release()`` when a freeze ran since ``freezes_before``
    (``freezes()`` as it started). A freeze on another thread (a backend's or the embeddings' first load, the
    start) may have caught part of the model mid-load, weights too; no unload runs for a failed load, so only
    this frees them. The error's finished frames (and its causes') let go of their locals first: a library's
    ``model`` local there held the partial model for as long as the error lives (its waiters keep it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        _clear_plain_frames(error.__traceback__)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    if freezes() != freezes_before:
        release()


#: code flags of frames that can resume (a coroutine awaiting the collection, a generator): never cleared
_RESUMABLE = inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE


def _clear_plain_frames(tb: TracebackType | None) -> None:
    """Drop the locals of the finished plain-function frames of ``tb`` (clearing a suspended coroutine's frame
    would close it: the engine's own are in there, awaiting)."""
    while tb is not None:
        frame = tb.tb_frame
        if not frame.f_code.co_flags & _RESUMABLE:
            try:
                frame.clear()
            except RuntimeError:  # still running (this thread's own)
                pass
        tb = tb.tb_next
