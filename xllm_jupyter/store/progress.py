"""Pull progress events, and the wrappers the store puts around a caller's progress callback."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Callable

from ..core.errors import StoreError

log = logging.getLogger("xllm_jupyter.store")

PROGRESS_MARK = "_xllm_progress_error"  # set on exceptions raised by a caller's progress callback


@dataclass(frozen=True)
class PullProgress:
    """One progress report of a pull: ``stage`` is download, copy (a local or packaged source), convert, verify or
    done; done/total in ``unit``."""

    stage: str
    file: str | None
    done: int
    total: int | None
    unit: str = "bytes"  # or "steps" (a conversion: its stages, not bytes)


ProgressFn = Callable[[PullProgress], None]

#: the admin route's ``status`` for a stage clients did not know before it (a copy moves bytes as a download does:
#: clients that switch on ``status`` to draw a byte bar keep drawing it; the stage itself goes in ``stage``)
WIRE_STATUS = {"copy": "download"}


def wire_status(stage: str) -> str:
    """The ``status`` the pull route sends for ``stage`` (its ``stage`` field names it when the two differ)."""
    return WIRE_STATUS.get(stage, stage)


def guard_progress(progress: ProgressFn | None) -> ProgressFn | None:
    """Wrap the caller's callback so its exceptions are marked and pass through untranslated."""
    if progress is None:
        return None

    def report(event: PullProgress) -> None:
        try:
            progress(event)
        except BaseException as exc:
            try:
                setattr(exc, PROGRESS_MARK, True)
            except Exception:  # pragma: no cover - exceptions with __slots__
                pass
            raise

    return report


def from_callback(exc: BaseException) -> bool:
    """True when ``exc`` was raised by the caller's progress callback."""
    return bool(getattr(exc, PROGRESS_MARK, False))


def translate_os_error(exc: OSError) -> None:
    """Re-raise a file-system error as a StoreError with no paths in it (a callback's own error passes through)."""
    if from_callback(exc):
        raise exc
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreError("Not enough disk space in the model store") from None
    raise StoreError(f"File system error in the model store: {exc.strerror or exc.__class__.__name__}") from None


class LogProgress:
    """Progress for pulls nobody watches (first-use pulls in resolve): log each stage and quarter."""

    def __init__(self, name: str):
        self.name = name
        self.last: tuple | None = None

    def __call__(self, event: PullProgress) -> None:
        """Log ``event`` when its stage, file or quarter changed."""
        quarter = (4 * event.done // event.total) if event.total else 0
        key = (event.stage, event.file, quarter)
        if key != self.last:
            self.last = key
            log.info("pull %s: %s %s %d%%", self.name, event.stage, event.file or "", 25 * quarter)
