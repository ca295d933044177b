"""Pulls from the Hugging Face Hub (or any Hub-compatible endpoint) with huggingface_hub.

Files land in a staging directory named after repo and commit, so a failed pull keeps
the files it completed and the next pull of the same commit downloads only the rest
(huggingface_hub itself resumes a dropped connection within a file with Range
requests). Every file is verified against the Hub's listing: sha256 for LFS files, the
git blob sha1 for the others.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import StoreError
from .manifest import ManifestFile, hash_file
from .names import safe_relpath
from .progress import ProgressFn, PullProgress, from_callback

LIBRARY = "xllm-jupyter"


@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repo at a commit, with what it must hash to."""

    path: str
    size: int
    sha256: str | None  # LFS files
    git_sha1: str | None  # regular git blobs


class _Bar:
    """A tqdm stand-in that turns huggingface_hub's byte counts into PullProgress events."""

    def __init__(self, progress: ProgressFn | None, file: str, size: int | None, **kwargs: Any):
        # huggingface_hub passes tqdm's keyword arguments (total, initial, desc, ...); the listing's size wins
        self.progress, self.file, self.total = progress, file, size if size is not None else kwargs.get("total")
        self.n = int(kwargs.get("initial") or 0)

    def update(self, n: float | None = 1) -> None:
        """Count ``n`` more bytes (negative when a resumed download restarts)."""
        self.n = max(0, self.n + int(n or 0))
        if self.progress is not None:
            self.progress(PullProgress("download", self.file, self.n, self.total))

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        """Nothing to close."""

    def update_transfer(self, n: float | None = 1) -> None:
        """Network bytes (Xet may fetch fewer than it writes); progress counts bytes written."""

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        """Ignored (tqdm API)."""

    def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        """Ignored (huggingface_hub's aggregated-bar API)."""

    def refresh(self) -> None:
        """Ignored (tqdm API)."""


class _BarFactory:
    """Passed as ``tqdm_class``: makes one ``_Bar`` per file.

    Having ``update_transfer`` makes huggingface_hub's Xet path feed network and disk
    progress into a single bar instead of creating two.
    """

    def __init__(self, progress: ProgressFn | None, file: str, size: int | None):
        self.progress, self.file, self.size = progress, file, size

    def __call__(self, **kwargs: Any) -> _Bar:
        return _Bar(self.progress, self.file, self.size, **kwargs)

    def update_transfer(self, n: float | None = 1) -> None:
        """Never called on the factory; its presence is what huggingface_hub checks."""


def default_endpoint() -> str:
    """``HF_ENDPOINT`` read now (not at import), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def metadata_timeout() -> float:
    """Seconds the first Hub call may wait for an answer: ``HF_HUB_ETAG_TIMEOUT`` read now, else huggingface_hub's 10."""
    from huggingface_hub import constants

    try:
        value = float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or constants.HF_HUB_ETAG_TIMEOUT)
    except ValueError:
        value = float(constants.DEFAULT_ETAG_TIMEOUT)
    return value if value > 0 else float(constants.DEFAULT_ETAG_TIMEOUT)


def kept_data(dest: Path) -> bool:
    """Whether ``dest`` holds downloaded bytes (a finished file or a partial one) that a next pull resumes from."""
    if not dest.is_dir():
        return False
    for path in dest.rglob("*"):
        # huggingface_hub's empty .lock files and its .metadata notes are no downloaded data
        if path.suffix not in (".lock", ".metadata") and path.is_file() and not path.is_symlink() and path.stat().st_size:
            return True
    return False


@contextmanager
def hub_errors(repo: str, endpoint: str, staging: Path | None = None) -> Iterator[None]:
    """Translate huggingface_hub/httpx failures into StoreErrors that say what to do; "pull again to resume" only
    where ``staging`` (the pull's download directory) keeps something to resume from."""
    try:
        yield
    except Exception as exc:
        if from_callback(exc) or isinstance(exc, StoreError):
            raise
        resumable = staging is not None and kept_data(staging)
        error = _translate(exc, repo, endpoint, "pull again to resume" if resumable else "pull again")
        if error is None:
            raise
        raise error from None


