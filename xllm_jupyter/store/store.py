"""The model store on disk: pull, list, show, rm, verify, and name resolution for the engine.

Layout under ``home``::

    models/<name>/          one directory per complete model: its files + xllm-manifest.json
    store-id                this store's random id (identity.py), made on first ask (and again in a copy of the
                            store): what tells it from another store holding the same models
    tmp/pull-<random>/      a pull being built (or left by a crash; the next pull, create or rm deletes it)
    tmp/hub-<key>/          a Hub download in progress, kept after a failure so a retry resumes
    locks/<name>.lock       serialises pulls and removals of one name across processes (its holder deletes it as
                            it lets go, so names locked once leave nothing behind: atomic.FileLock's ``remove``)
    locks/.store-id.lock    serialises replacing a copied store's id (identity.py)

A pull builds the model in ``tmp/``, writes the manifest last, fsyncs, then renames the
directory into ``models/`` (replacing an old model with an atomic exchange), so a model
directory is either complete or absent.
"""

from __future__ import annotations

import logging
import os
import secrets
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator

from ..backends.base import ModelSpec
from ..core.errors import InvalidModelName, ModelNotFound, StoreError, repair_advice
from ..core.types import CatalogFacts
from .atomic import FileLock, fsync_dir, remove_tree
from .cancel import PullJobs
from .create import create_model, model_defaults
from .identity import store_id
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    compute_digest,
    created_from,
    lora_fields,
    hash_file,
    read_manifest,
    recorded_source,
)
from .names import child_dir, contained, dirname_to_name, name_to_dirname, safe_relpath, validate_name
from .packaged import PACKAGED, installable
from .progress import LogProgress, PullProgress, translate_os_error
from .pulling import PullMixin

log = logging.getLogger(__name__)


