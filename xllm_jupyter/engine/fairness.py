"""Fair admission of waiting jobs into a model's running batch, across users.

A plain FIFO lets one user who submits many requests at once fill every batch slot,
so everyone else waits for that user's generations to end. ``FairQueue`` keeps one
FIFO per user instead and hands free slots out user by user:

* the waiting user holding the fewest running slots goes first (ties: the user served
  longest ago first, round-robin), so a newcomer gets the next free slot;
* once more than one user has been active recently (queued work or had a generation end
  within ``window`` seconds, or has work still waiting), the users who already run jobs may
  hold at most ``max_batch - reserved`` slots between them, keeping ``reserved`` slots free
  for whoever arrives next with nothing running. There is no preemption, so this reserve is
  what bounds a newcomer's wait to one step instead of the length of someone else's generation.
  A user alone on the server (a single-user Jupyter server) still gets every slot, so
  someone arriving after the window has passed waits for the first of that user's
  generations to end; ``always`` keeps the reserve even then (a shared hub's choice).

With one user this is a FIFO. Jobs carry their user in ``SequenceJob.user``.
``reserved``, ``window`` and ``always`` come from config ``quotas.reserved_slots``,
``quotas.active_window_seconds`` and ``quotas.reserve_when_alone`` through ``FairnessPolicy``
(Engine -> ModelRunner).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..core.config import QuotaConfig

Item = TypeVar("Item")

#: slots kept free for other users while several are active (0 turns the reserve off)
DEFAULT_RESERVED_SLOTS = QuotaConfig.reserved_slots  # the config's default is the one source
#: how long a user counts as active after queueing work, for the reserve
DEFAULT_WINDOW_SECONDS = QuotaConfig.active_window_seconds


def job_user(item: Any) -> str:
    """The fairness key of a runner queue entry ``(SequenceJob, state)``: its user, "" if anonymous."""
    return item[0].user or ""


@dataclass(frozen=True)
class FairnessPolicy:
    """A runner's fairness settings: slots ``reserved`` for others, the activity ``window`` (s), and
    whether the reserve holds ``always`` (also while one user is alone)."""

    reserved: int = DEFAULT_RESERVED_SLOTS
    window: float = DEFAULT_WINDOW_SECONDS
    always: bool = False

    @classmethod
    def from_quotas(cls, quotas: QuotaConfig | None = None) -> FairnessPolicy:
        """From ``quotas.reserved_slots``, ``active_window_seconds`` and ``reserve_when_alone`` (None: defaults)."""
        if quotas is None:
            return cls()
        return cls(quotas.reserved_slots, quotas.active_window_seconds, quotas.reserve_when_alone)

    def queue(self) -> FairQueue[Any]:
        """A runner's waiting queue with these settings."""
        return FairQueue(reserved=self.reserved, window=self.window, always=self.always)


