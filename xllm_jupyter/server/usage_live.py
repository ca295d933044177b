"""What the usage tracker knows about work under way: quota holds of running generations, engine queues.

A running generation holds the most it can use of its user's daily quota until it ends
(``hold_generation``), so concurrent requests cannot pass the quota together. Each user's
sequences in the engine (running, and waiting for a batch slot) are read from the engine
when asked, for ``/admin/usage`` and for the ``xllm_user_sequences_*`` metrics.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.errors import RateLimited
from ..core.types import UserSequences

if TYPE_CHECKING:
    from .usage import _UserUsage


class LiveUsageMixin:
    """UsageTracker methods about generations running now; the tracker owns the state they use."""

    _lock: threading.Lock
    _labels: set[str]
    _holds: Counter[tuple[str, str]]
    queues: Callable[[], dict[str, UserSequences]] | None
    # UsageTracker's
    _entry: Callable[[str], "_UserUsage"]
    _day_quota: Callable[[str, tuple[str, ...]], int]
    _label: Callable[[str], str]
    _reject: Callable[["_UserUsage", str, str], None]

    def hold_generation(self, request: Any) -> Callable[[], None]:
        """Hold the most a generation can use of its user's daily quota while it runs; returns the release.

        Its prompt plus ``n x max_tokens`` (the serving layer's bound when the request set none:
        what fits the context, capped by ``server.max_tokens_limit``) counts as used until it ends
        and is charged what it really used. RateLimited (429) when the user has other generations
        running and this one could take the tokens used today past the quota: concurrent requests
        are refused instead of overshooting. One alone always runs, as sequential requests do; the
        generations of one request (a legacy completion's prompts) never refuse each other.
        """
        user = request.user or ""
        tokens = len(request.prompt_ids) + request.params.n * request.params.max_tokens
        # (serving always names its requests; a nameless one is a request of its own)
        hold = (user, request.request_id or f"#{id(request)}")
        with self._lock:
            entry = self._entry(user)
            per_day = self._day_quota(user, entry.groups)
            if not per_day:
                return _nothing
            others = entry.reserved - self._holds[hold]
            if others > 0 and entry.tokens_today + entry.reserved + tokens > per_day:
                self._reject(entry, self._label(user or ""), "tokens_per_day")
                raise RateLimited(
                    f"Daily token quota: {entry.tokens_today} of {per_day} tokens used today and {entry.reserved} "
                    f"held by this user's requests running now; this one could use {tokens} (prompt + n x max_tokens). "
                    "Retry when one finishes, or ask for fewer max_tokens.",
                    retry_after=1,
                )
            entry.reserved += tokens
            self._holds[hold] += tokens

        def release() -> None:
            with self._lock:
                held = self._entry(user)
                held.reserved = max(0, held.reserved - tokens)
                self._holds[hold] -= tokens
                if self._holds[hold] <= 0:
                    del self._holds[hold]

        return release

    def queue_counts(self) -> dict[str, UserSequences]:
        """Each user's sequences in the engine now (empty when the engine cannot say)."""
        if self.queues is None:
            return {}
        try:
            return self.queues()
        except Exception:  # an engine mid-shutdown: no figures rather than a failed page or scrape
            return {}

    def queue_labels(self) -> dict[str, UserSequences]:
        """``queue_counts`` by metrics label: every label seen so far (0 when idle), users past the cap as ``other``."""
        counts = self.queue_counts()
        with self._lock:
            seen = {label: UserSequences() for label in self._labels}
            labelled = [{self._label(user or ""): seqs} for user, seqs in counts.items()]
        return UserSequences.summed([seen, *labelled])


def _nothing() -> None:
    """The release of a generation that held nothing."""


class QueueCollector(Collector):
    """``xllm_user_sequences_running`` / ``_queued``, read from the engine at scrape time."""

    def __init__(self, tracker: LiveUsageMixin):
        self.tracker = tracker

    def describe(self) -> Iterable[Any]:
        """Nothing up front: the labels depend on who has been seen."""
        return []

    def collect(self) -> Iterable[Any]:
        """Each user's sequences holding a batch slot, and those waiting for one."""
        running = GaugeMetricFamily("xllm_user_sequences_running", "Sequences generating now (batch slots held), "
                                    "by user.", labels=("user",))
        queued = GaugeMetricFamily("xllm_user_sequences_queued", "Sequences waiting for a batch slot, by user.",
                                   labels=("user",))
        for label, seqs in sorted(self.tracker.queue_labels().items()):
            running.add_metric([label], float(seqs.running))
            queued.add_metric([label], float(seqs.queued))
        yield running
        yield queued
