"""Loading torch's native libraries ahead of ``import torch``, with the GIL released.

``import torch`` loads ``libtorch_cpu.so`` (hundreds of MB: its relocations and the static initializers
that register every operator) through the import system's ``dlopen``, which holds the GIL: 0.2-0.3 s
on this project's 2-core machine in which no other thread runs, the IOLoop (every stream, ``/health``,
a JupyterLab's requests) included. A call through ctypes releases the GIL, so ``preload_torch`` calls
libc's ``dlopen`` on ``libtorch.so`` (and so its dependencies) that way first; the import then finds
the libraries loaded and only runs torch's Python-side set-up (docs/performance.md, "A model load and
the IOLoop"). The flags are those torch's import uses by default (``RTLD_LOCAL``, its symbols not
global), the handle is never closed, and anything unexpected just leaves the work to the import.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from pathlib import Path

_lock = threading.Lock()
_done = False  # tried once per process (loaded or not): later calls return at once
_handles: list[int] = []  # the dlopen handles, kept: the libraries stay loaded for the process's life
#: libraries only a GPU build of torch has: with one, preloading is left out
GPU_LIBRARIES = ("libtorch_cuda.so", "libtorch_hip.so", "libtorch_xpu.so")  # (CUDA, ROCm, Intel XPU builds)


def torch_library() -> Path | None:
    """The ``libtorch.so`` of the installed CPU build of torch (found without importing it); None elsewhere, for a
    GPU build, or if absent."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    lib = Path(spec.origin).parent / "lib"
    if any((lib / gpu).exists() for gpu in GPU_LIBRARIES):
        # a CUDA/ROCm build's import first loads its GPU runtimes its own way (libtorch_global_deps, the nvidia
        # wheels' libraries in a set order): a dlopen ahead of it could bind others (LD_LIBRARY_PATH's), and
        # only CPU builds have been measured and checked, so the import keeps doing it all there
        return None
    path = lib / "libtorch.so"
    return path if path.is_file() else None


def preload_torch() -> bool:
    """Load torch's native libraries with the GIL released, once per process, before torch is imported;
    True when this call loaded them (False: already imported, tried before, not found or not loadable)."""
    global _done
    with _lock:
        if _done or "torch" in sys.modules:
            _done = True
            return False
        _done = True
        if os.environ.get("TORCH_USE_RTLD_GLOBAL"):
            return False  # torch loads them its other way then: leave it to the import
        path = torch_library()
        if path is None:
            return False
        try:
            libc = ctypes.CDLL(None)
            dlopen = libc.dlopen
        except (OSError, AttributeError):
            return False
        dlopen.argtypes = [ctypes.c_char_p, ctypes.c_int]
        dlopen.restype = ctypes.c_void_p
        # a plain ctypes call: the GIL is released for the whole dlopen (ctypes.CDLL(path) itself holds it)
        handle = dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_LOCAL)
        if not handle:
            return False  # (a missing dependency: the import reports it, as it would have)
        _handles.append(handle)
        return True
