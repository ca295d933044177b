"""Per-user usage: identity of the caller, quotas, accounting, metrics and ``GET /admin/usage``.

The user is whoever the auth base says is calling: the hub user behind a JupyterHub
token, the Jupyter user, or the API key id on ``xllm serve``. Every generation route
is admitted here (``quotas.max_concurrent`` in flight, ``quotas.tokens_per_day``
per UTC day; per-user and per-group overrides), and every finished generation is
charged to its user by ``UsageTracker.charge_generation``, which the metrics wrapper of the
engine (``ServerMetrics.observed``) calls with each generation's final usage. While a
generation runs, the most it can use is held against the daily quota
(``UsageTracker.hold_generation``, in usage_live.py), so concurrent requests cannot pass it together.

Prometheus labels carry user names, so their number is capped
(``quotas.metrics_max_users``): users past the cap share the label ``other``.
Given a ``path`` (config ``quotas.usage_file``, see ``usage_file.py``), the counts
survive restarts, so a restart does not reset a daily quota.
"""

from __future__ import annotations

import datetime as dt
import getpass
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter

from ..core.config import QuotaConfig
from ..core.errors import ConfigError, RateLimited
from ..core.types import UserSequences
from .handlers import METERED_ROUTES, RequestMixin
from .usage_file import Records, UsageSaver, file_stamp, merge_usage, read_usage
from .usage_live import LiveUsageMixin, QueueCollector

#: the metrics label of users past ``quotas.metrics_max_users``
OTHER = "other"
#: the metrics label of callers with no user
ANONYMOUS = "anonymous"


def user_label(user: str) -> str:
    """``user``'s metrics label: the name itself, ``anonymous`` for no user. A name that is a reserved label or begins
    with ``~`` gets one more ``~`` in front, so no user shares ``other`` or ``anonymous``, nor another user's label."""
    if not user:
        return ANONYMOUS
    if user in (OTHER, ANONYMOUS) or user.startswith("~"):
        return "~" + user
    return user


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key of a user (None = anonymous), their groups, admin rights, and their name.

    ``user`` keys everything per user (stored objects, usage, fair scheduling); ``name`` is set where that
    key is more than the name config files use (a hub account: ``name/created``, see hub/accounts.py).
    """

    user: str | None
    groups: tuple[str, ...] = ()
    admin: bool = False
    name: str | None = None
    #: the one anonymous caller of a server without API keys: labelled ``anonymous`` in the metrics, not escaped
    keyless: bool = False


def caller_of(handler: Any) -> Caller:
    """The caller of a standalone (API key id) or Jupyter (Jupyter user) request."""
    key_id = getattr(handler, "xllm_key_id", None)
    if key_id:
        return Caller(key_id, admin=bool(getattr(handler, "xllm_admin", False)),
                      keyless=bool(getattr(handler, "xllm_keyless", False)))
    provider = getattr(handler, "identity_provider", None)
    if provider is not None and type(provider).__module__.startswith("jupyter_server."):
        # Jupyter's own providers make up a random "Anonymous" user per token-authenticated
        # request: everyone holding the server's token is its one owner
        return Caller(jupyter_owner(), admin=True)  # the server's owner
    user = getattr(handler, "current_user", None)  # e.g. JupyterHub's provider: the real hub user
    name = getattr(user, "username", None) or getattr(user, "name", None)
    name = name if isinstance(name, str) and name else None
    return Caller(name, admin=name is not None and name == jupyter_owner())


def jupyter_owner() -> str:
    """Who owns this Jupyter server: the hub user when spawned by a hub, else the OS user."""
    name = os.environ.get("JUPYTERHUB_USER")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "jupyter"


def _overrides(entries: Iterable[str], key: str) -> dict[str, int]:
    """``("alice=8", ...)`` as ``{"alice": 8}``; a malformed entry names its config key."""
    out: dict[str, int] = {}
    for entry in entries:
        name, sep, value = entry.rpartition("=")
        try:
            if not sep or not name.strip() or int(value) < 0:
                raise ValueError(entry)
            out[name.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"Invalid entry {entry!r} in config key 'quotas.{key}': expected name=N (N >= 0)") from None
    return out


@dataclass
class _UserUsage:
    """One user's running totals."""

    requests: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    day: str = ""
    tokens_today: int = 0
    reserved: int = 0  # tokens held by generations running now (prompt + n x max_tokens each): not saved
    groups: tuple[str, ...] = ()  # as of the last request (group quotas apply through them)
    name: str = ""  # the user's name where the key is more (per-user quota overrides name it)
    keyless: bool = False  # the keyless server's anonymous caller (Caller.keyless): not saved
    rejected: Counter[str] = field(default_factory=Counter)


