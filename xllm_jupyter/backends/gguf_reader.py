"""GGUF files read through a plain numpy array: the same fields and tensors as gguf's own reader, 3-4 times faster.

gguf's ``GGUFReader`` maps its file as a ``numpy.memmap`` and slices it once per value it reads, and every slice
of a memmap runs memmap's ``__array_finalize__`` in Python. A tokenizer's vocabulary is some 400,000 values, so
one read of SmolLM2's GGUF took 4 s and more on a shared CPU, and converting it reads the file four times (its
metadata, then transformers' tokenizer, config and weights). Sliced through a plain ``ndarray`` view of the same
mapping, nothing else changes: the view keeps the mapping open, read-only as before.

transformers also builds gguf's table of tensor names (``get_tensor_name_map``) once per module of the model it
maps the file's tensors onto, about 400 times for SmolLM2 (6 s); the table depends only on the architecture
and the block count, so one is kept for each.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

_made: dict[str, type] = {}
_lock = threading.Lock()


def reader_class() -> type:
    """gguf's ``GGUFReader`` with its file's mapping seen as a plain ``ndarray`` (built once, on first use)."""
    with _lock:
        if "reader" not in _made:
            import numpy as np
            from gguf.gguf_reader import GGUFReader  # the library's own class, wherever gguf.GGUFReader points

            class PlainArrayReader(GGUFReader):
                """``GGUFReader`` whose ``data`` (the file's mapping) is a plain ``ndarray`` view of it."""

                @property
                def data(self) -> Any:
                    """The file's bytes: a plain view of the mapping (whose base keeps the mapping open)."""
                    return self._plain_data

                @data.setter
                def data(self, value: Any) -> None:
                    self._plain_data = value.view(np.ndarray)

            _made["reader"] = PlainArrayReader
        return _made["reader"]


def read_gguf(path: Path) -> Any:
    """A ``GGUFReader`` of ``path`` (raises as gguf's does on a file it cannot read)."""
    return reader_class()(str(path))


def fast_gguf_reads() -> None:
    """Make ``gguf.GGUFReader``, the class transformers' GGUF loading imports at each load, the plain-array one,
    and ``gguf.get_tensor_name_map`` (imported so too) build each table of tensor names once."""
    import gguf

    gguf.GGUFReader = reader_class()
    gguf.get_tensor_name_map = tensor_name_map


@functools.lru_cache(maxsize=16)
def tensor_name_map(arch: Any, n_blocks: int) -> Any:
    """gguf's ``TensorNameMap`` for an architecture and block count, built once (transformers only reads it)."""
    from gguf.tensor_mapping import get_tensor_name_map

    return get_tensor_name_map(arch, n_blocks)
