"""One worker thread per loaded model: continuous batching and the bridge to asyncio.

The thread owns the LoadedModel. Between two steps it admits waiting jobs (up to the batch limit) and applies
cancellations, so new requests join the running batch instead of waiting for it to drain. What the steps make is
held in an outbox and handed to the asyncio side paced by ``stream_interval`` (delivery.py: request handles, pacing
and merging). A request's first delta, its end and errors are never held back, so time to first token is unchanged.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..backends.base import LoadedModel, unload_each
from ..backends.detokenize import token_text
from ..core.errors import BadModelOutput, EngineError, Overloaded, Unsupported, XllmError
from ..core.types import (
    ChoiceDelta,
    EngineStats,
    FinishReason,
    GenerationDone,
    GenerationRequest,
    SequenceJob,
    TokenEvent,
    TokenLogprob,
    Usage,
    UserSequences,
)
from .delivery import END, RequestHandle, coalesce, deliver_all, paced_interval
from .fairness import FairnessPolicy, FairQueue
from .loop_wake import LoopWaker, ThreadsafeWaker
from .retirement import Retirement
from .step_failures import StepFailures, constraint_failure, out_of_memory_error
from .stops import MarkedStopMatcher, StopMatcher, stop_matcher

log = logging.getLogger(__name__)

@dataclass
class _JobState:
    """Engine-thread bookkeeping for one sequence (one choice of one request)."""

    handle: RequestHandle
    index: int
    stops: StopMatcher | MarkedStopMatcher
    tokens: int = 0
    done: bool = False  # no more deltas go out for this job
    completed: bool = False  # it ended normally (stop, length, stop string)


@dataclass
class _Counters:
    steps: int = 0
    max_batch: int = 0
    batched_steps: int = 0
    completed: int = 0
    cancelled: int = 0
    tokens: int = 0
    failed_steps: int = 0
    isolated_failures: int = 0


class ModelRunner(StepFailures, Retirement):
    """Owns a LoadedModel and runs its step loop on a dedicated thread (a failed step: step_failures.py; jobs
    retired with a reason: retirement.py)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch_size: int = 16,
        fairness: FairnessPolicy = FairnessPolicy(),
        stream_interval: float = 0.0,
    ):
        self.model = model
        self.max_batch_size = max(1, max_batch_size)
        self.stream_interval = max(0.0, stream_interval)  # seconds between deliveries (0 = every step)
        self._outbox: dict[RequestHandle, list] = {}  # engine thread: items not yet handed to the loops
        self._delivered_at = 0.0
        self.created = int(time.time())
        self._cond = threading.Condition()
        self._waiting: FairQueue[tuple[SequenceJob, _JobState]] = fairness.queue()  # per-user round-robin (fairness.py)
        self._cancels: list[int] = []
        self._reasons: dict[int, XllmError] = {}  # under _cond: what the requests of jobs the engine retires fail with
        self._jobs: dict[int, _JobState] = {}
        self._fresh: set[int] = set()  # engine thread: jobs added to the model since its last step returned
        self._stopping = False
        self._counters = _Counters()
        self._thread = threading.Thread(target=self._run, name=f"xllm-runner-{model.name}", daemon=True)
        self._warmed = threading.Event()  # set once the model's warm-up has ended, well or not
        self._exited = False  # under _cond: the step thread has left its loop
        self._close_at_exit = False  # under _cond: shutdown timed out, the thread closes itself
        self._close_reason: XllmError | None = None  # under _cond: what open requests fail with at shutdown
        self._closed = threading.Event()  # set once the model is unloaded
        self.error: BaseException | None = None

    # ------------------------------------------------------------ any thread
    def start(self) -> None:
        """Start the step thread; it warms the model up before taking jobs (see ``wait_ready``)."""
        self._thread.start()

    def wait_ready(self) -> None:
        """Block until the step thread has warmed the model up; EngineError if that failed."""
        self._warmed.wait()
        if self.error is not None:
            raise EngineError(f"Preparing model '{self.model.name}' failed ({type(self.error).__name__})") \
                from self.error

    @property
    def alive(self) -> bool:
        """True while the step thread runs."""
        return self._thread.is_alive()

    def __len__(self) -> int:
        """Sequences running or waiting."""
        return len(self._jobs) + len(self._waiting)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> RequestHandle:
        """Queue ``request``'s n sequences; returns the handle to iterate."""
        if not self.alive:
            raise EngineError("The model's engine thread is not running")
        params = request.params
        if params.prompt_logprobs and not self.model.scores_prompts:  # (serving refuses it first, in its words)
            raise Unsupported(f"The {self.model.backend_name} backend cannot score prompt tokens", param="echo")
        handle = RequestHandle(self, loop, request)
        pending = []
        for index in range(params.n):
            sampling = params.sampling
            if sampling.seed is not None and index:  # distinct but reproducible choices for n > 1
                sampling = dataclasses.replace(sampling, seed=sampling.seed + index)
            job = SequenceJob(
                job_id=next(self._ids),
                prompt_ids=request.prompt_ids,
                max_tokens=params.max_tokens,
                sampling=sampling,
                stop_token_ids=handle.stop_token_ids,
                logprobs=params.logprobs,
                top_logprobs=params.top_logprobs,
                constraint=params.constraint,
                adapter=request.adapter,
                user=request.user,
                cache_namespace=request.cache_namespace,
                prompt_logprobs=params.prompt_logprobs and not index,  # every choice shares the first's scores
                keep_special=params.keep_special,
            )
            handle.job_ids.append(job.job_id)
            pending.append((job, _JobState(handle, index, stop_matcher(params))))
        with self._cond:
            self._waiting.extend(pending)
            self._cond.notify()
        return handle

    def cancel(self, job_ids: list[int]) -> None:
        """Ask the step thread to drop these jobs before its next step."""
        with self._cond:
            self._cancels.extend(job_ids)
            self._cond.notify()

    def stats(self) -> EngineStats:
        """A snapshot of this runner's counters."""
        c = self._counters
        return EngineStats(
            running=len(self._jobs),
            queued=len(self._waiting),
            steps=c.steps,
            max_batch=c.max_batch,
            batched_steps=c.batched_steps,
            completed=c.completed,
            cancelled=c.cancelled,
            tokens=c.tokens,
            failed_steps=c.failed_steps,
            isolated_failures=c.isolated_failures,
        )

    def user_counts(self) -> dict[str, UserSequences]:
        """Each user's sequences on this runner now ("" for anonymous requests)."""
        with self._cond:
            queued = self._waiting.counts()
            # admitted jobs enter _jobs under the lock (no gap after _waiting); the step thread removes them
            # outside it, so list() copies the dict in one C call
            running = Counter(s.handle.request.user or "" for s in list(self._jobs.values()))
        return {user: UserSequences(running[user], queued[user]) for user in running.keys() | queued.keys()}

    def shutdown(self, timeout: float | None = 30.0, reason: XllmError | None = None) -> bool:
        """Stop the thread (waiting up to ``timeout`` s; None: until it ends), fail open requests, unload.

        Open requests fail with ``reason`` (default: a 503 saying the model was unloaded, which
        clients retry). False when the thread was still in a step at the timeout: the model is
        then unloaded by that thread once its step returns, never under a running step.
        """
        with self._cond:
            self._stopping = True
            if reason is not None:
                self._close_reason = reason
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            # a step can sit for minutes (another model compiling holds the compile gate);
            # freeing its weights now would pull them from under it (exllamav2: freed C handles)
            deferred = self._close_at_exit = not self._exited and self._thread.is_alive()
        if deferred:
            log.warning("the engine thread of %s is still in a step after %ss; it unloads the model when the "
                        "step ends", self.model.name, timeout)
            return False
        self._close()
        return True

    def _close(self) -> None:
        """Fail what is still open and unload the model (no step may be running)."""
        try:
            gone = self._close_reason or Overloaded(f"The model '{self.model.name}' was unloaded while this request "
                                                    "ran; retry the request")
            for _, state in list(self._waiting):
                self._fail(state.handle, gone)
            for state in list(self._jobs.values()):
                self._fail(state.handle, gone)
            self._waiting.clear()
            self._jobs.clear()
            unload_each([self.model])  # (best effort: the runner is gone either way)
        finally:
            self._closed.set()  # whatever happened: an eviction waiting on it must go on

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until a shutdown has unloaded the model (False: ``timeout`` s passed first)."""
        return self._closed.wait(timeout)

    # ------------------------------------------------------ engine thread only
    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._cond:
                self._exited = True
                close = self._close_at_exit
            if close:
                self._close()

    def _serve(self) -> None:
        try:
            self.model.warm_up()  # here, not on the loading thread: compiled graphs belong to this thread
        except BaseException as exc:
            self.error = exc
            log.exception("warming up %s failed", self.model.name)
            return
        finally:
            self._warmed.set()
        try:
            while self._admit():
                try:
                    self._step()
                except Exception as exc:
                    log.exception("a step of %s failed", self.model.name)
                    self._step_failed(exc)
        except BaseException as exc:  # a dead runner must be visible: healthy turns False
            self.error = exc
            log.exception("engine thread for %s died", self.model.name)
            err = EngineError("The engine failed while generating")
            with self._cond:  # queued requests too: nothing will ever admit them
                waiting = list(self._waiting)
                self._waiting.clear()
            for state in [s for _, s in waiting] + list(self._jobs.values()):
                self._fail(state.handle, err)
            self._jobs.clear()

    def _room(self) -> Callable[[tuple[SequenceJob, _JobState]], bool] | None:
        """The model's room for new jobs as a claim-as-you-go predicate (None: the batch limit only)."""
        check = self.model.admission_check()
        return None if check is None else (lambda item: check(item[0]))

    def _admit(self) -> bool:
        """Apply cancellations and admit waiting jobs; block while idle. False = stop."""
        if self._outbox and not self._jobs:
            self._deliver()  # nothing runs that would trigger it later
        with self._cond:
            while not self._stopping and not self._cancels and not self._jobs and not self._waiting:
                self._cond.wait()
            if self._stopping:
                return False
            cancels, self._cancels = self._cancels, []
            reasons = {i: self._reasons.pop(i) for i in cancels if i in self._reasons} if self._reasons else {}
            if cancels:
                dropped = set(cancels)
                for job, state in [item for item in self._waiting if item[0].job_id in reasons]:
                    self._fail_once(state, reasons[job.job_id])
                self._counters.cancelled += self._waiting.remove_if(lambda item: item[0].job_id in dropped)
            admitted = []
            free = self.max_batch_size - len(self._jobs)
            if self._waiting and free > 0:
                running = (s.handle.request.user or "" for s in self._jobs.values())
                admitted = self._waiting.take(free, running, self.max_batch_size, self._room())
                # into _jobs under the lock, in the same breath as they leave _waiting: a job between the
                # two would count as neither running nor queued (user_counts, len(), the max_queue check)
                for job, state in admitted:
                    self._jobs[job.job_id] = state
                    state.handle.admitted()  # (under the lock: a cancel either finds it queued or sees this)
        for job_id in cancels:
            state = self._jobs.get(job_id)
            if state is not None:
                reason = reasons.get(job_id)
                if reason is not None:
                    self._fail_once(state, reason)
                state.done = True
                self.model.cancel(job_id)
        if admitted and self._outbox:
            self._deliver()  # the next step prefills and may take long: do not hold tokens over it
        for job, state in admitted:
            try:
                self.model.add(job)
                self._fresh.add(job.job_id)
            except Exception as exc:  # a job the backend refuses fails alone, not the thread
                reason = self._retired_reason(job.job_id)  # retired meanwhile (its adapter detached under the add)
                if reason is None and not isinstance(exc, XllmError):
                    log.exception("adding a job to %s failed", self.model.name)
                    exc = EngineError("The engine could not start this generation")
                del self._jobs[job.job_id]  # the backend never had it: no event would ever remove it
                self._fail_once(state, reason or exc)
                self.cancel(state.handle.job_ids)
        return True

    def _step(self) -> None:
        if not self._jobs:
            return
        batch = self.model.active_jobs()
        events = self.model.step()
        self._fresh.clear()
        c = self._counters
        c.steps += 1
        if batch > c.max_batch:
            c.max_batch = batch
        if batch > 1:
            c.batched_steps += 1
        outbox = self._outbox
        urgent = False
        for event in events:
            state = self._jobs.get(event.job_id)
            if state is None:
                continue
            if event.finish is not None:
                del self._jobs[event.job_id]
                self._waiting.ended(state.handle.request.user or "")  # (the fairness reserve's activity window)
            if state.done:
                # finished early (stop string or cancel): the backend's last word is ignored
                if event.finish is FinishReason.CANCELLED and not state.completed:
                    c.cancelled += 1
                continue
            handle = state.handle
            items = outbox.get(handle)
            if items is None:
                items = outbox[handle] = []
            if self._translate(state, event, items) or not handle.started:
                urgent = True
        if outbox and (urgent or time.monotonic() - self._delivered_at >= paced_interval(self.stream_interval, batch)):
            self._deliver(quiet=not urgent)

    def _deliver(self, quiet: bool = False) -> None:
        """Hand every held item to its event loop, one call per loop (``quiet``: paced, see loop_wake.py)."""
        outbox, self._outbox = self._outbox, {}
        self._delivered_at = time.monotonic()
        by_loop: dict[LoopWaker | ThreadsafeWaker, list] = {}  # per loop (its waker)
        for handle, items in outbox.items():
            if not items:
                continue
            handle.started = True
            by_loop.setdefault(handle.waker, []).append((handle, coalesce(items) if len(items) > 1 else items))
        for waker, deliveries in by_loop.items():
            try:
                waker.post(deliver_all, (deliveries,), quiet)
            except RuntimeError:  # the loop closed: its requests are gone
                for handle, _ in deliveries:
                    self.cancel(handle.job_ids)

    def _translate(self, state: _JobState, event: TokenEvent, items: list) -> bool:
        """Turn a backend event into a ChoiceDelta (and GenerationDone after the last choice).

        True when the choice ended (or failed): then nothing may be held back.
        """
        handle = state.handle
        if event.token_id is not None:
            state.tokens += 1
            self._counters.tokens += 1  # (only this thread writes it; readers take a snapshot)
            handle.first_token_at = handle.first_token_at or time.perf_counter()  # (its timings' prompt part ends)
        # any event may carry it (exllama: the first token), so a choice ended by a stop string keeps it
        if event.cached_tokens > handle.cached_tokens:
            handle.cached_tokens = event.cached_tokens
        text, stop_reason = state.stops.feed(event.text) if event.text else ("", None)
        finish = event.finish
        if finish is not None and finish in (FinishReason.CANCELLED, FinishReason.ERROR):
            # we did not ask for this: the backend dropped the job on its own (or, detaching its adapter, before
            # this thread applied the engine's retire_adapter: then its reason is waiting)
            state.done = True
            reason = self._retired_reason(event.job_id)
            self._fail(handle, reason if reason is not None else out_of_memory_error() if event.out_of_memory
                       else constraint_failure(event.constraint_error) if event.constraint_error
                       else BadModelOutput(event.error) if event.error
                       else EngineError("The engine stopped this generation unexpectedly"))
            self.cancel(handle.job_ids)
            return True
        if stop_reason:
            if finish is None:
                # free the job's cache now; the backend's CANCELLED event for it is ignored
                self.model.cancel(event.job_id)
                self._jobs[event.job_id] = state
            finish = FinishReason.STOP
        elif finish is not None:
            text += state.stops.flush()
            if finish is FinishReason.STOP:
                stop_reason = handle.stop_reason_for(event.token_id)
        if event.prompt_logprobs is not None:  # (before the choice's first delta: serving echoes the prompt first)
            items.append(event.prompt_logprobs)
        logprobs = (_token_logprob(event, event.logprob),) if event.logprob is not None else ()
        ids = (event.token_id,) if event.token_id is not None else ()
        if text or ids or finish is not None:
            items.append(ChoiceDelta(state.index, text, ids, logprobs, finish, stop_reason))
        if finish is None:
            return False
        state.done = state.completed = True
        self._counters.completed += 1
        handle.completion_tokens += state.tokens
        handle.open_choices -= 1
        if handle.open_choices == 0:
            usage = Usage(len(handle.request.prompt_ids), handle.completion_tokens, handle.cached_tokens)
            items += (GenerationDone(usage, handle.timings()), END)
        return True

    def _fail(self, handle: RequestHandle, exc: XllmError) -> None:
        # what the request already made goes first, so nothing is lost before the error
        items = self._outbox.pop(handle, None) or []
        items.append(copy.copy(exc))  # its own: one instance raised in many requests collects all their frames
        try:
            handle.waker.post(handle.deliver, (items,))  # (the loop's one channel: after what was delivered before)
        except RuntimeError:
            pass


def _token_logprob(event: TokenEvent, logprob: float) -> TokenLogprob:
    """The logprob entry of ``event``'s token, from its own bytes (a backend without them: its released text)."""
    raw = event.token_bytes if event.token_bytes is not None else event.text.encode("utf-8")
    top = event.top_logprobs
    top_raw = event.top_bytes if len(event.top_bytes) == len(top) else tuple(t.encode("utf-8") for t, _ in top)
    return TokenLogprob(token_text(raw), logprob, top, raw, top_raw)
