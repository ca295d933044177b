"""``ModelStore.create``: a new model from a Modelfile, sharing its base model's files.

The base (FROM) is a model in the store, else a source to pull first (a packaged name,
a local directory or .gguf, a Hub repo). Its files are hard-linked into a build
directory (copied where links are impossible) while the base's lock is held, then the
build gets a manifest carrying the Modelfile settings and is renamed into ``models/``
under the new name's lock: the same all-or-nothing install as a pull. Store files are
never modified in place, so sharing inodes between models is safe.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import StoreError
from ..core.types import ChatMessage, ModelfileDefaults
from .atomic import FileLock, fix_modes, fsync_tree
from .generation_defaults import sampling_defaults
from .local import copy_file
from .manifest import CREATED_PREFIX, Manifest, write_manifest
from .modelfile import RECORDED_ONLY, Modelfile, parse_modelfile
from .names import is_valid_name, name_to_dirname, safe_relpath, validate_name
from .packaged import PACKAGED
from .progress import PullProgress, guard_progress, translate_os_error
from .sources import parse_source

if TYPE_CHECKING:
    from .store import ModelStore

log = logging.getLogger(__name__)

#: how a created model's ``source`` reads: it is made, not pulled
SOURCE_PREFIX = CREATED_PREFIX


def _settings(manifest: Manifest) -> Modelfile:
    """The recorded settings; StoreError when a hand-edited manifest holds bad ones."""
    try:
        return Modelfile.from_dict(manifest.modelfile or {})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise StoreError(f"Model '{manifest.name}' has damaged Modelfile settings; create it again") from None


def modelfile_of(manifest: Manifest) -> Modelfile:
    """The Modelfile settings of a stored model (a pulled model has none: just its FROM)."""
    if manifest.modelfile:
        m = _settings(manifest)
    else:
        m = Modelfile(from_=manifest.name)
    return replace(m, from_=m.from_ or manifest.name)


def merge(base: Modelfile, new: Modelfile) -> Modelfile:
    """The new model's settings: the base's, overridden by what the new Modelfile sets (as Ollama does)."""
    return Modelfile(
        from_=new.from_,
        parameters={**base.parameters, **new.parameters},
        template=new.template if new.template is not None else base.template,
        system=new.system if new.system is not None else base.system,
        adapters=list(new.adapters or base.adapters),
        license=list(new.license or base.license),
        messages=list(new.messages or base.messages),
    )


def model_defaults(manifest: Manifest) -> ModelfileDefaults:
    """What serving applies to requests for this model (``ModelSpec.defaults``).

    Parameters: the model's ``generation_config.json`` sampling, under a Modelfile's PARAMETERs.
    """
    sampling = sampling_defaults(manifest.path) if manifest.format != "gguf" else {}
    if not manifest.modelfile:
        return ModelfileDefaults(sampling) if sampling else ModelfileDefaults()
    m = _settings(manifest)
    return ModelfileDefaults({**sampling, **m.parameters}, m.system,
                             tuple(ChatMessage(role=x.role, content=x.content) for x in m.messages))


def create_model(store: "ModelStore", name: str, text: str, progress: Callable[[PullProgress], None] | None = None,
                 base_dir: Path | None = None) -> Manifest:
    """Parse ``text`` and make model ``name`` from it (replacing an older ``name``).

    ``base_dir`` is the Modelfile's directory: relative FROM/ADAPTER paths resolve
    against it, as Ollama does (None: against the current directory, e.g. for stdin).
    """
    mf = _with_local_paths(store, parse_modelfile(text), base_dir)
    n = validate_name(name)
    report = guard_progress(progress)
    try:
        for d in (store.models, store.tmp, store.locks):
            d.mkdir(parents=True, exist_ok=True)
        store._clean_tmp()  # what an interrupted create or rm left (a pull's clean-up is not the only one)
        base = _base(store, mf.from_, report, look_in_cwd=base_dir is None)
        _warn_recorded_only(mf, modelfile_of(base))
        settings = merge(modelfile_of(base), mf)
        adapter_src = _adapter_source(store, mf.adapters, base)  # only the new Modelfile's ADAPTER is copied
        with store._workdir("pull") as build:
            with FileLock(store.locks / f"{name_to_dirname(base.name)}.lock", remove=True):
                base = store.show(base.name)  # re-read under the lock: it may have been replaced
                store._check_files(base)
                for f in base.files:
                    _link(base.path / safe_relpath(f.path), build / safe_relpath(f.path), f.path, report)
            if adapter_src is not None:
                base = _with_adapter(base, build, adapter_src, report)
            manifest = replace(
                base,
                name=n,
                source=SOURCE_PREFIX + base.name,
                created=int(time.time()),
                modelfile=settings.to_dict(),
                path=None,
            )
            fix_modes(build)
            fsync_tree(build)
            write_manifest(build, manifest)
            if report is not None:
                report(PullProgress("done", None, manifest.size, manifest.size))
            with FileLock(store.locks / f"{name_to_dirname(n)}.lock", remove=True):
                target = store._install(build, name_to_dirname(n))
        log.info("created %s from %s", n, base.name)
        return manifest.with_path(target)
    except OSError as exc:
        translate_os_error(exc)


def _warn_recorded_only(mf: Modelfile, inherited: Modelfile) -> None:
    """Say which settings are kept but not used, as for an ADAPTER: an Ollama user expects them to apply.

    Only those ``mf`` sets anew: ``xllm cp`` restates its source's, which were named when it was created.
    """
    unused = sorted(k for k, v in mf.parameters.items() if k in RECORDED_ONLY and inherited.parameters.get(k) != v)
    if unused:
        one = len(unused) == 1
        log.warning("PARAMETER %s %s recorded but not applied: xllm has no sampler or setting for %s",
                    ", ".join(unused), "is" if one else "are", "it" if one else "them")
    if mf.template is not None and mf.template != inherited.template:
        log.warning("TEMPLATE is recorded but not applied: the model keeps its tokenizer's chat template "
                    "(Go templates are not run)")


def _is_stored(store: "ModelStore", ref: str) -> bool:
    """True when ``ref`` names a stored or packaged model (a name wins over a same-named path)."""
    return is_valid_name(ref) and (validate_name(ref) in PACKAGED or store._existing(validate_name(ref)) is not None)


def _relative_to(store: "ModelStore", ref: str, base_dir: Path) -> str:
    """``ref`` as an absolute path when it is one relative to ``base_dir``; other references unchanged.

    A ``./`` or ``../`` path is resolved even when missing, so the error names where it looked.
    """
    path = Path(ref).expanduser()
    if path.is_absolute() or _is_stored(store, ref):
        return ref
    candidate = Path(os.path.abspath(base_dir / path))
    if candidate.exists() or ref in (".", "..") or ref.startswith(("./", "../", ".\\", "..\\")):
        return str(candidate)
    return ref  # a Hub repo id (ORG/REPO) or a name that is not stored


def _with_local_paths(store: "ModelStore", mf: Modelfile, base_dir: Path | None) -> Modelfile:
    """``mf`` with its FROM and ADAPTER paths resolved against the Modelfile's directory (recorded so)."""
    if base_dir is None:
        return mf
    return replace(mf, from_=_relative_to(store, mf.from_, base_dir),
                   adapters=[_relative_to(store, a, base_dir) for a in mf.adapters])


