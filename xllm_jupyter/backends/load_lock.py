"""One lock for transformers model loads: they change process-wide state, so two at once break each other.

``from_pretrained`` (transformers 5) builds the model inside context managers that patch classes and
globals for the whole process, not for the calling thread:

- ``init.no_tie_weights`` swaps ``PreTrainedModel.tie_weights`` for a no-op on the class; the load ties
  its weights at its very end. A second load that reaches that point while the first is still building
  its model leaves its output head untied on the meta device ("Cannot copy out of meta tensor"). When
  the two windows overlap, the second saves the first's no-op as "the original" and puts it back on exit:
  weight tying then stays off, and every later load in the process fails the same way.
- ``local_torch_dtype`` sets torch's default dtype (process-wide) and restores what it saw, so
  overlapping loads of different dtypes can leave the default at the other load's dtype for good.
- ``meta_device_safe_creation_ops`` swaps ``torch.linspace`` the same way.

Every load through ``from_pretrained`` (chat, embedding, GGUF conversion) holds ``LOAD_LOCK``
for the whole call, except while it reads a GGUF file: transformers' ``load_gguf_checkpoint`` (the
config's read of the metadata, and for the architectures transformers reads the old way, Llama among
them, the dequantizing of every tensor: most of a GGUF load, 20 s and more for SmolLM2 on a shared
CPU) parses the file into new numpy-backed tensors and touches none of the patched state, so it runs
with the lock let go (``release_during_gguf_reads``) and other models load meanwhile. The windows
that patch (the model's build) or read what is patched (the weight tying at the end) stay under it.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

#: re-entrant: a load that merges a LoRA (peft builds on the loaded model) may nest under its own load
LOAD_LOCK = threading.RLock()

_held = threading.local()  # .locks: the locks this thread entered through exclusive_load, innermost last


@contextmanager
def exclusive_load() -> Iterator[None]:
    """Hold ``LOAD_LOCK`` (read at call time, so a test can put a recording lock in its place)."""
    lock = LOAD_LOCK
    with lock:
        _held.__dict__.setdefault("locks", []).append(lock)
        try:
            yield
        finally:
            _held.locks.pop()  # (the list lock_let_go put back: the same one)


@contextmanager
def lock_let_go() -> Iterator[None]:
    """Let go of every ``exclusive_load`` this thread holds until the block ends, then take them back.

    Only for work that neither patches process-wide state nor reads what a load patches.
    """
    locks = getattr(_held, "locks", None)
    if not locks:
        yield
        return
    _held.locks = []  # (a load nested in the block, if any, keeps its own list meanwhile)
    for lock in reversed(locks):
        lock.__exit__(None, None, None)
    try:
        yield
    finally:
        for lock in locks:
            lock.__enter__()
        _held.locks = locks


_install = threading.Lock()


def release_during_gguf_reads() -> None:
    """Make transformers' GGUF reader let go of ``LOAD_LOCK`` while it runs (wrapped once; again after a test
    put its own function in its place)."""
    from transformers import modeling_gguf_pytorch_utils as reader

    with _install:
        read = reader.load_gguf_checkpoint
        if getattr(read, "lets_go_of_load_lock", False):
            return

        @functools.wraps(read)
        def load_gguf_checkpoint(*args: Any, **kwargs: Any) -> Any:
            with lock_let_go():  # (the config's read and the tensors' read both come here)
                return read(*args, **kwargs)

        marked: Callable[..., Any] = load_gguf_checkpoint
        marked.lets_go_of_load_lock = True  # type: ignore[attr-defined]
        reader.load_gguf_checkpoint = marked
