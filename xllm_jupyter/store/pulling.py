"""Pulling into the store: build a model in ``tmp/``, write its manifest last, rename it into ``models/``.

``ModelStore`` (store.py) reads and removes; this mixin adds and replaces, under the
name's file lock, so a model directory is either complete or absent.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from ..core.errors import ModelNotFound, StoreError, XllmError, quoted
from .atomic import FileLock, aside_lock, fix_modes, fsync_dir, fsync_tree, remove_tree, replace_dir
from .cancel import PullJob, PullJobs, current_job, left_pulls, run_cancellable, start_leaving, wait_for_left
from .generation_defaults import write_sampling
from .hub import HubClient
from .hub_pull import HubPullMixin
from .local import copy_dir, copy_file, holds_files, list_dir_files
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    compute_digest,
    adapter_parameters,
    detect_format,
    detect_task,
    set_adapter_base,
    with_adapter_base,
    hash_file,
    read_manifest,
    read_template,
    write_manifest,
)
from .names import canonical_name, child_dir, name_to_dirname, safe_relpath, validate_name
from .packaged import PACKAGED
from .progress import ProgressFn, PullProgress, guard_progress, translate_os_error
from .sources import Source, parse_source
from .workdirs import WorkdirMixin

log = logging.getLogger("xllm_jupyter.store.store")  # the store's one logger, as before the split


class PullMixin(HubPullMixin, WorkdirMixin):
    """ModelStore's pull pipeline; the store owns the directories and the reads it uses."""

    home: Path
    models: Path
    tmp: Path
    locks: Path
    endpoint: str | None
    token: str | bool | None
    _dir: Callable[[str], Path]
    _check_files: Callable[[Manifest], None]
    show: Callable[[str], Manifest]
    _pull_jobs: PullJobs

    def pull(
        self,
        source: str,
        name: str | None = None,
        *,
        revision: str | None = None,
        progress: Callable[[PullProgress], None] | None = None,
        force: bool = False,
        convert: bool = False,
        base: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Manifest:
        """Add a model from ``source`` (packaged name, ``hf:ORG/REPO``, ``ORG/REPO``, local dir or .gguf).

        Pulling a name that exists from the same source returns it (a Hub source whose
        commit moved, or a local path whose files changed, is updated); another source needs ``force``. ``convert`` turns a GGUF
        into safetensors (packaged defaults always are). ``base`` names the stored model a
        LoRA adapter applies to (default: its adapter_config.json's base_model_name_or_path).

        Setting ``cancel`` (or ``cancel_pulls``) stops the pull at its next step with PullStopped, its files
        deleted; this call returns within seconds of it even while a conversion is inside a long library call.
        """
        job, work = self._pull_work(source, name, revision, progress, force, convert, base, cancel)
        with self._pull_jobs.track(job):
            return run_cancellable(job, work)

    def pull_later(self, source: str, name: str | None = None, *, progress: ProgressFn | None = None) -> Future[Manifest]:
        """``pull`` on a thread of its own, its caller waiting on none: a future of the manifest or the error (a
        first use's pull, awaited on an event loop); ``cancel_pulls`` ends it with PullStopped within the grace."""
        job, work = self._pull_work(source, name, None, progress, False, False, None, None)
        return self._pull_jobs.adopt(job, lambda: start_leaving(job, work))

    def _pull_work(self, source: str, name: str | None, revision: str | None, progress: ProgressFn | None,
                   force: bool, convert: bool, base: str | None,
                   cancel: threading.Event | None) -> tuple[PullJob, Callable[[], Manifest]]:
        """The job of a pull with these arguments and the work its thread does (``pull``'s checks done first)."""
        src = parse_source(source, revision)
        n = validate_name(name) if name is not None else src.default_name
        if base is not None:
            base = self._checked_base(base, n)
        job = PullJob(n, cancel, key=self._name_key(n))
        report = job.checking(guard_progress(progress))  # every progress step is a cancel point

        def work() -> Manifest:
            try:
                if [other for other in left_pulls(job.key or "") if other is not job]:
                    # a retry of a cancelled pull that would return the stored model as it is waits for nothing
                    ready = self.installed_as_pulled(source, n, revision=revision, force=force, base=base)
                    if ready is not None:
                        return ready
                # a cancelled pull of the name left converting (deaf to its cancel) is waited for, without its lock:
                # each cancel and retry added one more full conversion at once
                wait_for_left(job, report)
                for d in (self.models, self.tmp, self.locks):
                    d.mkdir(parents=True, exist_ok=True)
                with job.holding(FileLock(self.locks / f"{name_to_dirname(n)}.lock", remove=True)):
                    job.check()  # (it may have waited for another pull of the name)
                    # (a model this pull adds records ``base`` before its install: neither a model that is no adapter
                    # nor a cancel between two writes leaves a model the caller was told was not added)
                    manifest = self._pull_locked(src, n, report, force, convert, base)
                    if base is None or manifest.parameters.get("base_model") == validate_name(base):
                        return manifest
                    with job.committing():  # a stored adapter kept as it was: its manifest rewritten in models/
                        return set_adapter_base(manifest, base)
            except OSError as exc:
                translate_os_error(exc)
                raise  # (translate_os_error always raises)

        return job, work

    def installed_as_pulled(self, source: str, name: str | None = None, *, revision: str | None = None,
                            force: bool = False, base: str | None = None) -> Manifest | None:
        """The stored model a pull with these arguments returns as it is (same source and commit, nothing to
        replace or record), read without the name's lock; None when the pull has work to do (or would fail)."""
        try:
            src = parse_source(source, revision)
            n = validate_name(name) if name is not None else src.default_name
            existing = None if force else self._existing(n)
            if existing is None or existing.source != src.canonical or \
                    (base is not None and existing.parameters.get("base_model") != validate_name(base)):
                return None
            if src.kind == "hub" and HubClient(self.endpoint, self.token).resolve(src.ref, src.revision) != existing.revision:
                return None
            if not self._source_unchanged(src, existing, None):
                return None
        except (XllmError, OSError):  # the pull itself says why, as before
            return None
        return existing

    def cancel_pulls(self) -> int:
        """Stop every pull in flight in this store (a shutdown): each raises PullStopped within seconds, leaving
        nothing in ``models/``; returns how many there were."""
        return self._pull_jobs.cancel_all()

    def left_pulls(self, name: str) -> int:
        """How many cancelled pulls of ``name`` in this process are left running (a library call deaf to the
        cancel): a new pull of the name waits for them before it starts (``pull`` reports it)."""
        return len(left_pulls(self._name_key(validate_name(name))))

    @contextmanager
    def stoppable(self, name: str, cancel: threading.Event) -> Iterator[None]:
        """For the block, ``cancel_pulls`` sets ``cancel`` too (a pull of ``name`` waiting before it calls ``pull``)."""
        with self._pull_jobs.track(PullJob(name, cancel)):
            yield

    def _name_key(self, n: str) -> str:
        """What tells the pulls of name ``n`` in this store from other names' and other stores' (its lock's path)."""
        return str(self.locks / f"{name_to_dirname(n)}.lock")

    def check_base(self, base: str) -> Manifest | None:
        """The stored model ``base`` a LoRA adapter would apply to, None when none is stored under that name.

        StoreError (param ``base``) for a malformed name, a damaged model or one that is itself an adapter:
        adapters do not stack, so an adapter on an adapter could never serve. The one check of a base, for
        ``pull`` here (the CLI's ``--base``) and the HTTP pull route alike.
        """
        try:
            manifest = self.show(validate_name(base))
        except ModelNotFound:
            return None
        except StoreError as exc:
            exc.param = "base"  # the argument that names it
            raise
        if manifest.task == "adapter":
            raise StoreError(f"The base model '{quoted(base)}' is itself a LoRA adapter: name the model it applies to",
                             param="base")
        return manifest

    def _checked_base(self, base: str, n: str) -> str:
        """``base`` for adapter ``n``, checked before anything is pulled; a base not stored (yet) only warns."""
        if canonical_name(base) == n:
            raise StoreError(f"'{quoted(n)}' cannot be its own base model", param="base")
        if self.check_base(base) is None:
            # allowed: the adapter may be pulled before its base, and serves once the base is pulled under that name
            log.warning("the base model '%s' is not in the store: adapter '%s' serves once it is pulled under that name",
                        base, n)
        return base

    def _pull_locked(self, src: Source, n: str, report: ProgressFn | None, force: bool, convert: bool,
                     base: str | None = None) -> Manifest:
        self._clean_tmp()
        existing = self._existing(n)
        if existing is not None and not force and existing.source != src.canonical:
            raise StoreError(
                f"A model named '{n}' already exists from another source; pull with --force (force=True) to replace it",
                param="name",
            )
        if src.kind == "hub":
            return self._pull_hub(src, n, existing, report, force, convert, base)
        if existing is not None and not force:
            if self._source_unchanged(src, existing, report):
                return existing
            log.info("%s changed since it was pulled as %s: pulling it again", src.ref, n)
        with self._workdir("pull") as build:
            fmt, files, template = self._build_local(src, build, report, convert)
            return self._finish(build, n, src, fmt, files, template, None, report, base)

    # ------------------------------------------------------------------ pulling
    @staticmethod
    def _source_unchanged(src: Source, existing: Manifest, report: ProgressFn | None) -> bool:
        """False when the local directory or .gguf ``src`` no longer holds the files its stored copy ``existing`` was
        pulled from (a retrain saved to the same path): the pull replaces it, as a Hub pull whose commit moved does.
        (A GGUF pulled with ``--convert`` holds other files: it is not compared.)"""
        if src.kind == "dir" or (src.kind == "gguf" and existing.format == "gguf"):
            return holds_files(Path(src.ref), existing.files, report)
        return True

    def _existing(self, n: str) -> Manifest | None:
        """The intact model ``n`` (None if absent or damaged: a pull then replaces it)."""
        path = self._dir(n)
        if not (path / MANIFEST_NAME).is_file():
            return None
        try:
            manifest = read_manifest(path)
            if manifest.name != n:
                return None
            self._check_files(manifest)
        except StoreError:
            return None
        return manifest

    def _build_local(self, src: Source, build: Path, report: ProgressFn | None, convert: bool) -> tuple[str, list[ManifestFile], str | None]:
        """Fill ``build`` from a packaged, directory or GGUF source: (format, files, template)."""
        from .convert import gguf_chat_template, gguf_to_safetensors

        if src.kind == "packaged" and not PACKAGED[src.ref].convert:  # a wheel holding an HF directory
            files = copy_dir(PACKAGED[src.ref].require(), build, report)
            return detect_format(build), files, read_template(build)
        if src.kind == "packaged" or (src.kind == "gguf" and convert):
            gguf = PACKAGED[src.ref].require() if src.kind == "packaged" else Path(src.ref)
            template = gguf_to_safetensors(gguf, build, progress=report)
            if src.kind == "packaged":
                write_sampling(build, PACKAGED[src.ref].sampling)
            return detect_format(build), self._hash_tree(build, report), template
        if src.kind == "gguf":
            rel = Path(src.ref).name
            files = [copy_file(Path(src.ref), build / rel, rel, report)]
            return "gguf", files, gguf_chat_template(build / rel)
        files = copy_dir(Path(src.ref), build, report)
        return detect_format(build), files, read_template(build)

    def _hash_tree(self, root: Path, report: ProgressFn | None) -> list[ManifestFile]:
        """Manifest entries for every file under ``root`` (files we wrote ourselves)."""
        out = []
        for rel in list_dir_files(root):
            sha256, _git, size = hash_file(root / rel, progress=report, label=rel)
            out.append(ManifestFile(safe_relpath(rel), sha256, size))
        return out

    def _finish(self, build: Path, n: str, src: Source, fmt: str, files: list[ManifestFile], template: str | None, revision: str | None,
                report: ProgressFn | None, base: str | None = None) -> Manifest:
        """Write the manifest into ``build`` (an adapter's ``base`` recorded), flush it all to disk and move it into
        ``models/``."""
        present = set(list_dir_files(build))
        missing = [f.path for f in files if f.path not in present]
        if missing or any(f.path == MANIFEST_NAME for f in files):
            raise StoreError("The pulled model is incomplete")
        size = sum(f.size for f in files)
        manifest = Manifest(
            name=n,
            source=src.canonical,
            format=fmt,
            files=tuple(sorted(files, key=lambda f: f.path)),
            size=size,
            created=int(time.time()),
            template=template,
            parameters=adapter_parameters(build),  # a LoRA records its base model
            backend=None,
            digest=compute_digest(files),
            revision=revision,
            task=detect_task(build),
        )
        if base is not None:
            manifest = with_adapter_base(manifest, base)  # (StoreError for a model that is no adapter: nothing added)
        fix_modes(build)
        fsync_tree(build)
        write_manifest(build, manifest)
        if report is not None:  # before the rename: a callback that raises here still leaves nothing
            report(PullProgress("done", None, size, size))
        job = current_job.get()
        # a pull left after its cancel has let go of the name's lock: it must not rename into models/ now
        with job.committing() if job is not None else nullcontext():
            target = self._install(build, name_to_dirname(n))
        log.info("pulled %s (%s, %d bytes)", n, fmt, size)
        return manifest.with_path(target)

    def _install(self, build: Path, dirname: str) -> Path:
        """Rename the finished ``build`` to ``models/<dirname>``, atomically replacing an old one."""
        target = child_dir(self.models, dirname)
        if target.exists():
            old = replace_dir(build, target, self.tmp / f"old-{secrets.token_hex(8)}")
            remove_tree(old)
            if old != build:  # (set aside, without an atomic exchange: under a lock of its own, whose file goes too)
                aside_lock(old).unlink(missing_ok=True)
        else:
            os.rename(build, target)
            fsync_dir(self.models)
        return target
