"""Per-user prefix-cache namespaces for the exllama generators.

exllamav3 and exllamav2 deduplicate prompt pages across *all* jobs: a page is found by a
chained hash of its tokens, and a prompt whose first page is incomplete copies the
longest matching run of tokens from any page with the same predecessor. On a shared
server that lets one user learn another's prompts and outputs (``cached_tokens`` and
time-to-first-token rise when a guess is right). The libraries have no namespace
(vLLM's ``cache_salt``), so we add one around their jobs:

* a job may reuse a cached page (by hash) only as far as every page of its prefix was
  *produced by its own namespace* before: then the content is something this user
  already sent or received, and reusing another user's identical page reveals nothing;
* partial-page matching only sees pages whose current tokens its namespace wrote or
  reused (``PrefixIsolation.visible``), tracked per physical page as jobs claim and
  release them (pages a job never wrote revert to their earlier owners).

A page's content hash is recorded for the namespace as soon as the library gives it one
(prompt pages after prefill, others when decoding fills them), so a user's second job that
starts while her first still runs reuses the pages the first has made; a job's hashes are
its own tokens, so recording them early lets no other namespace reuse anything. A page we
complete is never switched onto an identical page another job holds but has not written yet
(that job's namespace was handed it fresh under the hash): ours keeps a unique hash instead.

``PrefixIsolation`` is the policy (pure Python); the mixins (v3 below, v2 in prefix_isolation_v2.py) are combined with
the library's job class at ``make_job`` time and only read or set attributes of it, except
that exllamav2 needs the prompt pages it prefilled instead of looking up re-hashed through
its page methods (``IsolatedJobV2.xllm_publish``; exllamav3's prefill does that itself).
Jobs of one namespace ("" when ``quotas.share_prefix_cache`` is on) share freely.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: page hashes remembered per namespace; older ones are forgotten (that prefix then just
#: is not reused until the namespace produces it again)
DEFAULT_MAX_HASHES = 1 << 16


class PrefixIsolation:
    """Which cached pages each namespace may reuse (engine thread only)."""

    def __init__(self, max_hashes_per_namespace: int = DEFAULT_MAX_HASHES):
        self.max_hashes = max(1, int(max_hashes_per_namespace))
        self._produced: dict[str, OrderedDict[bytes, None]] = {}
        self._owners: dict[int, frozenset[str]] = {}  # id(page) -> namespaces its current tokens belong to

    # -- hash-level reuse ---------------------------------------------------------------
    def reusable_pages(self, namespace: str, page_hashes: Sequence[bytes]) -> int:
        """How many leading pages of a prompt ``namespace`` may take from the cache."""
        produced = self._produced.get(namespace)
        if not produced:
            return 0
        count = 0
        for page_hash in page_hashes:
            if page_hash not in produced:
                break
            count += 1
        return count

    def record(self, namespace: str, page_hashes: Iterable[bytes]) -> None:
        """Remember that ``namespace`` produced pages with these content hashes."""
        if isinstance(page_hashes, list) and not page_hashes:
            return  # nothing new: the common case, once per job and step
        produced = self._produced.setdefault(namespace, OrderedDict())
        for page_hash in page_hashes:
            produced[page_hash] = None
            produced.move_to_end(page_hash)
        while len(produced) > self.max_hashes:
            produced.popitem(last=False)

    # -- page-level ownership (partial-page matching) -------------------------------------
    def owners(self, page: Any) -> frozenset[str]:
        """Namespaces whose tokens ``page`` holds now."""
        return self._owners.get(id(page), frozenset())

    def set_owners(self, page: Any, owners: frozenset[str]) -> None:
        """Record who ``page``'s tokens belong to (after a claim, a write or a revert)."""
        self._owners[id(page)] = owners

    def visible(self, namespace: str, page: Any) -> bool:
        """True when ``namespace`` may copy tokens from ``page``."""
        return namespace in self._owners.get(id(page), ())

    def claim(self, namespace: str, pages: Iterable[Any], reused: Callable[[Any], bool]) -> dict[int, frozenset[str]]:
        """A job of ``namespace`` took ``pages``; returns their earlier owners (for reverts).

        A page reused by hash holds the same tokens for everyone who produced them, so the
        namespace joins its owners; any other page is about to be overwritten by this job.
        """
        before: dict[int, frozenset[str]] = {}
        for page in pages:
            old = self.owners(page)
            before[id(page)] = old
            self.set_owners(page, old | {namespace} if reused(page) else frozenset({namespace}))
        return before

    def release(self, namespace: str, pages: Iterable[Any], before: dict[int, frozenset[str]], *,
                full: Callable[[Any], bool], untouched: Callable[[Any], bool], content_hash: Callable[[Any], bytes]) -> None:
        """A job of ``namespace`` frees ``pages``: record what it produced and who owns what now.

        A page the job never wrote goes back to its earlier tokens (the library reverts it),
        so it goes back to its earlier owners too.
        """
        produced = []
        for page in pages:
            if untouched(page):
                self.set_owners(page, before.get(id(page), frozenset()))
                continue
            if full(page):
                produced.append(content_hash(page))
                self.set_owners(page, self.owners(page) | {namespace})
            else:
                self.set_owners(page, frozenset({namespace}))
        self.record(namespace, produced)


