"""Cancellable pulls: a flag each pull checks at every progress step, and a caller that never waits past a cancel.

A pull copies, downloads and hashes in chunks and reports each one, so it checks its flag there and
unwinds at once (its work directory deleted, so the store gains nothing). A GGUF conversion reports
between its steps only, and one step (transformers reading the weights) takes tens of seconds; so
the pull runs on a daemon thread of its own and the caller waits for it or for the cancel: a
cancelled pull returns within ``GRACE_SECONDS`` whatever it was doing, the process may exit without
waiting for that thread, and at exit the build directories of such abandoned pulls are deleted.
An abandoned pull lets go of its name's lock (a DELETE or load of the name need not wait for it), but a
new pull of that name in this process waits for its thread to end (``wait_for_left``) before building:
each cancel and retry would otherwise add one more full conversion at once, with no bound.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import threading
from concurrent.futures import Future, InvalidStateError, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from ..core.errors import PullStopped
from .atomic import FileLock, remove_tree
from .progress import ProgressFn, PullProgress

log = logging.getLogger("xllm_jupyter.store.store")

T = TypeVar("T")

#: how long a cancelled pull's caller waits for its thread to unwind (it deletes its files) before it leaves it
GRACE_SECONDS = 0.5


class PullJob:
    """One pull in flight: its cancel flag and the build directories it made (deleted if it is abandoned)."""

    def __init__(self, name: str, cancel: threading.Event | None = None, key: str | None = None):
        self.name = name
        self.cancel = cancel if cancel is not None else threading.Event()
        # what tells this name's pulls from other stores' (its lock file's path): a new pull waits for left ones
        self.key = key
        self.ended = threading.Event()  # set once its thread has unwound (``run_cancellable``)
        self.building: set[Path] = set()
        # the name's lock, while held: an abandoned pull lets go of it from its caller's thread (``let_go``), under
        # ``_guard``, which its own thread holds to release it and to write into models/ (``committing``)
        self._guard = threading.Lock()
        self._held: FileLock | None = None
        self._on_cancel: list[Callable[[], None]] = []  # (``when_cancelled``: a caller that awaits instead of waiting)
        # the hooks' own lock, not ``_guard``: its thread holds that while it writes into models/ (deleting the model a
        # forced pull replaced: seconds), and ``cancel_now`` runs on a shutdown's IOLoop
        self._hooks_lock = threading.Lock()

    def when_cancelled(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once ``cancel_now`` cancels the job (at once if it was already)."""
        with self._hooks_lock:
            if not self.cancel.is_set():
                self._on_cancel.append(hook)
                return
        hook()

    def cancel_now(self) -> None:
        """Set the cancel and call the ``when_cancelled`` hooks (a shutdown's ``cancel_all``)."""
        self.cancel.set()
        with self._hooks_lock:
            hooks, self._on_cancel = self._on_cancel, []
        for hook in hooks:
            hook()

    @contextmanager
    def holding(self, lock: FileLock) -> Iterator[None]:
        """Hold the name's ``lock`` for the block, unless the pull is left first (``let_go`` releases it then)."""
        lock.acquire()
        with self._guard:
            self._held = lock
        try:
            yield
        finally:
            self.let_go()

    @contextmanager
    def committing(self) -> Iterator[None]:
        """The block writes into ``models/``: PullStopped instead once the pull was cancelled, and a pull left
        meanwhile lets go of its name's lock only after the block (no other pull of the name writes there before)."""
        with self._guard:
            self.check()
            yield

    def let_go(self) -> None:
        """Release the name's lock now (a left pull's thread may stay in a library call for a minute: a pull or load
        of the name waited for it). Its thread writes nothing into ``models/`` after: ``committing`` checks the cancel."""
        with self._guard:
            held, self._held = self._held, None
            if held is not None:
                held.release()

    def check(self) -> None:
        """Raise PullStopped once the pull was cancelled."""
        if self.cancel.is_set():
            raise PullStopped(f"The pull of '{self.name}' was stopped before it finished (the server is shutting "
                              "down); nothing was added to the store: pull it again")

    def checking(self, report: ProgressFn | None) -> ProgressFn:
        """``report`` (or nothing) preceded by ``check``: every progress step of the pull is a cancel point."""
        def checked(event: PullProgress) -> None:
            self.check()
            if report is not None:
                report(event)

        return checked


#: the job of the pull running on this thread (its work directories register with it)
current_job: contextvars.ContextVar[PullJob | None] = contextvars.ContextVar("xllm_pull_job", default=None)

_abandoned: set[PullJob] = set()
_abandoned_lock = threading.Lock()

#: how often a pull waiting for a left pull of its name checks its own cancel
WAIT_STEP_SECONDS = 0.05


def waiting_status(name: str) -> str:
    """The progress stage of a pull waiting for an abandoned pull of its name (as Ollama's statuses, a phrase)."""
    return f"waiting for the cancelled pull of '{name}' to finish"


def left_pulls(key: str) -> list[PullJob]:
    """The abandoned pulls of the name ``key`` whose thread still runs (a conversion deaf to its cancel)."""
    with _abandoned_lock:
        return [job for job in _abandoned if job.key == key and not job.ended.is_set()]


def wait_for_left(job: PullJob, report: ProgressFn) -> None:
    """Block until no abandoned pull of ``job``'s name still runs, reporting the wait once; PullStopped (through
    ``job.check`` or ``report``) as soon as ``job`` is cancelled. Called before the name's lock is taken: a DELETE
    or load of the name goes on meanwhile, only a second conversion of it waits."""
    if job.key is None:
        return
    reported = False
    while True:
        left = [other for other in left_pulls(job.key) if other is not job]
        if not left:
            return
        if not reported:
            reported = True
            log.info("the pull of %s waits for its cancelled pull's thread to end", job.name)
            report(PullProgress(waiting_status(job.name), None, 0, None))
        job.check()
        left[0].ended.wait(WAIT_STEP_SECONDS)