class FairQueue(Generic[Item]):
    """Per-user FIFOs with round-robin, least-running-first admission (engine thread only)."""

    def __init__(
        self,
        key: Callable[[Item], str] = job_user,
        *,
        reserved: int = DEFAULT_RESERVED_SLOTS,
        window: float = DEFAULT_WINDOW_SECONDS,
        always: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window <= 0:
            raise ValueError(f"the fairness window must be positive, not {window!r}")
        self._key = key
        self.reserved = max(0, reserved)
        self.window = window
        self.always = always  # the reserve holds while one user is alone too
        self._clock = clock
        # user -> that user's waiting items; order = round-robin order (served last = at the end)
        self._queues: OrderedDict[str, deque[Item]] = OrderedDict()
        self._size = 0
        self._seen: dict[str, float] = {}  # user -> when they last queued work
        # user -> when a job of theirs was last admitted (a counter): ties go to the user served
        # longest ago, also when that user has just come back with a new request
        self._served: dict[str, int] = {}
        self._serial = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Item]:
        for queue in list(self._queues.values()):
            yield from list(queue)

    def extend(self, items: Iterable[Item]) -> None:
        """Queue ``items`` at the end of their users' FIFOs."""
        now = self._clock()
        for item in items:
            user = self._key(item)
            queue = self._queues.get(user)
            if queue is None:
                queue = self._queues[user] = deque()
            queue.append(item)
            self._seen[user] = now
            self._size += 1

    def append(self, item: Item) -> None:
        """Queue one item."""
        self.extend((item,))

    def ended(self, user: str) -> None:
        """A job of ``user``'s left the batch: they count as active from now (a generation that ran for longer
        than the window ended; the user's next request comes a moment later, and the slot must still be free)."""
        self._seen[user] = self._clock()

    def remove_if(self, drop: Callable[[Item], bool]) -> int:
        """Remove every waiting item for which ``drop`` is true; returns how many went."""
        removed = 0
        for user in list(self._queues):
            queue = self._queues[user]
            kept = deque(item for item in queue if not drop(item))
            removed += len(queue) - len(kept)
            if kept:
                self._queues[user] = kept
            else:
                del self._queues[user]
        self._size -= removed
        return removed

    def clear(self) -> None:
        """Forget every waiting item."""
        self._queues.clear()
        self._size = 0

    def counts(self) -> Counter[str]:
        """Items waiting per user (users with nothing waiting are left out)."""
        return Counter({user: len(queue) for user, queue in self._queues.items()})

    def waiting_users(self) -> list[str]:
        """Users with queued work, in round-robin order."""
        return list(self._queues)

    def shared(self) -> bool:
        """True when more than one user is active: queued work or had a job end (``ended``) within the last
        ``window`` seconds, or has work still waiting (a flood queued at once stays active while it waits, however
        long ago it was queued: it took the reserve the moment its window passed, so another user coming back
        waited for one of its generations to end)."""
        self._forget_idle()
        return len(self._seen) > 1 or len(self._seen.keys() | self._queues.keys()) > 1

    def _forget_idle(self) -> None:
        """Drop users idle for longer than ``window``: keeps the per-user maps bounded by active users."""
        horizon = self._clock() - self.window
        for user in [u for u, t in self._seen.items() if t < horizon]:
            del self._seen[user]
            if user not in self._queues:
                self._served.pop(user, None)

    def take(self, free: int, running: Iterable[str] = (), max_batch: int | None = None,
             fits: Callable[[Item], bool] | None = None) -> list[Item]:
        """Up to ``free`` items to admit now, chosen fairly.

        ``running`` lists the user of every job in the batch (one entry per job);
        ``max_batch`` is the batch limit the reserve is kept from (None: no reserve).
        ``fits`` says whether the model has room for an item now (and claims it if so). The
        item whose turn it is and does not fit stops admission: it stays first in line, and
        nobody else's smaller job overtakes it, so it starts as soon as room frees.
        """
        out: list[Item] = []
        if free <= 0 or not self._size:
            return out
        held = Counter(running)
        total = sum(held.values())
        cap = None
        shared = self.shared()  # also forgets idle users, once per call
        if max_batch is not None and self.reserved and max_batch > self.reserved and (shared or self.always):
            cap = max_batch - self.reserved
        while len(out) < free and self._queues:
            # least-running first; ties: served longest ago (never served: first), then queue order
            user = min(self._queues, key=lambda u: (held[u], self._served.get(u, 0)))
            if cap is not None and held[user] and total >= cap:
                # everyone waiting already runs something: the reserve stays free for a user who runs nothing
                # (per user, two users' floods filled it between them and a third waited for a generation to end)
                break
            if fits is not None and not fits(self._queues[user][0]):
                break  # its turn; it waits for room rather than being overtaken
            queue = self._queues.pop(user)
            out.append(queue.popleft())
            self._size -= 1
            held[user] += 1
            total += 1
            self._serial += 1
            self._served[user] = self._serial
            if queue:
                self._queues[user] = queue  # to the back of the round-robin order
        return out


__all__ = ["DEFAULT_RESERVED_SLOTS", "DEFAULT_WINDOW_SECONDS", "FairQueue", "FairnessPolicy", "job_user"]