class ModelStore(PullMixin):
    """The models on this machine; also the engine's ModelCatalog."""

    def __init__(self, home: Path, *, endpoint: str | None = None, token: str | bool | None = None):
        self.home = Path(home).expanduser()
        self.models = self.home / "models"
        self.tmp = self.home / "tmp"
        self.locks = self.home / "locks"
        self.endpoint = endpoint  # Hub endpoint; None reads HF_ENDPOINT at pull time
        self.token = token  # Hub token; None lets huggingface_hub find HF_TOKEN / the saved login
        self._pull_jobs = PullJobs()  # the pulls in flight, which cancel_pulls stops

    def check_home(self) -> None:
        """StoreError when the home, or the nearest part of its path that exists, is not a directory (the CLI and the
        servers ask first): it read as an empty store ("No models yet") and each pull failed "Not a directory"."""
        existing = self.home
        try:
            while not existing.exists() and existing.parent != existing:
                existing = existing.parent
            if not existing.exists() or existing.is_dir():
                return
        except OSError:  # (a part of it we may not read: the store's own operations say so)
            return
        where = "" if existing == self.home else f" ({existing} is a file)"
        raise StoreError(f"The model store's home {self.home} is not a directory{where}: point XLLM_HOME (or store.home "
                         "in config.yaml) at a directory")

    # ------------------------------------------------------------------ reading
    def _dir(self, name: str) -> Path:
        return child_dir(self.models, name_to_dirname(name))

    def _entries(self) -> Iterator[tuple[str, Path, Manifest | StoreError]]:
        """(name, directory, its manifest or why it cannot be read) for each model directory of the store."""
        if not self.models.is_dir():
            return
        for entry in self.models.iterdir():
            name = dirname_to_name(entry.name)
            if name is None or entry.is_symlink() or not entry.is_dir():
                continue  # not a model directory: a pull's temporary, a lock, something foreign
            try:
                yield name, entry, read_manifest(entry)
            except StoreError as exc:
                yield name, entry, exc

    def list(self) -> list[Manifest]:
        """Complete models only, sorted by name (half-pulled, damaged or foreign entries skipped)."""
        out = []
        for name, entry, manifest in self._entries():
            if isinstance(manifest, StoreError):
                log.debug("skipping store entry %s: %s", entry.name, manifest.message)
            elif manifest.name == name:
                out.append(manifest)
        return sorted(out, key=lambda m: m.name)

    def damaged(self) -> list[tuple[str, str]]:
        """(name, why) for each model directory whose manifest is damaged or missing (``list`` skips those), or whose
        files are missing or not the size the manifest says (listed, but their load would fail)."""
        out = []
        for name, entry, manifest in self._entries():
            if isinstance(manifest, StoreError):
                why: str | None = manifest.message
            elif manifest.name != name:
                why = "its manifest names another model"
            else:
                why = self.file_damage(manifest)
            if why:
                out.append((name, why))
        return sorted(out)

    def exists(self, name: str) -> bool:
        """True when the store has a directory for ``name``, complete or damaged (what ``rm`` can remove)."""
        return self._dir(validate_name(name)).is_dir()

    def show(self, name: str) -> Manifest:
        """The manifest of model ``name``; ModelNotFound if it is not in the store."""
        n = validate_name(name)
        path = self._dir(n)
        if not path.is_dir() or not (path / MANIFEST_NAME).is_file():
            raise ModelNotFound(n)
        try:
            manifest = read_manifest(path)
        except StoreError as exc:
            # name the model: "Damaged model manifest" alone does not say which one, nor what to do
            source = recorded_source(path)  # pulled or made by create: what mends it differs
            advice = "remove it, then pull or create it again" if source is None else \
                f"remove it or {repair_advice(created_from(source))}"
            raise StoreError(f"Model '{n}' is damaged ({exc.message}): {advice}") from None
        if manifest.name != n:
            raise StoreError(f"The manifest in '{n}' names another model; pull it again with force")
        return manifest

    def store_id(self) -> str | None:
        """This store's random id (made on first ask; see identity.py); None where it cannot have one (read-only)."""
        return store_id(self.home)

    def names(self) -> list[str]:
        """Names that can be loaded: pulled models plus installable packaged defaults."""
        return sorted({m.name for m in self.list()} | set(installable()))

    def task(self, name: str) -> str | None:
        """What model ``name`` serves (``chat``, ``embedding``, ``adapter``) without loading or pulling it;
        None when it is unknown."""
        return self.facts(name).task

    def facts(self, name: str) -> CatalogFacts:
        """What model ``name`` serves, its digest and the defaults its requests get, without loading it (a packaged
        default not pulled yet has a task alone)."""
        try:
            manifest = self.show(name)
        except (InvalidModelName, ModelNotFound, StoreError, OSError):
            packaged = PACKAGED.get(name)
            return CatalogFacts(task=packaged.task if packaged is not None else None)
        defaults = None
        if manifest.task in (None, "chat", "adapter"):  # embedding models take no sampling; an adapter its own
            try:  # chat UIs show these; a damaged Modelfile record fails the load with its own message
                defaults = model_defaults(manifest)
            except StoreError:
                pass
        return CatalogFacts(task=manifest.task, digest=manifest.digest or None, defaults=defaults)

    def first_use_pull(self, name: str) -> Future[Manifest] | None:
        """The pull of packaged default ``name`` started, when it is not stored yet (its first use): a future the
        caller awaits with no thread of its own held meanwhile (``pull_later``); None when there is nothing to pull."""
        try:
            n = validate_name(name)
            self.show(n)
            return None
        except ModelNotFound:
            if n not in PACKAGED or PACKAGED[n].locate() is None:
                return None
        except (InvalidModelName, StoreError, OSError):  # (``resolve`` says what is wrong)
            return None
        log.info("pulling packaged model %s on first use", n)
        return self.pull_later(n, n, progress=LogProgress(n))

    def resolve(self, name: str) -> ModelSpec:
        """The spec to load ``name``; pulls a packaged default on first use; else ModelNotFound."""
        try:
            n = validate_name(name)
        except InvalidModelName:
            raise ModelNotFound(str(name)[:100]) from None
        try:
            manifest = self.show(n)
        except ModelNotFound:
            if n not in PACKAGED or PACKAGED[n].locate() is None:
                raise
            log.info("pulling packaged model %s on first use", n)
            manifest = self.pull(n, n, progress=LogProgress(n))
        if self.file_damage(manifest):
            # an rm takes the directory out of models/ in one rename: files missing under a manifest just read
            # may be that, not damage; the store as it is now decides (removed: ModelNotFound, not "damaged")
            manifest = self.show(n)
            self._check_files(manifest)
        ctx = manifest.parameters.get("context_length")
        defaults = model_defaults(manifest)
        num_ctx = defaults.parameters.get("num_ctx")
        if num_ctx:  # a Modelfile's num_ctx sets the context, as in Ollama
            ctx = min(ctx, num_ctx) if isinstance(ctx, int) and ctx > 0 else num_ctx
        return ModelSpec(
            name=manifest.name,
            path=manifest.weights_path,
            format=manifest.format,
            backend=manifest.backend,
            context_length=ctx if isinstance(ctx, int) and ctx > 0 else None,
            digest=manifest.digest,
            task=manifest.task,
            defaults=defaults,
            created_from=created_from(manifest.source),
            **lora_fields(manifest),
        )

    def _file_path(self, manifest: Manifest, f: ManifestFile) -> Path:
        assert manifest.path is not None
        path = manifest.path / safe_relpath(f.path)
        contained(manifest.path, path)
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"Model '{manifest.name}' is damaged: '{f.path}' is missing; "
                             f"{repair_advice(created_from(manifest.source))}")
        return path

    def file_damage(self, manifest: Manifest) -> str | None:
        """What is wrong with ``manifest``'s files (presence, no links, sizes: one stat each, no hashing), or None."""
        for f in manifest.files:
            try:
                size = self._file_path(manifest, f).stat().st_size
            except (StoreError, OSError):  # missing, a link, or a path that leaves the store
                return f"its file {f.path} is missing"
            if size != f.size:
                return f"its file {f.path} has {size:,} bytes where its manifest says {f.size:,}"
        return None

    def _check_files(self, manifest: Manifest) -> None:
        """Cheap integrity check (the same as ``damaged``'s); ``verify`` re-hashes."""
        why = self.file_damage(manifest)
        if why:
            raise StoreError(f"Model '{manifest.name}' is damaged ({why}); {repair_advice(created_from(manifest.source))}")

    def verify(self, name: str) -> bool:
        """Re-hash every file against the manifest; False on any mismatch, missing file or link."""
        n = validate_name(name)
        path = self._dir(n)
        if not (path / MANIFEST_NAME).is_file():
            raise ModelNotFound(n)
        try:
            manifest = read_manifest(path)
            if manifest.name != n:
                return False
            for f in manifest.files:
                sha256, _git, size = hash_file(self._file_path(manifest, f))
                if sha256 != f.sha256 or size != f.size:
                    return False
        except StoreError:
            return False
        return compute_digest(manifest.files) == manifest.digest

    # ------------------------------------------------------------------ writing
    def create(self, name: str, modelfile_text: str, progress: Callable[[PullProgress], None] | None = None,
               base_dir: Path | None = None) -> Manifest:
        """Make model ``name`` from Modelfile text: FROM's files (linked) plus its settings (see store/create.py).

        ``base_dir``: the Modelfile's directory, which relative FROM/ADAPTER paths resolve against.
        """
        return create_model(self, name, modelfile_text, progress, base_dir)

    def rm(self, name: str, *, wait: bool = True) -> bool:
        """Delete model ``name``; ModelNotFound if absent. The directory leaves ``models/`` in one rename.

        ``wait=False``: return False at once (nothing removed) while a pull or removal of the name holds its lock,
        so that a server can wait for it without a thread (``server/model_route.py``); True once removed.
        """
        n = validate_name(name)
        try:
            self.locks.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.locks / f"{name_to_dirname(n)}.lock", remove=True)
            if not lock.acquire(blocking=wait):
                return False
            try:
                path = self._dir(n)
                if not path.is_dir():
                    raise ModelNotFound(n)
                self.tmp.mkdir(parents=True, exist_ok=True)
                aside = self.tmp / f"rm-{secrets.token_hex(8)}"
                os.rename(path, aside)
                fsync_dir(self.models)
                remove_tree(aside)
                self._clean_tmp()  # and what an interrupted rm or create left (not only the next pull deletes it)
            finally:
                lock.release()
        except OSError as exc:  # a read-only or vanished store: a StoreError, not a traceback with paths
            translate_os_error(exc)
        return True