def _translate(exc: Exception, repo: str, endpoint: str, retry: str) -> StoreError | None:
    import httpx2
    from huggingface_hub import errors as e

    if isinstance(exc, e.GatedRepoError):
        return StoreError(f"'{repo}' is gated: accept its license on the Hub, then set HF_TOKEN")
    if isinstance(exc, e.RepositoryNotFoundError):
        return StoreError(f"Hub repository '{repo}' not found (private repos need HF_TOKEN)")
    if isinstance(exc, e.RevisionNotFoundError):
        return StoreError(f"Revision not found in Hub repository '{repo}'", param="revision")
    if isinstance(exc, e.RemoteEntryNotFoundError):
        return StoreError(f"A file listed in '{repo}' is missing on the Hub")
    if isinstance(exc, e.OfflineModeIsEnabled):
        return StoreError("Cannot pull from the Hub: offline mode is on (HF_HUB_OFFLINE=1)")
    if isinstance(exc, e.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return StoreError(f"The Hub at {endpoint} answered HTTP {status} for '{repo}'; {retry}")
    if isinstance(exc, e.HFValidationError):
        return StoreError(f"Invalid Hub repo id '{repo}'", param="source")
    if isinstance(exc, httpx2.TimeoutException):
        return StoreError(f"The Hub at {endpoint} did not answer in time ({exc.__class__.__name__}; HF_HUB_ETAG_TIMEOUT, "
                          f"HF_HUB_DOWNLOAD_TIMEOUT); {retry}")
    if isinstance(exc, (e.LocalEntryNotFoundError, ConnectionError, httpx2.TransportError)) and not isinstance(
        exc, (httpx2.RemoteProtocolError, httpx2.ReadError)
    ):
        return StoreError(f"Could not reach the Hub at {endpoint} ({exc.__class__.__name__}); {retry}")
    if isinstance(exc, httpx2.HTTPError):
        return StoreError(f"The download of '{repo}' was interrupted ({exc.__class__.__name__}); {retry}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError("Not enough disk space for this model")
        if exc.errno is not None:
            return StoreError(f"Disk error while pulling '{repo}': {exc.strerror}")
        return StoreError(f"The download of '{repo}' was interrupted ({exc.__class__.__name__}); {retry}")
    return None


class HubClient:
    """The few Hub calls a pull needs, all against one endpoint."""

    def __init__(self, endpoint: str | None = None, token: str | bool | None = None):
        self.endpoint = (endpoint or default_endpoint()).rstrip("/")
        self.token = token

    def _api(self) -> Any:
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=self.token, library_name=LIBRARY)

    def resolve(self, repo: str, revision: str | None) -> str:
        """The commit sha that ``revision`` (default: the main branch) points at."""
        with hub_errors(repo, self.endpoint):
            # huggingface_hub's shared session has no timeout: an endpoint that accepts the connection and
            # never answers (a captive portal, a dead proxy) would hang the pull for good
            info = self._api().model_info(repo, revision=revision, timeout=metadata_timeout())
        if not info.sha:
            raise StoreError(f"The Hub did not say which commit '{repo}' is at")
        return str(info.sha)

    def list_files(self, repo: str, commit: str) -> list[HubFile]:
        """Every file in the repo at ``commit``, with its size and expected hash."""
        from huggingface_hub.hf_api import RepoFile

        with hub_errors(repo, self.endpoint):
            entries = list(self._api().list_repo_tree(repo, revision=commit, recursive=True))
        files = []
        for entry in entries:
            if not isinstance(entry, RepoFile):
                continue
            lfs = entry.lfs
            files.append(
                HubFile(
                    path=safe_relpath(entry.path),
                    size=int(lfs.size if lfs is not None else entry.size),
                    sha256=lfs.sha256.lower() if lfs is not None else None,
                    git_sha1=None if lfs is not None else (entry.blob_id or None),
                )
            )
        return files

    def download(self, repo: str, commit: str, files: list[HubFile], dest: Path, progress: ProgressFn | None) -> None:
        """Fetch ``files`` into ``dest`` (skipping those a previous attempt completed)."""
        from huggingface_hub import hf_hub_download

        for f in files:
            bar = _BarFactory(progress, f.path, f.size)
            with hub_errors(repo, self.endpoint, dest):
                hf_hub_download(
                    repo,
                    f.path,
                    revision=commit,
                    local_dir=str(dest),
                    endpoint=self.endpoint,
                    token=self.token,
                    library_name=LIBRARY,
                    tqdm_class=bar,  # type: ignore[arg-type]
                )
            if progress is not None:
                progress(PullProgress("download", f.path, f.size, f.size))


def verify_files(dest: Path, files: list[HubFile], progress: ProgressFn | None) -> list[ManifestFile]:
    """Hash each downloaded file and check it against the Hub; a bad file is deleted, then StoreError."""
    out = []
    for f in files:
        path = dest / f.path
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"Downloaded file '{f.path}' is missing")
        sha256, git_sha1, size = hash_file(path, progress=progress, label=f.path)
        ok = size == f.size and (f.sha256 is None or sha256 == f.sha256) and (f.git_sha1 is None or git_sha1 == f.git_sha1)
        if not ok:
            path.unlink(missing_ok=True)
            meta = dest / ".cache" / "huggingface" / "download" / f"{f.path}.metadata"
            meta.unlink(missing_ok=True)
            raise StoreError(f"'{f.path}' from the Hub failed verification (hash or size mismatch); pull again")
        out.append(ManifestFile(f.path, sha256, size))
    return out
