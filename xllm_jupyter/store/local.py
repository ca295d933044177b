"""Copying models from local directories and files into a build directory, hashing as they go."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..core.errors import StoreError
from .manifest import CHUNK, ManifestFile, hash_file
from .names import safe_relpath
from .progress import ProgressFn, PullProgress
from .sources import PICK_LOCAL_GGUF, select_files

MAX_DEPTH = 4


def copy_file(src: Path, dst: Path, rel: str, progress: ProgressFn | None) -> ManifestFile:
    """Copy ``src`` to the new file ``dst`` (fsynced), returning its manifest entry.

    The hash is taken over the bytes written, in the same pass as the copy.
    """
    try:
        total = src.stat().st_size
        fin = open(src, "rb")
    except FileNotFoundError:
        raise StoreError(f"Source file '{rel}' disappeared during the pull") from None
    except OSError as exc:
        raise StoreError(f"Cannot read source file '{rel}': {exc.strerror}") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256()
    done = 0
    with fin, open(dst, "xb") as fout:
        if progress is not None:
            progress(PullProgress("copy", rel, 0, total))
        while True:
            try:
                chunk = fin.read(CHUNK)
            except OSError as exc:
                raise StoreError(f"Cannot read source file '{rel}': {exc.strerror}") from None
            if not chunk:
                break
            fout.write(chunk)
            sha.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(PullProgress("copy", rel, done, total))
        fout.flush()
        os.fsync(fout.fileno())
    if done != total:
        raise StoreError(f"Source file '{rel}' changed size during the pull")
    return ManifestFile(rel, sha.hexdigest(), done)


def list_dir_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files under ``root`` (following links, as HF caches use them)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        base = Path(dirpath)
        depth = len(base.relative_to(root).parts)
        # links are followed, so bound the depth: a link cycle must not walk forever
        dirnames[:] = [] if depth >= MAX_DEPTH else sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = base / name
            if path.is_file():
                out.append(path.relative_to(root).as_posix())
    return out


def holds_files(src: Path, files: tuple[ManifestFile, ...], progress: ProgressFn | None) -> bool:
    """True when the local directory or .gguf file ``src`` still holds exactly ``files`` (paths, sizes, sha256):
    what a pull of it took. Sizes are compared first, so most edits are found without reading the files."""
    try:
        if src.is_dir():
            now = {rel: src / rel for rel in select_files(list_dir_files(src))}
        else:
            now = {src.name: src}
        if set(now) != {f.path for f in files} or any(now[f.path].stat().st_size != f.size for f in files):
            return False
        return all(hash_file(now[f.path], progress=progress, label=f.path)[0] == f.sha256 for f in files)
    except (StoreError, OSError):  # gone, unreadable, or no model files now: the pull that follows says which
        return False


def copy_dir(src: Path, dst: Path, progress: ProgressFn | None) -> list[ManifestFile]:
    """Copy the model files of directory ``src`` (see ``select_files``) into ``dst``."""
    if not src.is_dir():
        raise StoreError("The source directory disappeared during the pull")
    files = select_files(list_dir_files(src), pick=PICK_LOCAL_GGUF)  # (hf:ORG/REPO/FILE.gguf names no local file)
    return [copy_file(src / rel, dst / safe_relpath(rel), rel, progress) for rel in files]
