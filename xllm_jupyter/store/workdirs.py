"""The store's ``tmp/``: locked work directories for pulls, and the clean-up of what interrupted ones left there.

A pull builds its model in ``tmp/pull-<random>`` (a Hub download in ``tmp/hub-<key>``, kept after a failure so
that a retry resumes it); a replaced model waits in ``tmp/old-<random>``, a removed one in ``tmp/rm-<random>``,
until deleted. Each entry in use has its ``.lock`` beside it, held: the clean-up deletes only what nobody holds.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .atomic import FileLock, remove_tree, try_lock
from .cancel import current_job

log = logging.getLogger("xllm_jupyter.store.store")  # the store's one logger, as before the split

HUB_RESUME_SECONDS = 7 * 86400  # how long an unfinished Hub download is kept for a retry to resume


class WorkdirMixin:
    """ModelStore's work directories in ``tmp/``; the store owns the directory."""

    tmp: Path

    @contextmanager
    def _workdir(self, prefix: str, keep_on_error: bool = False) -> Iterator[Path]:
        """A locked directory in ``tmp/``; deleted on error unless ``keep_on_error`` (resumable)."""
        name = prefix if keep_on_error else f"{prefix}-{secrets.token_hex(8)}"
        lock = FileLock(self.tmp / f"{name}.lock")
        if not lock.acquire(blocking=False):  # someone else is downloading the same thing: start afresh
            name, keep_on_error = f"pull-{secrets.token_hex(8)}", False
            lock = FileLock(self.tmp / f"{name}.lock")
            lock.acquire()
        path = self.tmp / name
        job = None if keep_on_error else current_job.get()  # (a Hub download is kept to resume, cancelled or not)
        if job is not None:
            job.building.add(path)  # deleted at exit if the pull is abandoned mid-step
        try:
            path.mkdir(exist_ok=keep_on_error)
            os.utime(path)  # a resumed download is fresh again for the clean-up clock
            yield path
        except BaseException:
            if not keep_on_error:
                remove_tree(path)
            raise
        finally:
            if not path.exists():
                lock.path.unlink(missing_ok=True)
            lock.release()
            if job is not None:
                job.building.discard(path)

    def _clean_tmp(self) -> None:
        """Delete what crashed pulls and removals left in ``tmp/`` (unless still in use)."""
        if not self.tmp.is_dir():
            return
        now = time.time()
        for entry in self.tmp.iterdir():
            if entry.name.endswith(".lock"):
                if not (self.tmp / entry.name[: -len(".lock")]).exists():
                    held = try_lock(entry, entry)
                    if held is not None:
                        entry.unlink(missing_ok=True)
                        held.release()
                continue
            if not entry.name.startswith(("pull-", "old-", "rm-", "hub-")):
                continue
            lock_path = self.tmp / f"{entry.name}.lock"
            held = try_lock(lock_path, entry)
            if held is None:
                continue
            try:
                try:
                    age = now - entry.stat().st_mtime
                except FileNotFoundError:  # its pull ended after the listing (renamed into models/): nothing was left
                    lock_path.unlink(missing_ok=True)
                    continue
                if entry.name.startswith("hub-") and age < HUB_RESUME_SECONDS:
                    continue
                log.info("removing leftover %s from an interrupted store operation", entry.name)
                remove_tree(entry)
                lock_path.unlink(missing_ok=True)
            finally:
                held.release()
