"""Crash-safe file system primitives: fsync, atomic writes, directory swaps, advisory locks."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

try:  # POSIX advisory locks; Windows falls back to age-based staleness (see FileLock.try_acquire)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (bottom-up), then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(Path(dirpath))


def file_mode() -> int:
    """0o666 less the process umask (read without changing it where /proc has it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def fix_modes(root: Path) -> None:
    """Give every file under ``root`` the usual umask-derived mode (some writers create 0600 files)."""
    mode = file_mode()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                os.chmod(p, mode)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` so readers see the old file or the whole new one, never a part.

    The file gets ``mode`` (default: the umask's, as any new file); ``0o600`` keeps it private.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; the manifest is meant to be shared
                os.fchmod(f.fileno(), file_mode() if mode is None else mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(new: Path, target: Path, aside: Path) -> Path:
    """Put directory ``new`` at ``target`` (which exists); returns where the old one now is.

    Uses an atomic exchange where the kernel has one, so ``target`` is never missing (the
    old directory ends up at ``new``); elsewhere it renames the old one to ``aside``, then
    the new one in, leaving a brief gap.
    """
    if _renameat2_exchange(new, target):
        old = new
    else:
        # ``aside``'s lock, as a work directory's: a clean-up of tmp/ (another pull's) must not delete the old
        # directory while it may still have to go back to ``target``
        with FileLock(aside_lock(aside)) as lock:
            os.rename(target, aside)
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(aside, target)
                lock.path.unlink(missing_ok=True)  # (nothing is left aside for it to guard)
                raise
        old = aside  # (its lock file stays until the caller has deleted it: ``aside_lock``)
    fsync_dir(target.parent)
    return old


def aside_lock(old: Path) -> Path:
    """The lock file ``replace_dir`` made beside the old directory it returned (unlink it once that is deleted)."""
    return old.with_name(f"{old.name}.lock")


def remove_tree(path: Path) -> None:
    """Delete a directory tree (or file), ignoring what is already gone."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _still_named(path: Path, fd: int) -> bool:
    """True when ``path`` still names the file open as ``fd`` (it was not unlinked or replaced)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


class FileLock:
    """An exclusive advisory lock on a lock file (flock): across processes and threads alike.

    ``remove``: the holder deletes the file as it lets go, so one file per name ever locked does not pile up. That
    is safe only because every taker checks, once it has the lock, that the path still names the file it locked
    (``acquire``): a waiter that locked the deleted file then retries on the file the next taker makes.
    """

    def __init__(self, path: Path, remove: bool = False):
        self.path = path
        self.remove = remove
        self._fd: int | None = None

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; with ``blocking=False`` return False instead of waiting, with ``timeout`` after waiting that
        many seconds (polled: flock itself has no timeout)."""
        if timeout is None or not blocking:
            return self._take(blocking)
        deadline, pause = time.monotonic() + timeout, 0.005
        while not self._take(False):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)
        return True

    def _take(self, blocking: bool) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None:  # pragma: no cover - Windows: no advisory locks, best effort
                self._fd = fd
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    return False
                raise
            if _still_named(self.path, fd):
                self._fd = fd
                return True
            # the file was unlinked between our open and our lock (a clean-up of tmp/ took it while it was free, or
            # its holder deleted it on the way out): a lock on it guards nothing, as the next taker makes a new file
            os.close(fd)

    def release(self) -> None:
        """Drop the lock; with ``remove``, delete its file first, while still held (see the class)."""
        if self._fd is not None:
            try:
                if self.remove and fcntl is not None and _still_named(self.path, self._fd):
                    self.path.unlink(missing_ok=True)
            except OSError:  # a read-only store: the file stays, as it always did
                pass
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(lock_path: Path, entry: Path, max_age_without_locks: float = 86400.0) -> FileLock | None:
    """The held lock when nobody else holds ``lock_path`` (``entry`` was left by a crash), else None."""
    lock = FileLock(lock_path)
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks, judge by age
        try:
            if time.time() - entry.stat().st_mtime < max_age_without_locks:
                return None
        except OSError:
            pass
    return lock if lock.acquire(blocking=False) else None