class PullJobs:
    """The pulls in flight in one store, so that ``cancel_all`` (a shutdown) can stop them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: set[PullJob] = set()

    def adopt(self, job: PullJob, start: Callable[[], Future[T]]) -> Future[T]:
        """``start()``, the future of ``job``'s outcome, with ``job`` counted as in flight from before it starts (a
        ``cancel_all`` meanwhile must not miss it) until that future is done."""
        with self._lock:
            self._jobs.add(job)

        def done(_: object) -> None:
            with self._lock:
                self._jobs.discard(job)

        try:
            future = start()
        except BaseException:
            done(None)
            raise
        future.add_done_callback(done)
        return future

    @contextmanager
    def track(self, job: PullJob) -> Iterator[PullJob]:
        """Count ``job`` as in flight for the block."""
        with self._lock:
            self._jobs.add(job)
        try:
            yield job
        finally:
            with self._lock:
                self._jobs.discard(job)

    def cancel_all(self) -> int:
        """Cancel every pull in flight; how many were not cancelled yet."""
        with self._lock:
            jobs = [job for job in self._jobs if not job.cancel.is_set()]
        for job in jobs:
            job.cancel_now()
        return len(jobs)


def start_cancellable(job: PullJob, work: Callable[[], T]) -> Future[T]:
    """``work()`` started on a daemon thread of its own (in this context, with ``job`` current): a future its
    thread sets (cancelling the future stops nothing: ``job.cancel`` does)."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()  # (running: its ``cancel()`` is refused, the thread alone sets it)
    context = contextvars.copy_context()

    def run() -> None:
        current_job.set(job)
        try:
            _settle(future, work)
        finally:
            job.ended.set()
            with _abandoned_lock:  # unwound: its files are gone, nothing is left for the exit to delete
                _abandoned.discard(job)

    threading.Thread(target=context.run, args=(run,), name=f"xllm-pull-{job.name}", daemon=True).start()
    return future


def start_leaving(job: PullJob, work: Callable[[], T]) -> Future[T]:
    """``start_cancellable`` for a caller that awaits the future instead of waiting on a thread: ``job``'s
    ``cancel_now`` ends the future with PullStopped within ``GRACE_SECONDS`` whatever the work is doing (its
    thread is left, as ``run_cancellable`` leaves it)."""
    inner = start_cancellable(job, work)
    outer: Future[T] = Future()
    outer.set_running_or_notify_cancel()
    inner.add_done_callback(lambda _: _settle(outer, inner.result))

    def leave() -> None:
        _leave(job, inner)
        _settle(outer, inner.result if inner.done() else job.check)  # type: ignore[arg-type]

    def cancelled() -> None:
        with _abandoned_lock:  # counted left at once: a shutdown's exit may come within the grace (its files go then)
            if not inner.done():
                _abandoned.add(job)
        # a thread for the grace, made only on a cancel (a shutdown): no thread waits for the pull meanwhile
        threading.Thread(target=leave, name=f"xllm-leave-{job.name}", daemon=True).start()

    job.when_cancelled(cancelled)
    return outer


def _settle(future: Future, outcome: Callable[[], object]) -> None:
    """Set ``future`` to what ``outcome()`` returns or raises, unless it is set already."""
    try:
        value = outcome()
    except BaseException as exc:  # handed to whoever awaits the future
        try:
            future.set_exception(exc)
        except InvalidStateError:
            pass
        return
    try:
        future.set_result(value)
    except InvalidStateError:
        pass


def run_cancellable(job: PullJob, work: Callable[[], T]) -> T:
    """``work()`` on a daemon thread (in this context, with ``job`` current): its result or error, or PullStopped
    within ``GRACE_SECONDS`` of a cancel even while ``work`` is inside a long library call."""
    future = start_cancellable(job, work)
    try:
        while not wait([future], 0.05).done:
            if job.cancel.is_set():
                _leave(job, future)
                break
    except BaseException:  # a Ctrl-C in `xllm pull` (raised on this thread): the pull unwinds, its files deleted
        job.cancel.set()
        _leave(job, future)
        raise
    if not future.done():  # cancelled and left (one that ended in the grace gives its own outcome, below)
        job.check()  # (outside the try: its PullStopped is no Ctrl-C, to be given a second grace)
    return future.result()


def _leave(job: PullJob, future: Future) -> None:
    """Give a cancelled pull ``GRACE_SECONDS`` to unwind; past that, leave its thread to the process's exit."""
    if wait([future], GRACE_SECONDS).done:
        return
    log.warning("the pull of %s stops at its next step; leaving it (its files are deleted then, or at exit)", job.name)
    job.let_go()  # (cancelled: it can no longer write into models/, so the name's next pull or load need not wait)
    with _abandoned_lock:
        # (one that ended meanwhile took itself out already; a server whose pulls' clients leave keeps no trace of each)
        if not future.done():
            _abandoned.add(job)


@atexit.register
def _remove_abandoned() -> None:
    """Delete what abandoned pulls built so far (their thread is stuck in a library call that writes nothing there:
    its next step checks the cancel first); what a crash leaves instead, the next pull deletes."""
    with _abandoned_lock:
        jobs = list(_abandoned)
    for job in jobs:
        for path in list(job.building):
            remove_tree(path)
            Path(f"{path}.lock").unlink(missing_ok=True)
