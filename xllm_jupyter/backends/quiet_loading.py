"""Library progress bars off while we load or convert a model: our callers report progress themselves.

transformers draws a tqdm bar per load ("Loading weights") and per GGUF conversion; on a
terminal they interleave with the CLI's own bars and spinner, in a server log they are noise.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()
_depth = 0  # nested or concurrent loads: only the outermost one switches the bars back on
_restore: list[Any] = []


def _passthrough(iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Stands in for tqdm where a module bound it at import: iterate, draw nothing."""
    return iterable


def _switch_off() -> list[Any]:
    """Turn the bars off; returns how to undo it."""
    undo: list[Any] = []
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return undo
    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        undo.append(hf_logging.enable_progress_bar)
    try:  # the GGUF reader imports tqdm.auto itself, past transformers' switch
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return undo
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = _passthrough
        undo.append(lambda: setattr(gguf_utils, "tqdm", original))
    return undo


@contextmanager
def library_bars_off() -> Iterator[None]:
    """Within the block, transformers draws no progress bars (thread-safe, re-entrant)."""
    global _depth, _restore
    with _lock:
        if _depth == 0:
            _restore = _switch_off()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for undo in reversed(_restore):
                    undo()
                _restore = []