def _load_records(saved: dict[str, dict[str, Any]], today: str) -> dict[str, _UserUsage]:
    """``UsageTracker.records`` read back; fields that do not fit are dropped, old days pruned."""
    users: dict[str, _UserUsage] = {}
    for name, rec in saved.items():
        entry = _UserUsage()
        for key in ("requests", "prompt_tokens", "completion_tokens", "tokens_today"):
            value = rec.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(entry, key, value)
        day = rec.get("day")
        entry.day = day if isinstance(day, str) else ""
        if entry.day != today:
            entry.day, entry.tokens_today = "", 0
        groups = rec.get("groups")
        if isinstance(groups, list):
            entry.groups = tuple(g for g in groups if isinstance(g, str))
        if isinstance(rec.get("name"), str):
            entry.name = rec["name"]
        rejected = rec.get("rejected")
        if isinstance(rejected, dict):
            entry.rejected = Counter({k: v for k, v in rejected.items() if isinstance(k, str) and isinstance(v, int)})
        users[name] = entry
    return users


def _utc_day(now: float) -> str:
    return dt.datetime.fromtimestamp(now, dt.timezone.utc).date().isoformat()


def _seconds_to_midnight(now: float) -> int:
    day = dt.datetime.fromtimestamp(now, dt.timezone.utc).date() + dt.timedelta(days=1)
    midnight = dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp()
    return max(1, int(midnight - now) + 1)