class VisiblePagesList(Sequence):
    """The pages of ``pages`` that ``namespace`` may match, filtered when first read.

    A prefill call that does no partial-page matching (its chunk budget spent, or no page
    boundary) never reads the list, so it never pays the O(pages) filter.
    """

    def __init__(self, pages: Sequence[Any], isolation: PrefixIsolation, namespace: str):
        self._source: tuple[Sequence[Any], PrefixIsolation, str] | None = (pages, isolation, namespace)
        self._pages: list[Any] = []

    def _filtered(self) -> list[Any]:
        if self._source is not None:
            pages, isolation, namespace = self._source
            self._pages = [page for page in pages if isolation.visible(namespace, page)]
            self._source = None
        return self._pages

    def __getitem__(self, index: Any) -> Any:
        return self._filtered()[index]

    def __len__(self) -> int:
        return len(self._filtered())

    def __iter__(self) -> Any:
        return iter(self._filtered())


class VisiblePages:
    """A page table seen by one namespace: ``all_pages`` holds only the pages it may match."""

    def __init__(self, table: Any, isolation: PrefixIsolation, namespace: str):
        self._table = table
        self.all_pages = VisiblePagesList(table.all_pages, isolation, namespace)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)


class IsolatedJobBase:
    """Shared bookkeeping of the job mixins: namespace, policy, claimed pages."""

    xllm_namespace: str = ""
    xllm_isolation: PrefixIsolation | None = None
    xllm_page_size: int = 256

    def xllm_bind(self, isolation: PrefixIsolation, namespace: str, page_size: int) -> None:
        """Attach the policy and this job's namespace (before the job is enqueued)."""
        self.xllm_isolation = isolation
        self.xllm_namespace = namespace
        self.xllm_page_size = int(page_size)
        self.xllm_before: dict[int, frozenset[str]] = {}
        self.xllm_reused: set[int] = set()

    def xllm_allowed(self, page_hashes: Sequence[bytes]) -> int:
        """Leading prompt pages this job may take from the cache."""
        assert self.xllm_isolation is not None
        return self.xllm_isolation.reusable_pages(self.xllm_namespace, page_hashes)

    def xllm_claim(self) -> None:
        """Note the pages just allocated: cached ones join our namespace, fresh ones are ours."""
        assert self.xllm_isolation is not None
        size = self.xllm_page_size
        pages = [page for seq in self.sequences for page in (seq.allocated_pages or ())]  # type: ignore[attr-defined]
        self.xllm_reused = {id(page) for page in pages if page.kv_position == size}
        self.xllm_before.update(self.xllm_isolation.claim(self.xllm_namespace, pages, lambda p: id(p) in self.xllm_reused))

    def xllm_record(self, pages: Iterable[Any]) -> None:
        """Remember the content hashes of full pages this job just finished (reusable by our namespace now)."""
        assert self.xllm_isolation is not None
        size = self.xllm_page_size
        self.xllm_isolation.record(self.xllm_namespace, [p.phash for p in pages if p.kv_position == size])

    def xllm_release(self) -> None:
        """Before the library frees our pages: record what we produced, restore reverted owners."""
        assert self.xllm_isolation is not None
        size = self.xllm_page_size
        pages = [page for seq in self.sequences for page in (seq.allocated_pages or ())]  # type: ignore[attr-defined]
        self.xllm_isolation.release(
            self.xllm_namespace, pages, self.xllm_before,
            full=lambda p: p.kv_position == size,
            untouched=lambda p: bool(getattr(p, "can_revert", False)),
            content_hash=lambda p: p.phash,
        )
        self.xllm_before = {}


