"""pytest plugin for ``api_check.sh``: exllamav3's compiled extension module stood in, so that the library's
Python code (generator, jobs, page table, sampler steps, grammar filter) imports on a machine without CUDA.

Every kernel raises ``NotImplementedError`` when called, and reads as false where the library tests a
capability flag (``ext.HAS_...``). The one host-side helper the page table calls while it schedules
prefill, ``count_match_tensor``, is reimplemented. The checks ``pytest -m exllama`` runs take the forward
and the CUDA sampling out already (``tests/page_generator.py``); one that reaches a kernel fails by name.
Not for measuring anything: ``cross_build.sh`` and ``cpu_check.sh`` run the real module.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types


class _Kernel:
    """A stood-in kernel (or flag): false, and raising when called."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"exllamav3_ext.{self.name} is stood in (api_check.sh: no CUDA extension)")

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, item: str) -> "_Kernel":
        return _Kernel(f"{self.name}.{item}")


def count_match_tensor(a, b, max_a: int) -> int:
    """Leading positions where ``a`` (a page's tokens) and ``b`` (1, n) agree, at most ``max_a`` (the C++ helper)."""
    left, right = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    limit = min(int(max_a), int(b.shape[1]), len(left))
    n = 0
    while n < limit and left[n] == right[n]:
        n += 1
    return n


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() must find it
    module.__file__ = __file__  # inspect.getmodule() walks sys.modules and needs a file for each
    return module


ext = _module("exllamav3_ext")
ext.count_match_tensor = count_match_tensor
ext.__getattr__ = _Kernel  # type: ignore[attr-defined]
# exllamav3.ext compiles or imports the real module at import: taken by this one instead
loader = _module("exllamav3.ext")
loader.exllamav3_ext = ext  # type: ignore[attr-defined]
sys.modules.setdefault("exllamav3_ext", ext)
sys.modules.setdefault("exllamav3.ext", loader)
