"""exllamav2's job mixin for per-user prefix-cache namespaces (the policy and the v3 mixin: prefix_isolation.py).

exllamav2's prefill does not hand back the prompt pages it filled, so ``IsolatedJobV2.xllm_publish`` hashes
and publishes them itself; pages completed while decoding are recorded as ``receive_sample`` fills them.
"""

from __future__ import annotations

from typing import Any

from .prefix_isolation import IsolatedJobBase, VisiblePagesList


class IsolatedJobV2(IsolatedJobBase):
    """Mixed into ``exllamav2``'s ``ExLlamaV2DynamicJob`` (paged and unpaged generators)."""

    xllm_published = False  # xllm_publish found every prompt page published: a prefilled job's prefill is the library's

    def prepare_for_queue(self, *args: Any, **kwargs: Any) -> Any:
        """Hash the prompt (library), then drop lookups past the pages our namespace produced."""
        out = super().prepare_for_queue(*args, **kwargs)  # type: ignore[misc]
        lookups: set[bytes] = set()
        for seq in self.sequences:  # type: ignore[attr-defined]
            hashes = list(seq.page_hashes or ())
            allowed = self.xllm_allowed(hashes)
            # exllamav2 has no max_cached_pages: pages not looked up are allocated as new ones
            # (under random hashes; xllm_publish gives them their content hash once prefilled)
            seq.xllm_prompt_hashes = hashes
            seq.page_hashes = hashes[:allowed]
            seq.new_unique_pages += len(hashes) - allowed
            lookups.update(seq.page_hashes)
        self.all_unique_hashes = list(lookups)
        return out

    def allocate_pages(self, *args: Any, **kwargs: Any) -> Any:
        """Allocate (library), then record who owns the pages."""
        out = super().allocate_pages(*args, **kwargs)  # type: ignore[misc]
        if self.generator.paged:  # type: ignore[attr-defined]  (unpaged: see prefill)
            self.xllm_claim()
        return out

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        """Prefill with prompt matching restricted to our namespace's tokens."""
        generator = self.generator  # type: ignore[attr-defined]
        assert self.xllm_isolation is not None
        if not generator.paged:
            # unpaged: the one cache page still holds the previous job's tokens, which the
            # next prompt is matched against; forget them when they belong to someone else
            page = generator.all_pages[0]
            if not self.xllm_isolation.visible(self.xllm_namespace, page):
                page.kv_position_revert = 0
            return super().prefill(*args, **kwargs)  # type: ignore[misc]
        # called for every job at every step; a job past its prefill never reads the (lazy) list, and a
        # prompt page it left unpublished behind another job's unwritten page is retried below
        if self.xllm_published and all(seq.prefill_complete for seq in self.sequences):  # type: ignore[attr-defined]
            # nothing left to prefill or publish: the library returns at once and reads no page
            return super().prefill(*args, **kwargs)  # type: ignore[misc]
        pages = generator.all_pages
        generator.all_pages = VisiblePagesList(pages, self.xllm_isolation, self.xllm_namespace)
        try:
            out = super().prefill(*args, **kwargs)  # type: ignore[misc]
        finally:
            generator.all_pages = pages
        self.xllm_publish()
        return out

    def xllm_publish(self) -> None:
        """Give prompt pages we prefilled instead of looking up their content hash.

        exllamav2 hashes prompt pages only when it looks them up (``page_hashes``) and pages
        completed while decoding; a prompt page it allocated as a new page keeps a random hash
        for good, so neither we nor anyone could ever reuse it (nor the pages chained after it).
        Done in page order, as the library does for a page completed in decoding: an identical
        page held by a running job is shared, an identical unreferenced one gives up the hash.
        """
        generator = self.generator  # type: ignore[attr-defined]
        size = self.xllm_page_size
        published: list[bytes] = []
        done = True  # every prompt page of every sequence published (or looked up): later calls have nothing to do
        for seq in self.sequences:  # type: ignore[attr-defined]
            hashes = getattr(seq, "xllm_prompt_hashes", ())
            allocated = seq.allocated_pages or ()
            if len(allocated) < len(hashes):
                done = False
            for index in range(len(seq.page_hashes), min(len(hashes), len(allocated))):
                page = allocated[index]
                content = hashes[index]
                if page.kv_position != size:
                    done = False
                    break  # not prefilled yet: a later chunk publishes it
                if page.phash == content:
                    continue
                held = generator.referenced_pages.get(content)
                if held is not None and held.kv_position != size:
                    # another job's fresh page under this hash, not written yet (see IsolatedJobV3.
                    # hash_completed_page): never share it; keep ours unpublished, a later chunk retries
                    done = False
                    break
                if held is not None:
                    serial = page.access_serial
                    page.sub_ref()
                    page = held
                    seq.allocated_pages[index] = page
                    seq.block_index_tensor = None
                    page.add_ref(serial)
                else:
                    if content in generator.unreferenced_pages:
                        generator.unreferenced_pages[content].clear()
                    page.update_hash(content)
                published.append(content)
                if index + 1 < len(seq.allocated_pages):
                    seq.allocated_pages[index + 1].prev_hash = content
        assert self.xllm_isolation is not None
        self.xllm_isolation.record(self.xllm_namespace, published)
        self.xllm_published = done

    def receive_sample(self, *args: Any, **kwargs: Any) -> Any:
        """Take a sampled token (library, which hashes a page the token completes); record that page."""
        size = self.xllm_page_size
        sequences = self.sequences  # type: ignore[attr-defined]
        if all((seq.kv_position + 1) % size for seq in sequences):
            # the library moves each sequence one token on: this token completes no page, so there is
            # nothing to hide or record (the common case: 255 tokens of every 256)
            return super().receive_sample(*args, **kwargs)  # type: ignore[misc]
        before = [seq.kv_position // size for seq in sequences]
        paged = self.generator.paged  # type: ignore[attr-defined]  (unpaged: one page, never hashed)
        hidden = self.xllm_hide_unwritten() if paged else {}
        try:
            out = super().receive_sample(*args, **kwargs)  # type: ignore[misc]
        finally:
            kept = self.xllm_unhide(hidden)
        if paged:
            # a page completed under a banned-string hold keeps a random hash, which no prompt can match
            self.xllm_record(seq.allocated_pages[index] for seq, index in zip(sequences, before)
                             if seq.kv_position // size > index and index < len(seq.allocated_pages or ())
                             and id(seq.allocated_pages[index]) not in kept)
        return out

    def xllm_hide_unwritten(self) -> dict[bytes, tuple[Any, Any, int]]:
        """Before a token that completes a page: take an unwritten page holding its hash out of the table.

        The library would switch us onto it (and fails its ``kv_position`` assertion), as in
        ``IsolatedJobV3.hash_completed_page``; hidden, it gives our page the hash instead, which
        ``xllm_unhide`` undoes. The page's tokens are all in ``sequence_ids`` before the new one.
        """
        generator = self.generator  # type: ignore[attr-defined]
        size = self.xllm_page_size
        hidden: dict[bytes, tuple[Any, Any, int]] = {}
        for seq in self.sequences:  # type: ignore[attr-defined]
            index = seq.kv_position // size
            allocated = seq.allocated_pages or ()
            if (seq.kv_position + 1) // size == index or index >= len(allocated):
                continue
            prev_hash = allocated[index - 1].phash if index > 0 else None
            content = _v2_content_hash(seq.sequence_ids.torch_slice(index * size, (index + 1) * size), prev_hash)
            holder = generator.referenced_pages.get(content)
            if holder is not None and holder is not allocated[index] and holder.kv_position != size:
                del generator.referenced_pages[content]
                hidden[content] = (holder, seq, index)
        return hidden

    def xllm_unhide(self, hidden: dict[bytes, tuple[Any, Any, int]]) -> set[int]:
        """Put hidden pages back; our page keeps a unique hash instead. Returns ids of the pages kept so."""
        generator = self.generator  # type: ignore[attr-defined]
        kept: set[int] = set()
        for content, (holder, seq, index) in hidden.items():
            page = seq.allocated_pages[index]
            if page.phash == content:
                page.update_hash(_v2_unique_hash())
                kept.add(id(page))
                if index + 1 < len(seq.allocated_pages):
                    seq.allocated_pages[index + 1].prev_hash = page.phash
            generator.referenced_pages[content] = holder
        return kept

    def deallocate_pages(self, *args: Any, **kwargs: Any) -> Any:
        """Record what we produced, then free (library); unpaged, the page is now ours."""
        generator = self.generator  # type: ignore[attr-defined]
        if generator.paged:
            self.xllm_release()
        else:
            assert self.xllm_isolation is not None
            self.xllm_isolation.set_owners(generator.all_pages[0], frozenset({self.xllm_namespace}))
        return super().deallocate_pages(*args, **kwargs)  # type: ignore[misc]


def _v2_content_hash(page_ids: Any, prev_hash: bytes | None) -> bytes:
    """exllamav2's content hash of one page of tokens chained on the previous page's hash."""
    from exllamav2.generator.dynamic import _tensor_hash_checksum  # loaded with the generator by now

    return _tensor_hash_checksum(page_ids, prev_hash)


def _v2_unique_hash() -> bytes:
    """A fresh exllamav2 placeholder hash (what it gives pages that hold no findable content)."""
    from exllamav2.generator.dynamic import _randomhash

    return _randomhash()
