"""Exact-request response cache for deterministic generations (temperature 0 or a fixed seed).

No HTTP here. A cache entry is keyed by endpoint, model, the loaded model's identity
(its store digest, else the object itself, so a reload never serves stale text) and the
canonical JSON of the request body minus the fields that cannot change the output
(``user``, the prompt-cache and safety hints, ``stream``, ``stream_options``). One entry holds each response form seen for
that key — the JSON body, the stream, the stream with a usage chunk — and a hit returns
exactly what the first request got, ``id`` and ``created`` included, so a cached body
and a replayed SSE stream are byte-identical to the originals.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, AsyncIterator, Awaitable, Callable

from cachetools import TTLCache

from ..core.config import CacheConfig
from ..core.errors import InvalidRequest
from .json_body import strict_json
from .offload import is_big, off_loop_if

Chunk = dict[str, Any]
Result = dict[str, Any] | AsyncIterator[Chunk]

#: request fields that change how a response is delivered, not what it says (the hints to api.openai.com's
#: prompt cache and abuse checks among them: a per-conversation ``prompt_cache_key`` would split this cache)
_DELIVERY_FIELDS = ("user", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options", "safety_identifier",
                    "stream", "stream_options")
#: bytes (serialized) all cached responses may hold together, and one response at most. A 130-byte
#: request (n=4, top_logprobs=20, 1,900 tokens) answers 13.7 MB: by count alone, 256 entries of 3
#: forms could pin gigabytes; a response past the entry limit is simply not cached
MAX_BYTES = 64 * 2**20
MAX_ENTRY_BYTES = 4 * 2**20


def _entry_bytes(entry: dict[str, Any]) -> int:
    """Serialized size of a cache entry (every form it holds)."""
    return sum(len(v) if isinstance(v, str) else sum(len(c) for c in v) for v in entry.values())


def is_deterministic(body: dict[str, Any]) -> bool:
    """True when the request asks for greedy decoding or pins the sampler's seed."""
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def _form(body: dict[str, Any]) -> str:
    """Which response shape the request wants: ``full``, ``stream``, ``stream+usage`` or ``stream+usage+continuous``
    (every chunk with its usage so far)."""
    if not body.get("stream"):
        return "full"
    opts = body.get("stream_options")
    if not (isinstance(opts, dict) and opts.get("include_usage")):
        return "stream"
    return "stream+usage+continuous" if opts.get("continuous_usage_stats") else "stream+usage"


class ResponseCache:
    """LRU + TTL cache of complete, successful responses (cachetools ``TTLCache``)."""

    def __init__(self, config: CacheConfig | None = None):
        self.config = config or CacheConfig()
        # sized in bytes; the entry count (max_entries) is kept in _put
        self._entries: TTLCache = TTLCache(maxsize=MAX_BYTES, ttl=self.config.ttl_seconds, getsizeof=_entry_bytes)
        self._lock = threading.Lock()  # TTLCache is not thread-safe; Jupyter may run several loops
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """True when the config turns the cache on."""
        return self.config.enabled

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def key(self, endpoint: str, body: dict[str, Any], model_identity: str, namespace: str = "") -> str:
        """The cache key: user namespace, endpoint, model identity and the canonical request JSON, hashed."""
        kept = {k: v for k, v in body.items() if k not in _DELIVERY_FIELDS}
        canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        raw = "\0".join((namespace, endpoint, str(body.get("model")), model_identity, canonical))
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def _get(self, key: str, form: str) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.get(form)

    def _put(self, key: str, form: str, value: Any) -> None:
        with self._lock:
            entry = dict(self._entries.get(key) or {})
            entry[form] = value
            if _entry_bytes(entry) > MAX_ENTRY_BYTES:
                return  # too large to keep: the next such request is generated afresh
            if key not in self._entries:
                self._entries.expire()
                while len(self._entries) >= self.config.max_entries:
                    self._entries.popitem()  # the least recently used
            self._entries[key] = entry  # re-setting also refreshes the LRU position and TTL; evicts past MAX_BYTES

    async def serve(
        self,
        endpoint: str,
        body: bytes,
        produce: Callable[[bytes], Awaitable[Result]],
        model_identity: Callable[[str], Awaitable[str]],
        namespace: str = "",
    ) -> Result:
        """``produce(body)``, answered from the cache when the request is deterministic.

        ``namespace`` (the caller's user) partitions the cache: a user is never served
        another user's cached response, which would reveal what they asked.

        ``model_identity(model)`` names the loaded model's weights; it may load the model.
        Anything unusual (not JSON, no model name, not deterministic) goes straight to
        ``produce``, which owns validation and its 4xx errors.
        """
        if not self.enabled:
            return await produce(body)
        big = is_big(body)  # then parsing and hashing it run off the IOLoop
        try:
            # the rules the request itself is read by: a body the request parser refuses is never a hit
            parsed = await off_loop_if(big, strict_json, body)
        except InvalidRequest:
            return await produce(body)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("model"), str) or not is_deterministic(parsed):
            return await produce(body)
        if parsed.get("store") is True:
            # a stored completion is a new object with its own id: a replay would hand out the first one's
            # id again (which its owner may have deleted or updated meanwhile)
            return await produce(body)
        key = await off_loop_if(big, self.key, endpoint, parsed, await model_identity(parsed["model"]), namespace)
        form = _form(parsed)
        cached = self._get(key, form)
        if cached is not None:
            self.hits += 1
            return json.loads(cached) if form == "full" else _replay(cached)
        self.misses += 1
        result = await produce(body)
        if isinstance(result, dict):
            # stored serialized: nobody can mutate a cached body through a reply
            self._put(key, form, json.dumps(result))
            return result
        return self._recording(result, key, form)

    async def _recording(self, stream: AsyncIterator[Chunk], key: str, form: str) -> AsyncIterator[Chunk]:
        """Pass chunks through; store them only when the stream ends normally."""
        chunks: list[str] = []
        aclose = getattr(stream, "aclose", None)
        try:
            async for chunk in stream:
                chunks.append(json.dumps(chunk))
                yield chunk
        finally:
            if aclose is not None:
                await aclose()
        # reached only when the producer finished: errors and early closes skip this
        self._put(key, form, tuple(chunks))


async def _replay(chunks: tuple[str, ...]) -> AsyncIterator[Chunk]:
    """The cached chunks, as fresh dicts, in their original order."""
    for chunk in chunks:
        yield json.loads(chunk)


__all__ = ["ResponseCache", "is_deterministic"]