def _base(store: "ModelStore", source: str, report: Any, look_in_cwd: bool = True) -> Manifest:
    """The FROM model: a stored name, else pulled (a packaged default under its own name)."""
    if is_valid_name(source):
        n = validate_name(source)
        existing = store._existing(n)
        if existing is not None:
            return existing
        if n in PACKAGED:
            return store.pull(n, n, progress=report)
        if not (look_in_cwd and Path(source).expanduser().exists()):  # else resolved by _with_local_paths
            raise StoreError(
                f"FROM {source!r}: no such model in the store (pull it first, or name a local path or hf:ORG/REPO)",
                param="modelfile",
            )
    src = parse_source(source)
    taken = store._existing(src.default_name)
    if taken is not None and taken.source != src.canonical:
        # pull's own advice (--force) would replace that model with these files; create has no such flag
        raise StoreError(
            f"FROM {source!r} would be pulled into the store as {src.default_name!r}, which holds another model "
            f"({taken.source}): pull it under another name (xllm pull {source} --name NAME) and write FROM NAME",
            param="modelfile",
        )
    # (a path changed since it was pulled is pulled again by the pull itself: the create is made from its files now)
    return store.pull(source, progress=report)


def _link(src: Path, dst: Path, rel: str, report: Any) -> None:
    """Hard-link ``src`` to ``dst``; copy when the file system cannot link (another device, no support)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        copy_file(src, dst, rel, report)


#: where a created model keeps the LoRA its Modelfile's ADAPTER names (merged into the weights at load)
ADAPTER_DIR = "adapter"


def _adapter_source(store: "ModelStore", adapters: list[str], base: Manifest) -> Path | None:
    """The peft LoRA directory of the Modelfile's ADAPTER (a stored adapter's name or a local path).

    Anything else (several ADAPTERs, an Ollama GGUF LoRA, a base the transformers backend
    cannot merge into) stays recorded only, as before, with a warning.
    """
    if not adapters:
        return None
    ref = adapters[0]
    stored = store._existing(validate_name(ref)) if is_valid_name(ref) else None
    path = stored.path if stored is not None and stored.task == "adapter" else Path(ref).expanduser()
    if len(adapters) == 1 and base.format in ("safetensors", "gguf") and path is not None \
            and (path / "adapter_config.json").is_file():
        return path
    missing = f" (no such file or directory: {path})" if path is not None and not path.exists() else ""
    log.warning("ADAPTER %s is recorded but not applied%s: xllm applies one peft LoRA (a stored adapter or a "
                "directory) to a safetensors or GGUF base", ", ".join(map(repr, adapters)), missing)
    return None


def _with_adapter(base: Manifest, build: Path, src: Path, report: Any) -> Manifest:
    """``base`` plus the LoRA at ``src`` copied into ``build/adapter`` (replacing an inherited one)."""
    from .local import copy_dir
    from .manifest import MANIFEST_NAME, compute_digest

    shutil.rmtree(build / ADAPTER_DIR, ignore_errors=True)  # links to an inherited adapter, not its files
    copied = []
    for f in copy_dir(src, build / ADAPTER_DIR, report):
        if f.path == MANIFEST_NAME:  # a stored adapter's own manifest is not part of this model
            (build / ADAPTER_DIR / MANIFEST_NAME).unlink()
        else:
            copied.append(replace(f, path=f"{ADAPTER_DIR}/{f.path}"))
    files = [f for f in base.files if not f.path.startswith(ADAPTER_DIR + "/")] + copied
    return replace(base, files=tuple(sorted(files, key=lambda f: f.path)), size=sum(f.size for f in files),
                   digest=compute_digest(files), parameters={**base.parameters, "adapter": ADAPTER_DIR})
