"""The few tokenizers unloaded models used last, kept a while so the models' next loads read nothing again.

The common notebook pattern: a model's keep_alive expires (unload), its user comes back minutes later and it
loads again. Its tokenizer's ``Tokenizer.from_file`` (0.12-0.29 s for SmolLM2's) and llguidance's build of
its grammar tokenizer (0.3-0.7 s) hold the GIL, the IOLoop stands still meanwhile, and both were paid again
at every reload. A model's unload hands its tokenizer here (``tokenizer_files.release``); a load of the same
tokenizer files with the same arguments gets it back (``tokenizer_files.load_tokenizer``), and its grammar
tokenizer with it (``constraints`` keeps a build as long as its tokenizer lives).

Bounded: the ``COUNT`` most recently released, each for at most ``SECONDS`` (the engine's keep_alive reaper
drops expired ones: ``expire``), all of them when a load has to unload models for CPU memory (``clear``).
They are not charged to the memory budget, as a loaded model's tokenizer is not (tens of MB each).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Hashable

#: how many released tokenizers are kept (the most recently released)
COUNT = 2
#: how long one is kept after its release, in seconds
SECONDS = 30 * 60.0


class ReleasedTokenizers:
    """Recently released tokenizers by key (what they were read from), the most recent ``count``, each for ``seconds``."""

    def __init__(self, count: int = COUNT, seconds: float = SECONDS, clock: Callable[[], float] = time.monotonic):
        self.count = count
        self.seconds = seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()  # key -> (released at, tokenizer), oldest first

    def keep(self, key: Hashable, tokenizer: Any) -> None:
        """Keep ``tokenizer``, just released, under ``key``; the oldest kept goes beyond ``count``."""
        with self._lock:
            self._kept.pop(key, None)
            if self.count <= 0:
                return
            self._kept[key] = (self._clock(), tokenizer)
            dropped = [self._kept.popitem(last=False) for _ in range(len(self._kept) - self.count)]
        del dropped  # (freed outside the lock)

    def take(self, key: Hashable) -> Any | None:
        """The tokenizer kept under ``key`` (no longer kept: a model uses it again), None if none or expired."""
        with self._lock:
            entry = self._kept.pop(key, None)
        if entry is None or self._clock() - entry[0] > self.seconds:
            return None
        return entry[1]

    def due(self) -> bool:
        """Whether one has been kept for ``seconds`` (cheap: the reaper asks this every pass)."""
        with self._lock:
            oldest = next(iter(self._kept.values()), None)
        return oldest is not None and self._clock() - oldest[0] > self.seconds

    def expire(self) -> int:
        """Drop the ones kept for ``seconds``; how many went."""
        now = self._clock()
        with self._lock:
            old = [k for k, (at, _) in self._kept.items() if now - at > self.seconds]
            dropped = [self._kept.pop(k) for k in old]
        return len(dropped)

    def clear(self) -> int:
        """Drop them all (a load needs the memory); how many went."""
        with self._lock:
            dropped = list(self._kept.values())
            self._kept.clear()
        return len(dropped)

    def __len__(self) -> int:
        """How many are kept now."""
        with self._lock:
            return len(self._kept)


#: the process's released tokenizers (tests swap in their own)
RELEASED = ReleasedTokenizers()
