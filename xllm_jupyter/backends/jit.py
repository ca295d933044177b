"""Importing exllama libraries whose CUDA kernels may need compiling first (minutes, once per machine).

exllamav3 and exllamav2 compile their C++/CUDA extension with torch's JIT loader on first
import unless a prebuilt one is installed. That takes several minutes on a fast machine;
silence for that long looks like a hang, so say what is happening and show progress
(object files built so far) in the log while it runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

#: seconds between progress lines while kernels compile
PROGRESS_INTERVAL = 15.0


def _build_dir(ext: str) -> Path | None:
    """Where torch's JIT loader builds ``ext`` (None if torch does not say)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(ext, False))
    except Exception:  # a private torch helper: progress is a nicety, never a failure
        return None


#: source suffixes the libraries' CUDA builds compile
_SOURCE_SUFFIXES = (".c", ".cpp", ".cu")


def _is_cuda_source(relative: Path) -> bool:
    """Whether the file at ``relative`` (to the extension's source folder) is compiled by a CUDA build: not a
    ROCm-only source (exllamav3 keeps those under ``rocm/``) nor one that torch's hipify wrote beside the others."""
    name = relative.name
    if relative.suffix not in _SOURCE_SUFFIXES or relative.parts[0] == "rocm":
        return False
    return not ("_hip." in name or name.startswith("hip_"))


def _source_count(lib: str, ext: str) -> int:
    """How many C++/CUDA sources the library's CUDA build compiles (the object files it makes)."""
    spec = importlib.util.find_spec(lib)
    if spec is None or not spec.submodule_search_locations:
        return 0
    root = Path(list(spec.submodule_search_locations)[0]) / ext
    return sum(1 for p in root.rglob("*") if p.is_file() and _is_cuda_source(p.relative_to(root)))


class BuildProgress:
    """Logs how many of the extension's sources have compiled, every ``PROGRESS_INTERVAL`` seconds."""

    def __init__(self, lib: str, build_dir: Path, total: int):
        self.lib, self.build_dir, self.total = lib, build_dir, total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"xllm-jit-{lib}", daemon=True)

    def start(self) -> None:
        """Begin reporting."""
        self._thread.start()

    def stop(self) -> None:
        """Stop reporting."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_INTERVAL):
            done = sum(1 for _ in self.build_dir.glob("*.o")) if self.build_dir.is_dir() else 0
            log.warning("%s: compiled %d of %d CUDA/C++ sources...", self.lib, done, self.total)


#: library -> the error its import ahead of a load raised (``import_ahead``), for that load to raise
_failed_ahead: dict[str, BaseException] = {}


def import_ahead(lib: str) -> bool:
    """``import_with_kernels(lib)`` ahead of a load (``Backend.import_libraries``); False if it fails, its error
    kept for the load's own ``import_with_kernels`` to raise once, as it would have raised it (a kernel build
    that failed is not run a second time, for minutes, only to fail again). Never raises."""
    try:
        import_with_kernels(lib)
    except Exception as exc:
        _failed_ahead[lib] = exc
        log.debug("importing %s ahead of its first load failed", lib, exc_info=True)
        return False
    return True


def import_with_kernels(lib: str) -> ModuleType:
    """Import ``lib`` (exllamav3 / exllamav2) and its CUDA extension, narrating a first-time build."""
    failed = _failed_ahead.pop(lib, None)
    if failed is not None:  # the import ahead of this load failed just now: the same error, not a second try
        raise failed
    ext = f"{lib}_ext"
    progress = None
    if importlib.util.find_spec(ext) is None:  # no prebuilt extension installed
        build_dir = _build_dir(ext)
        if build_dir is None or not any(build_dir.glob(f"{ext}*.so")):
            log.warning("%s: compiling its CUDA kernels for this GPU on first use; this takes several minutes "
                        "and is cached for later starts (set MAX_JOBS to use more CPU cores)", lib)
            if build_dir is not None:
                progress = BuildProgress(lib, build_dir, _source_count(lib, ext))
                progress.start()
    try:
        module = importlib.import_module(lib)
        importlib.import_module(f"{lib}.ext")
    finally:
        if progress is not None:
            progress.stop()
    if progress is not None:
        log.warning("%s: CUDA kernels ready", lib)
    return module