class IsolatedJobV3(IsolatedJobBase):
    """Mixed into ``exllamav3.Job``: namespace-limited page reuse (``Sequence.max_cached_pages``)."""

    def prepare_for_queue(self, *args: Any, **kwargs: Any) -> Any:
        """Hash the prompt (library), then cap cache lookups at the pages our namespace produced."""
        out = super().prepare_for_queue(*args, **kwargs)  # type: ignore[misc]
        lookups: set[bytes] = set()
        for seq in self.sequences:  # type: ignore[attr-defined]
            allowed = self.xllm_allowed(seq.page_hashes)
            if seq.max_cached_pages is not None:
                allowed = min(allowed, seq.max_cached_pages)
            # the library counts pages past max_cached_pages as new pages (its own MTP path does this)
            seq.max_cached_pages = allowed
            lookups.update(seq.page_hashes[:allowed])
        self.all_unique_hashes = list(lookups)
        return out

    def allocate_pages(self, *args: Any, **kwargs: Any) -> Any:
        """Allocate (library), then record who owns the pages."""
        out = super().allocate_pages(*args, **kwargs)  # type: ignore[misc]
        self.xllm_claim()
        return out

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        """Prefill with partial-page matching restricted to our namespace's pages."""
        if self.is_prefill_done():  # type: ignore[attr-defined]
            # the library calls this for every job at every step: a done job matches nothing (filtering
            # the page table for it was O(jobs x pages) per step before the filter became lazy)
            return super().prefill(*args, **kwargs)  # type: ignore[misc]
        table = self.pagetable  # type: ignore[has-type]
        assert self.xllm_isolation is not None
        self.pagetable = VisiblePages(table, self.xllm_isolation, self.xllm_namespace)
        try:
            return super().prefill(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.pagetable = table

    def hash_completed_page(self, seq: Any, page_idx: int) -> Any:
        """Hash a full page (library: prefill's uncached prompt pages, decoding, released holds); record it.

        Not when another job holds a page under the same content hash that it has not written yet:
        the library would switch us onto that page (and fails its ``kv_position`` assertion).
        That happens when a namespace that made this content before was handed a fresh page
        under its hash (the old one was evicted) while we, not allowed to look the hash up, were
        making the same content on a unique page. We keep our page under its unique hash
        (nobody finds it by hash; the other job's page gets the content) and link the next one.
        """
        size = self.xllm_page_size
        page = seq.allocated_pages[page_idx]
        prev_hash = seq.allocated_pages[page_idx - 1].phash if page_idx > 0 else None
        content = _v3_content_hash(seq.sequence_ids.torch_slice(page_idx * size, (page_idx + 1) * size), prev_hash)
        holder = self.pagetable.referenced_pages.get(content)  # type: ignore[has-type]
        if holder is not None and holder is not page and holder.kv_position != size:
            if page_idx + 1 < len(seq.allocated_pages):
                following = seq.allocated_pages[page_idx + 1]
                following.prev_hash = page.phash
                following.can_revert = False
            return None
        out = super().hash_completed_page(seq, page_idx)  # type: ignore[misc]
        # the library may have switched the sequence to an identical page: read the hash from there
        self.xllm_record([seq.allocated_pages[page_idx]])
        return out

    def deallocate_pages(self, *args: Any, **kwargs: Any) -> Any:
        """Record what we produced, then free (library)."""
        self.xllm_release()
        return super().deallocate_pages(*args, **kwargs)  # type: ignore[misc]


def _v3_content_hash(page_ids: Any, prev_hash: bytes | None) -> bytes:
    """exllamav3's content hash of one page of tokens chained on the previous page's hash."""
    from exllamav3.generator.pagetable import tensor_hash_checksum  # loaded with the generator by now

    return tensor_hash_checksum(page_ids, prev_hash)


_job_classes: dict[tuple[type, type], type] = {}


def isolated_job_class(mixin: type, library_job: type, *more: type) -> type:
    """The library's job class with ``mixin``'s namespace hooks and any ``more`` mixins (made once per set)."""
    key = (mixin, library_job, *more)
    cls = _job_classes.get(key)
    if cls is None:
        cls = _job_classes[key] = type(f"Isolated{library_job.__name__}", (mixin, *more, library_job), {})
    return cls
