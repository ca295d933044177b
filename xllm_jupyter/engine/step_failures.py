"""What the engine thread does when a batched step raises: fail the requests to blame, not everyone.

On a shared engine one request's prefill (a long prompt running out of memory, inputs that
trip a backend error) must not end every other user's stream. The suspects are the jobs
added to the backend since the last step that returned; a backend that can resume drops
the ones it blames (``LoadedModel.drop_failed``) and the step runs again for the rest. Each
retry removes at least one suspect and admits nothing, so the loop ends; a step that still
fails with no suspect left fails every running job, as one whose backend cannot resume does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..backends.torch_device import is_out_of_memory
from ..core.errors import EngineError, InvalidRequest, Overloaded, XllmError

if TYPE_CHECKING:  # (the mixin's host; typing only)
    from ..backends.base import LoadedModel
    from .delivery import RequestHandle

log = logging.getLogger(__name__)


class StepFailures:
    """ModelRunner's handling of a step that raised (a mixin: it works on the runner's own state)."""

    if TYPE_CHECKING:  # what it uses of its host
        model: LoadedModel
        _jobs: dict[int, Any]
        _fresh: set[int]  # the jobs added to the backend since the last step that returned
        _counters: Any

        def _step(self) -> None: ...

        def _fail(self, handle: RequestHandle, exc: XllmError) -> None: ...

        def cancel(self, job_ids: list[int]) -> None: ...

    def _step_failed(self, exc: Exception) -> None:
        """``exc`` came out of a step: fail the jobs the backend blames and step the rest again, or fail all."""
        while True:
            self._counters.failed_steps += 1
            if not self._isolate(exc):
                break
            self._counters.isolated_failures += 1
            try:
                self._step()  # nothing was admitted since: a failure now has fewer suspects, or none
                return
            except Exception as again:
                log.exception("the retried step of %s failed too", self.model.name)
                exc = again
        ids = _log_ids(state.handle for state in self._jobs.values() if not state.done)
        log.error("failing every running job of %s (requests %s)", self.model.name, ids, extra={"request_id": ids})
        self._recover()

    def _isolate(self, exc: Exception) -> bool:
        """Fail the suspects the backend dropped (True), or leave the batch to ``_recover`` (False)."""
        suspects = frozenset(self._fresh & self._jobs.keys())
        try:
            blamed = self.model.drop_failed(suspects)
        except Exception:
            log.exception("%s could not drop the jobs of its failed step", self.model.name)
            return False
        if not blamed or not blamed <= suspects:
            return False
        self._fresh -= blamed
        err = _blame_error(exc)
        ids = _log_ids(self._jobs[j].handle for j in blamed)
        # (the engine thread has no request's context: the record names the requests, as the access log does)
        log.warning("%s: failing %d new job(s) alone after a failed step (requests %s); %d go on", self.model.name,
                    len(blamed), ids, len(self._jobs) - len(blamed), extra={"request_id": ids})
        for job_id in blamed:
            state = self._jobs.pop(job_id)  # the backend forgot it: no event of it will come
            if state.done:
                continue
            state.done = True
            self._fail(state.handle, err)
            for sibling in state.handle.job_ids:  # its request's other choices end with it
                other = self._jobs.get(sibling)
                if other is not None and not other.done:
                    other.done = True
                    self.model.cancel(sibling)
            self.cancel(state.handle.job_ids)  # (choices still waiting for a batch slot)
        return True

    def _recover(self) -> None:
        """Fail every running job and drop it from the backend; raises if the backend is broken."""
        err = EngineError("The engine failed while generating")
        self._fresh.clear()
        for job_id, state in list(self._jobs.items()):
            if not state.done:
                self._fail(state.handle, err)
                state.done = True
            self.model.cancel(job_id)
        self._jobs.clear()
        # one step lets the backend free the cancelled jobs; if this fails too the thread dies
        if self.model.active_jobs():
            self.model.step()
        if self.model.active_jobs():
            raise EngineError("the backend kept jobs after they were cancelled")


def _log_ids(handles: Iterable[RequestHandle]) -> str:
    """The HTTP request ids of ``handles``, each once, comma-separated ("-" for none)."""
    return ",".join(dict.fromkeys(h.log_id for h in handles)) or "-"


def _blame_error(exc: BaseException) -> XllmError:
    """What a request blamed for a failed step gets: a 503 when memory ran out, else a 500 (no trace, no path)."""
    seen: BaseException | None = exc
    for _ in range(8):  # (a backend may wrap the library's error; the chain is short)
        if seen is None:
            break
        if is_out_of_memory(seen):
            return out_of_memory_error()
        seen = seen.__cause__ or seen.__context__
    return EngineError("The engine failed while starting this generation")


def constraint_failure(reason: str) -> InvalidRequest:
    """The 400 of a request whose output constraint could not be followed while generating."""
    return InvalidRequest(f"The output could not follow the request's schema or grammar ({reason}); simplify it "
                          "(response_format, or the tools of a forced tool call)", param="response_format",
                          code="constraint_failed")


def out_of_memory_error() -> Overloaded:
    """The 503 of a request the device had no memory for (clients retry a 503)."""
    return Overloaded("The GPU ran out of memory for this request; retry it, or shorten its prompt")