class UsageTracker(LiveUsageMixin):
    """Quotas and usage per user for one server; thread-safe (metrics scrapes read it too)."""

    def __init__(self, config: QuotaConfig | None = None, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time, path: Path | None = None):
        self.config = c = config or QuotaConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, _UserUsage] = {}
        #: saves the counts to ``path`` off the IOLoop (None: they last as long as the process)
        self._saver: UsageSaver | None = None
        if path is not None:
            stamp = file_stamp(path)  # (before reading: a save by another server after it is adopted later)
            self._users = _load_records(read_usage(path), _utc_day(clock()))
            self._saver = UsageSaver(path, self.records, self._adopt_saved, stamp)
        self._labels: set[str] = set()
        #: (user, request id) -> tokens its running generations hold (a legacy completion has one per prompt)
        self._holds: Counter[tuple[str, str]] = Counter()
        self._user_conc = _overrides(c.user_max_concurrent, "user_max_concurrent")
        self._user_tokens = _overrides(c.user_tokens_per_day, "user_tokens_per_day")
        self._group_conc = _overrides(c.group_max_concurrent, "group_max_concurrent")
        self._group_tokens = _overrides(c.group_tokens_per_day, "group_tokens_per_day")
        r = registry if registry is not None else CollectorRegistry()
        self.m_requests = PromCounter("xllm_user_requests", "Generation requests admitted, by user.", ("user",), registry=r)
        self.m_tokens = PromCounter("xllm_user_tokens", "Tokens used, by user and kind (prompt, completion).", ("user", "kind"), registry=r)
        self.m_rejected = PromCounter("xllm_user_rejected", "Requests refused over a user quota, by user and reason.", ("user", "reason"), registry=r)
        self.m_in_flight = Gauge("xllm_user_requests_in_flight", "Generation requests in flight, by user.", ("user",), registry=r)
        #: each user's sequences in the engine now (``Engine.user_counts``; None: not known)
        self.queues: Callable[[], dict[str, UserSequences]] | None = None
        r.register(QueueCollector(self))

    # ----------------------------------------------------------------- limits
    def limits(self, caller: Caller) -> tuple[int, int]:
        """``(max_concurrent, tokens_per_day)`` for ``caller``; 0 = unlimited."""
        return (
            self._limit(caller, self._user_conc, self._group_conc, self.config.max_concurrent),
            self._limit(caller, self._user_tokens, self._group_tokens, self.config.tokens_per_day),
        )

    @staticmethod
    def _limit(caller: Caller, users: dict[str, int], groups: dict[str, int], default: int) -> int:
        who = caller.name or caller.user  # overrides name users, not their accounts
        if who is not None and who in users:
            return users[who]
        found = [groups[g] for g in caller.groups if g in groups]
        if not found:
            return default
        return 0 if 0 in found else max(found)  # the most generous group wins; 0 = unlimited

    def _day_quota(self, user: str, groups: tuple[str, ...]) -> int:
        """The daily token quota of ``user`` as a member of ``groups`` (0 = unlimited)."""
        entry = self._users.get(user)
        return self.limits(Caller(user or None, groups, name=entry.name or None if entry else None))[1]

    def _label(self, user: str) -> str:
        """``user`` ("" for none) as a metrics label (``user_label``), or ``other`` once the label budget is spent
        (lock held).

        A hub account's label is its user's name: dashboards filter on the name, and a name's accounts (one at a
        time: the older were deleted) add up under it rather than each spending a label.
        """
        entry = self._users.get(user)
        if entry is not None and entry.keyless:
            label = ANONYMOUS
        else:
            label = user_label(entry.name if entry is not None and entry.name else user)
        if label in self._labels:
            return label
        if len(self._labels) < self.config.metrics_max_users:
            self._labels.add(label)
            return label
        return OTHER

    def _entry(self, user: str) -> _UserUsage:
        entry = self._users.get(user)
        if entry is None:
            entry = self._users[user] = _UserUsage()
        day = _utc_day(self._clock())
        if entry.day != day:
            entry.day, entry.tokens_today = day, 0
        return entry

    # --------------------------------------------------------------- admission
    def admit(self, caller: Caller) -> str:
        """Count one request of ``caller`` in, or raise RateLimited (429); pair with ``release``."""
        user = caller.user or ""
        max_conc, per_day = self.limits(caller)
        with self._lock:
            if caller.name and user not in self._users and caller.name in self._users:
                # counts saved before accounts were told apart, under the bare name: the first account of that
                # name to call takes them over (as the name did before), so an upgrade resets no one's quota
                self._users[user] = self._users.pop(caller.name)
            entry = self._entry(user)
            entry.groups, entry.name, entry.keyless = caller.groups, caller.name or "", caller.keyless
            label = self._label(user)
            if max_conc and entry.in_flight >= max_conc:
                self._reject(entry, label, "concurrency")
                raise RateLimited(
                    f"Too many concurrent requests for this user (limit {max_conc}); retry when one finishes.",
                    retry_after=1,
                )
            if per_day and entry.tokens_today >= per_day:
                self._reject(entry, label, "tokens_per_day")
                raise RateLimited(
                    f"Daily token quota reached for this user ({per_day} tokens per day, reset at 00:00 UTC).",
                    retry_after=_seconds_to_midnight(self._clock()),
                )
            entry.requests += 1
            entry.in_flight += 1
        self._changed()
        self.m_requests.labels(label).inc()
        self.m_in_flight.labels(label).inc()
        return user

    def release(self, user: str) -> None:
        """The request counted in by ``admit`` has finished."""
        with self._lock:
            entry = self._entry(user)
            entry.in_flight = max(0, entry.in_flight - 1)
            label = self._label(user)
        self.m_in_flight.labels(label).dec()

    def _reject(self, entry: _UserUsage, label: str, reason: str) -> None:
        entry.rejected[reason] += 1
        self._changed()
        self.m_rejected.labels(label, reason).inc()

    def _changed(self) -> None:
        if self._saver is not None:
            self._saver.mark()  # only a flag: the saver thread writes the file

    # ---------------------------------------------------------------- charging
    def charge_generation(self, request: Any, usage: Any) -> None:
        """Charge a finished generation (its request and final Usage) to the request's user."""
        self.charge(request.user, usage.prompt_tokens, usage.completion_tokens)

    def charge(self, user: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge one finished generation's tokens to ``user``."""
        user = user or ""
        with self._lock:
            entry = self._entry(user)
            entry.prompt_tokens += prompt_tokens
            entry.completion_tokens += completion_tokens
            entry.tokens_today += prompt_tokens + completion_tokens
            label = self._label(user)
        self._changed()
        self.m_tokens.labels(label, "prompt").inc(prompt_tokens)
        self.m_tokens.labels(label, "completion").inc(completion_tokens)

    def records(self) -> Records:
        """Every user's saved counts (not in-flight requests), as ``usage_file.py`` stores them."""
        with self._lock:
            return self._records(_utc_day(self._clock()))

    def _records(self, today: str) -> Records:
        out = {}
        for name, e in self._users.items():
            rec = asdict(e)
            del rec["in_flight"], rec["reserved"], rec["keyless"]
            if e.day != today:  # an old day's count is of no use after midnight: prune it
                rec["day"], rec["tokens_today"] = "", 0
            rec["groups"], rec["rejected"] = list(e.groups), dict(e.rejected)
            out[name] = rec
        return out

    def _adopt_saved(self, disk: Records, base: Records) -> None:
        """Count what ``disk`` has plus what this server added since ``base``: other servers' counts join ours."""
        with self._lock:
            today = _utc_day(self._clock())
            merged = _load_records(merge_usage(disk, base, self._records(today), today), today)
            for name in self._users.keys() - merged.keys():  # moved to another key by another server
                entry = self._users[name]
                if entry.in_flight or entry.reserved:  # (its counts went with it: its requests under way count from 0)
                    entry.requests = entry.prompt_tokens = entry.completion_tokens = entry.tokens_today = 0
                    entry.rejected = Counter()
                else:
                    del self._users[name]
            for name, saved in merged.items():
                entry = self._users.setdefault(name, saved)
                if entry is not saved:  # (in place: in-flight requests and holds stay)
                    entry.requests, entry.prompt_tokens, entry.completion_tokens = saved.requests, saved.prompt_tokens, saved.completion_tokens
                    entry.day, entry.tokens_today, entry.rejected = saved.day, saved.tokens_today, saved.rejected
                    entry.groups, entry.name = saved.groups, saved.name

    def close(self) -> None:
        """Save the counts one last time and stop saving (blocking: call it off the IOLoop)."""
        if self._saver is not None:
            self._saver.close()

    def in_flight(self, user: str | None) -> int:
        """Requests of ``user`` admitted and not yet finished."""
        with self._lock:
            entry = self._users.get(user or "")
            return entry.in_flight if entry else 0

    def snapshot(self, user: str | None = None) -> list[dict[str, Any]]:
        """Per-user totals (one user's, if named), for ``/admin/usage`` and the hub page.

        ``running`` and ``queued`` are the user's sequences in the engine now (n per request): what of
        ``in_flight`` has a batch slot and what waits for one.
        """
        counts = self.queue_counts()
        with self._lock:
            today = _utc_day(self._clock())
            rows = []
            for name, e in sorted(self._users.items()):
                if user is not None and user != name and user != (e.name or name):  # ?user=NAME: its every account
                    continue
                rows.append({
                    "user": e.name or name or None,  # the name, as before accounts were told apart
                    "account": name or None,  # what the counts are kept under (hub: name/created)
                    "groups": list(e.groups),
                    "requests": e.requests,
                    "in_flight": e.in_flight,
                    "running": counts.get(name, UserSequences()).running,
                    "queued": counts.get(name, UserSequences()).queued,
                    "prompt_tokens": e.prompt_tokens,
                    "completion_tokens": e.completion_tokens,
                    "total_tokens": e.prompt_tokens + e.completion_tokens,
                    "tokens_today": e.tokens_today if e.day == today else 0,
                    "tokens_reserved": e.reserved,
                    "rejected": dict(e.rejected),
                })
            return rows


class AdminUsageMixin(RequestMixin):
    """``GET /admin/usage[?user=NAME]``: requests, tokens and quota refusals per user."""

    async def handle_get(self) -> None:
        """Usage of every user seen since the server started (or of one)."""
        tracker: UsageTracker = self.xllm.usage
        user = self.get_query_argument("user", None)  # type: ignore[attr-defined]
        rows = tracker.snapshot(user)
        for row in rows:
            conc, per_day = tracker.limits(Caller(row["account"], tuple(row["groups"]), name=row["user"]))
            row["limits"] = {"max_concurrent": conc, "tokens_per_day": per_day}
        day = _utc_day(time.time())
        self.write_json({"object": "list", "day": day, "data": rows})


__all__ = ["METERED_ROUTES", "AdminUsageMixin", "Caller", "UsageTracker", "caller_of", "user_label"]
