"""Jobs the engine ends on purpose, with a reason their clients hear (a LoRA adapter being detached).

The step thread owns the batch, so the engine does not fail such jobs itself: it files each job's reason
with a cancel (``retire_adapter``), and the step thread fails the job's request with that reason when it
applies the cancel, or when the backend drops the job first (its CANCELLED event, or an add refused for
an adapter already detached). Without it those requests read as engine failures (500) or unknown models (404).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.errors import XllmError

if TYPE_CHECKING:  # (the mixin's host; typing only)
    import threading

    from .delivery import RequestHandle


class Retirement:
    """ModelRunner's retiring of jobs with a reason (a mixin: it works on the runner's own state)."""

    if TYPE_CHECKING:  # what it uses of its host
        _cond: threading.Condition
        _waiting: Any
        _jobs: dict[int, Any]
        _cancels: list[int]
        _reasons: dict[int, XllmError]  # under _cond: job id -> what its request fails with

        def _fail(self, handle: RequestHandle, exc: XllmError) -> None: ...

    def retire_adapter(self, adapter: str, reason: XllmError) -> None:
        """Fail the waiting and running requests that decode with LoRA ``adapter`` with ``reason`` (it is being
        detached: the backend drops its jobs, which must not read as an engine failure)."""
        with self._cond:
            jobs = [job.job_id for job, _ in self._waiting if job.adapter == adapter]
            # (admitted jobs enter _jobs under this lock; the step thread only removes them)
            jobs += [i for i, s in list(self._jobs.items()) if s.handle.request.adapter == adapter]
            self._reasons.update(dict.fromkeys(jobs, reason))
            self._cancels.extend(jobs)
            self._cond.notify()

    def _retired_reason(self, job_id: int) -> XllmError | None:
        """The reason filed for ``job_id`` (taken: it is used once); None when the engine did not retire it."""
        with self._cond:
            return self._reasons.pop(job_id, None)

    def _fail_once(self, state: Any, exc: XllmError) -> None:
        """Fail ``state``'s request with ``exc`` unless one of its jobs already ended it (n > 1: one error)."""
        if not state.done and not state.handle.failed:
            state.handle.failed = True
            self._fail(state.handle, exc)
        state.done = True
