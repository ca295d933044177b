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
for the whole call. Loads are disk- and CPU-bound, so running two at once gained little anyway.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

#: re-entrant: a load that merges a LoRA (peft builds on the loaded model) may nest under its own load
LOAD_LOCK = threading.RLock()


@contextmanager
def exclusive_load() -> Iterator[None]:
    """Hold ``LOAD_LOCK`` (read at call time, so a test can put a recording lock in its place)."""
    lock = LOAD_LOCK
    with lock:
        yield
