"""Per-namespace prefix reuse for the exllama generators (backends/prefix_isolation.py), on CPU.

The policy is pure Python and tested directly. The job mixins are exercised over a small
stand-in carrying the attribute names of exllamav3 1.6.5's ``Job``/``Sequence`` and
exllamav2 0.3.2's ``ExLlamaV2DynamicJob``: this checks our arithmetic (which pages may be
looked up, how many become new pages, what partial matching sees), not the libraries,
which tests/test_gpu_backends.py runs for real on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from xllm_jupyter.backends import prefix_isolation, prefix_isolation_v2
from xllm_jupyter.backends.prefix_isolation import (
    IsolatedJobV3,
    PrefixIsolation,
    VisiblePages,
    isolated_job_class,
)
from xllm_jupyter.backends.prefix_isolation_v2 import IsolatedJobV2

H = [bytes([i]) * 16 for i in range(8)]  # page hashes
PAGE = 256


def page(kv=0, can_revert=False, phash=b"r" * 16):
    return SimpleNamespace(kv_position=kv, can_revert=can_revert, phash=phash)


class Tokens:
    """``sequence_ids`` stand-in: a slice is its bounds, which ``content_hash`` below turns into ``H[page]``."""

    def torch_slice(self, a, b):
        return a, b


def content_hash(page_ids, prev_hash):
    """The libraries' chained page hash, as the stand-ins see it: page ``i`` has content hash ``H[i]``."""
    return H[page_ids[0] // PAGE]


@pytest.fixture(autouse=True)
def _library_hashes(monkeypatch):
    """The mixins call the libraries' hash functions, which are not installed here."""
    monkeypatch.setattr(prefix_isolation, "_v3_content_hash", content_hash)
    monkeypatch.setattr(prefix_isolation_v2, "_v2_content_hash", content_hash)
    counter = iter(range(1, 1 << 30))
    monkeypatch.setattr(prefix_isolation_v2, "_v2_unique_hash", lambda: next(counter).to_bytes(16, "big"))


def test_a_namespace_reuses_only_prefixes_it_produced():
    iso = PrefixIsolation()
    assert iso.reusable_pages("alice", H[:3]) == 0  # nothing produced yet
    iso.record("alice", H[:3])
    assert iso.reusable_pages("alice", H[:4]) == 3
    assert iso.reusable_pages("bob", H[:3]) == 0  # same pages, other user: no reuse
    assert iso.reusable_pages("alice", [H[0], H[5], H[2]]) == 1  # stops at the first page it did not produce
    iso.record("bob", H[:1])
    assert iso.reusable_pages("bob", H[:3]) == 1


def test_remembered_hashes_are_bounded_oldest_first():
    iso = PrefixIsolation(max_hashes_per_namespace=2)
    iso.record("a", H[:3])
    assert iso.reusable_pages("a", H[:1]) == 0 and iso.reusable_pages("a", H[1:3]) == 2
    iso.record("a", [H[1]])  # touched again: now the newest
    iso.record("a", [H[4]])
    assert iso.reusable_pages("a", [H[1]]) == 1 and iso.reusable_pages("a", [H[2]]) == 0


def test_page_owners_follow_claims_writes_and_reverts():
    iso = PrefixIsolation()
    p, q = page(), page()
    before = iso.claim("alice", [p, q], reused=lambda pg: False)
    assert iso.visible("alice", p) and not iso.visible("bob", p)
    p.kv_position, p.phash = PAGE, H[0]
    q.kv_position = 17  # a partial last page alice wrote
    iso.release("alice", [p, q], before, full=lambda pg: pg.kv_position == PAGE, untouched=lambda pg: pg.can_revert,
                content_hash=lambda pg: pg.phash)
    assert iso.reusable_pages("alice", [H[0]]) == 1 and iso.owners(q) == {"alice"}
    # bob produced the same first page himself and reuses it by hash: both own it now
    iso.record("bob", [H[0]])
    iso.claim("bob", [p], reused=lambda pg: True)
    assert iso.owners(p) == {"alice", "bob"}
    # carol is handed alice's partial page as a fresh one: it is hers while she writes it ...
    before = iso.claim("carol", [q], reused=lambda pg: False)
    assert iso.visible("carol", q) and not iso.visible("alice", q)
    # ... but she never wrote it, so the library reverts it to alice's tokens, and alice's it is again
    q.can_revert = True
    iso.release("carol", [q], before, full=lambda pg: False, untouched=lambda pg: pg.can_revert,
                content_hash=lambda pg: pg.phash)
    assert iso.owners(q) == {"alice"}


class WalkCountingPages(list):
    """A page table's page list that counts how often it is walked."""

    walks = 0

    def __iter__(self):
        self.walks += 1
        return super().__iter__()


def test_visible_pages_hides_other_namespaces_and_delegates_the_rest():
    iso = PrefixIsolation()
    mine, theirs, nobodys = page(), page(), page()
    iso.claim("alice", [mine], reused=lambda pg: False)
    iso.claim("bob", [theirs], reused=lambda pg: False)
    pages = WalkCountingPages([mine, theirs, nobodys])
    table = SimpleNamespace(all_pages=pages, referenced_pages={"x": 1})
    view = VisiblePages(table, iso, "alice")
    assert pages.walks == 0  # filtered when the library first reads it, if ever
    assert list(view.all_pages) == [mine] and view.all_pages[0] is mine and len(view.all_pages) == 1
    assert view.referenced_pages is table.referenced_pages
    assert pages.walks == 1


# ------------------------------------------------- the mixins over stand-in jobs
class V3Job:
    """The exllamav3 Job/Sequence attributes our mixin touches, with the library's page accounting."""

    def __init__(self, hashes, pages, table):
        self.sequences = [SimpleNamespace(page_hashes=None, max_cached_pages=None, allocated_pages=None,
                                          sequence_ids=Tokens())]
        self._hashes, self._pages = hashes, pages
        self.pagetable = table  # one page table, shared by every job of the generator
        self.seen = None
        self.prefill_done = False

    def is_prefill_done(self):
        return self.prefill_done

    def prepare_for_queue(self, generator, serial_number, rq=False):
        self.sequences[0].page_hashes = list(self._hashes)
        self.all_unique_hashes = list(self._hashes)

    def allocate_pages(self):
        self.sequences[0].allocated_pages = list(self._pages)

    def prefill(self, results):
        if not self.prefill_done:  # the library returns at once for a job past its prefill
            self.seen = list(self.pagetable.all_pages)

    def deallocate_pages(self):
        self.sequences[0].allocated_pages = []


def test_v3_mixin_caps_cache_lookups_and_partial_matches_per_namespace():
    iso = PrefixIsolation()
    iso.record("alice", H[:2])
    cls = isolated_job_class(IsolatedJobV3, V3Job)
    assert cls is isolated_job_class(IsolatedJobV3, V3Job) and issubclass(cls, V3Job)
    cached, fresh, bobs = page(kv=PAGE, phash=H[0]), page(), page()
    table = SimpleNamespace(all_pages=[cached, fresh, bobs])
    alice = cls(H[:3], [cached, fresh], table)
    alice.xllm_bind(iso, "alice", PAGE)
    alice.prepare_for_queue(None, 1)
    assert alice.sequences[0].max_cached_pages == 2 and sorted(alice.all_unique_hashes) == sorted(H[:2])
    bob = cls(H[:3], [bobs], table)
    bob.xllm_bind(iso, "bob", PAGE)
    bob.prepare_for_queue(None, 2)
    assert bob.sequences[0].max_cached_pages == 0 and bob.all_unique_hashes == []
    alice.allocate_pages()
    bob.allocate_pages()
    alice.prefill([])
    assert [id(p) for p in alice.seen] == [id(cached), id(fresh)]
    assert alice.pagetable is table  # the real table is back after prefill
    bob.prefill([])
    assert [id(p) for p in bob.seen] == [id(bobs)]  # alice's pages are not offered to bob
    fresh.kv_position, fresh.phash = PAGE, H[2]
    alice.deallocate_pages()
    assert iso.reusable_pages("alice", H[:3]) == 3 and iso.reusable_pages("bob", H[:3]) == 0


class V2Job:
    """The exllamav2 job attributes our mixin touches (paged or unpaged generator)."""

    def __init__(self, hashes, generator):
        self.sequences = [SimpleNamespace(page_hashes=None, new_unique_pages=1, allocated_pages=None,
                                          sequence_ids=Tokens())]
        self._hashes, self.generator = hashes, generator
        self.matched_against = None
        self.prefill_done = False

    def is_prefill_done(self):
        return self.prefill_done

    def prepare_for_queue(self, generator, serial_number):
        self.sequences[0].page_hashes = list(self._hashes)
        self.all_unique_hashes = list(self._hashes)

    def allocate_pages(self):
        self.sequences[0].allocated_pages = [self.generator.all_pages[0]]

    def prefill(self, results):
        if self.prefill_done:
            return
        first = self.generator.all_pages[0] if self.generator.all_pages else None
        self.matched_against = (len(self.generator.all_pages), getattr(first, "kv_position_revert", None))

    def deallocate_pages(self):
        self.sequences[0].allocated_pages = []


def test_v2_mixin_turns_unowned_lookups_into_new_pages_when_paged():
    iso = PrefixIsolation()
    iso.record("alice", H[:1])
    gen = SimpleNamespace(paged=True, all_pages=[page(kv=PAGE, phash=H[0])])
    cls = isolated_job_class(IsolatedJobV2, V2Job)
    bob = cls(H[:3], gen)
    bob.xllm_bind(iso, "bob", PAGE)
    bob.prepare_for_queue(gen, 1)
    assert bob.sequences[0].page_hashes == [] and bob.sequences[0].new_unique_pages == 4
    alice = cls(H[:3], gen)
    alice.xllm_bind(iso, "alice", PAGE)
    alice.prepare_for_queue(gen, 2)
    assert alice.sequences[0].page_hashes == H[:1] and alice.sequences[0].new_unique_pages == 3
    alice.allocate_pages()
    alice.prefill([])
    assert alice.matched_against[0] == 1 and len(gen.all_pages) == 1
    bob.prefill([])
    assert bob.matched_against[0] == 0  # alice's page is not offered to bob


def test_jobs_past_their_prefill_leave_the_page_table_alone():
    # both libraries call prefill for every running job at every step: filtering the table there
    # cost O(jobs x pages) per step (0.69 of the raw generator's throughput at 64 streams)
    iso = PrefixIsolation()
    v3_pages = WalkCountingPages([page(), page()])
    v3 = isolated_job_class(IsolatedJobV3, V3Job)(H[:1], list(v3_pages), SimpleNamespace(all_pages=v3_pages))
    v2_pages = WalkCountingPages([page(), page()])
    v2 = isolated_job_class(IsolatedJobV2, V2Job)(H[:1], SimpleNamespace(paged=True, all_pages=v2_pages,
                                                                           referenced_pages={}))
    v3_pages.walks = 0
    for job in (v3, v2):
        job.xllm_bind(iso, "alice", PAGE)
        job.prepare_for_queue(None, 1)
        job.allocate_pages()
        job.prefill([])
    assert (v3_pages.walks, v2_pages.walks) == (1, 1)  # while prefilling: filtered once each
    for job in (v3, v2):
        job.prefill_done = True
        for _ in range(10):
            job.prefill([])
    assert (v3_pages.walks, v2_pages.walks) == (1, 1)
    assert v3.pagetable.all_pages is v3_pages and v2.generator.all_pages is v2_pages


def test_v2_mixin_unpaged_forgets_another_namespaces_tokens():
    iso = PrefixIsolation()
    only = page(kv=40)
    only.kv_position_revert = 40
    gen = SimpleNamespace(paged=False, all_pages=[only])
    cls = isolated_job_class(IsolatedJobV2, V2Job)
    alice = cls([], gen)
    alice.xllm_bind(iso, "alice", 4096)
    alice.prepare_for_queue(gen, 1)
    alice.allocate_pages()
    alice.deallocate_pages()  # alice's tokens stay in the page
    again = cls([], gen)
    again.xllm_bind(iso, "alice", 4096)
    again.prefill([])
    assert again.matched_against == (1, 40)  # alice may match her own previous prompt
    again.deallocate_pages()
    bob = cls([], gen)
    bob.xllm_bind(iso, "bob", 4096)
    bob.prefill([])
    assert bob.matched_against == (1, 0)  # bob may not


# ------------------------------------------- exllamav2: publishing prefilled prompt pages
class V2Page:
    """exllamav2 0.3.2 ``CachePage``: the fields and page-table methods ``xllm_publish`` relies on."""

    def __init__(self, generator, phash, kv_position=0, ref_count=1, access_serial=0):
        self.generator, self.phash, self.prev_hash = generator, phash, None
        self.kv_position, self.ref_count, self.access_serial, self.can_revert = kv_position, ref_count, access_serial, False
        (generator.referenced_pages if ref_count else generator.unreferenced_pages)[phash] = self

    def add_ref(self, serial):
        if self.ref_count == 0:
            del self.generator.unreferenced_pages[self.phash]
            self.generator.referenced_pages[self.phash] = self
        self.ref_count += 1
        self.access_serial = max(serial, self.access_serial)
        self.can_revert = False

    def sub_ref(self):
        self.ref_count -= 1
        if self.ref_count == 0:
            del self.generator.referenced_pages[self.phash]
            self.generator.unreferenced_pages[self.phash] = self

    def clear(self):
        assert self.ref_count == 0
        del self.generator.unreferenced_pages[self.phash]
        self.phash, self.prev_hash, self.kv_position = b"c" * 16, None, 0
        self.generator.unreferenced_pages[self.phash] = self

    def update_hash(self, newhash):
        assert self.ref_count > 0 and self.kv_position == self.generator.page_size
        del self.generator.referenced_pages[self.phash]
        self.phash, self.can_revert = newhash, False
        assert newhash not in self.generator.referenced_pages
        self.generator.referenced_pages[newhash] = self


def v2_rig(namespace, produced, fill):
    """A paged generator and one prepared job whose 3-page prompt hashes are ``H[:3]``; pages are filled to ``fill``."""
    gen = SimpleNamespace(paged=True, page_size=PAGE, referenced_pages={}, unreferenced_pages={}, all_pages=[])
    iso = PrefixIsolation()
    iso.record(namespace, produced)
    job = isolated_job_class(IsolatedJobV2, V2Job)(H[:3], gen)
    job.xllm_bind(iso, namespace, PAGE)
    job.prepare_for_queue(gen, 1)
    seq = job.sequences[0]
    # like the library's allocate_pages: looked-up pages under their hash, the rest under random ones
    seq.allocated_pages = [V2Page(gen, h, kv_position=PAGE) for h in seq.page_hashes]
    seq.allocated_pages += [V2Page(gen, bytes([0x80 + i]) * 16, kv_position=kv)
                            for i, kv in enumerate(fill[len(seq.page_hashes):])]
    seq.block_index_tensor = "built"
    gen.all_pages = list(seq.allocated_pages)
    return gen, iso, job, seq


def test_v2_publish_gives_prefilled_prompt_pages_their_content_hash():
    gen, _, job, seq = v2_rig("alice", H[:1], fill=[PAGE, PAGE, 17])
    first, second, third = seq.allocated_pages
    job.xllm_publish()
    assert second.phash == H[1] and gen.referenced_pages[H[1]] is second  # found by hash from now on
    assert third.prev_hash == H[1]  # the page after it chains on the content hash
    assert first.phash == H[0] and seq.allocated_pages == [first, second, third]
    job.xllm_publish()  # a later prefill chunk: already published pages stay as they are
    assert gen.referenced_pages[H[1]] is second and second.ref_count == 1


def test_v2_publish_leaves_pages_that_are_not_fully_prefilled():
    gen, _, job, seq = v2_rig("bob", [], fill=[PAGE, 100, 0])
    first, second, third = seq.allocated_pages
    job.xllm_publish()
    assert first.phash == H[0] and second.prev_hash == H[0]
    assert second.phash == bytes([0x81]) * 16 and third.prev_hash is None  # a later chunk publishes page 2
    assert H[1] not in gen.referenced_pages and H[2] not in gen.referenced_pages


def test_v2_publish_shares_an_identical_page_a_running_job_holds():
    gen, _, job, seq = v2_rig("bob", [], fill=[PAGE, PAGE, 0])
    held = V2Page(gen, H[0], kv_position=PAGE, access_serial=3)  # another job's identical first page
    mine = seq.allocated_pages[0]
    mine.access_serial = 9
    job.xllm_publish()
    assert seq.allocated_pages[0] is held and held.ref_count == 2 and held.access_serial == 9
    assert mine.ref_count == 0 and gen.unreferenced_pages[mine.phash] is mine  # our copy is given back
    assert seq.block_index_tensor is None  # the library rebuilds the block index
    second = seq.allocated_pages[1]
    assert second.phash == H[1] and second.prev_hash == H[0]


def test_v2_publish_takes_the_hash_from_an_identical_unreferenced_page():
    gen, _, job, seq = v2_rig("bob", [], fill=[PAGE, 0, 0])
    stale = V2Page(gen, H[0], kv_position=PAGE, ref_count=0)  # an earlier job's page, no longer in use
    mine = seq.allocated_pages[0]
    job.xllm_publish()
    assert seq.allocated_pages[0] is mine and mine.phash == H[0] and gen.referenced_pages[H[0]] is mine
    assert stale.phash != H[0] and stale.kv_position == 0 and H[0] not in gen.unreferenced_pages


# ------------------------- page hashes are recorded as soon as they exist (a second job may reuse them)
def test_v2_publish_records_the_published_pages_for_our_namespace_only():
    gen, iso, job, seq = v2_rig("alice", H[:1], fill=[PAGE, PAGE, 17])
    assert iso.reusable_pages("alice", H[:3]) == 1
    job.xllm_publish()
    assert iso.reusable_pages("alice", H[:3]) == 2  # page 3 is not full yet: not recorded
    assert iso.reusable_pages("bob", H[:3]) == 0


class V2DecodeJob(V2Job):
    """``receive_sample`` as exllamav2 does it for paging: one token, and a page it completes gets its hash."""

    def receive_sample(self, logits, next_token, next_k_tokens, next_k_probs, next_prob, filter_eos, results):
        seq = self.sequences[0]
        index = seq.kv_position // PAGE
        seq.kv_position += 1
        seq.allocated_pages[index].kv_position += 1
        if seq.kv_position // PAGE > index:
            self.complete_page(seq, index, next_token)
        return False, False

    def complete_page(self, seq, index, next_token):
        """Give a page the new token completed its hash."""
        seq.allocated_pages[index].phash = next_token  # the stand-in's "content hash"


def test_v2_decode_records_a_page_the_moment_it_completes():
    iso = PrefixIsolation()
    gen = SimpleNamespace(paged=True, all_pages=[], referenced_pages={})
    job = isolated_job_class(IsolatedJobV2, V2DecodeJob)([], gen)
    job.xllm_bind(iso, "alice", PAGE)
    seq = job.sequences[0]
    seq.kv_position, seq.allocated_pages = PAGE - 2, [page(kv=PAGE - 2), page()]
    job.receive_sample(None, H[5], None, None, None, None, [])
    assert iso.reusable_pages("alice", [H[5]]) == 0  # one token short of a page
    job.receive_sample(None, H[5], None, None, None, None, [])
    assert iso.reusable_pages("alice", [H[5]]) == 1 and iso.reusable_pages("bob", [H[5]]) == 0
    unpaged = isolated_job_class(IsolatedJobV2, V2DecodeJob)([], SimpleNamespace(paged=False, all_pages=[]))
    unpaged.xllm_bind(iso, "carol", PAGE)
    unpaged.sequences[0].kv_position, unpaged.sequences[0].allocated_pages = PAGE - 1, [page(kv=PAGE - 1), page()]
    unpaged.receive_sample(None, H[6], None, None, None, None, [])
    assert iso.reusable_pages("carol", [H[6]]) == 0  # unpaged: the one page is never reused by hash


class V3HashingJob(V3Job):
    """exllamav3's ``Job.hash_completed_page``: the page (maybe swapped for an identical one) gets its hash."""

    def hash_completed_page(self, seq, page_idx):
        seq.allocated_pages[page_idx] = page(kv=PAGE, phash=H[page_idx])


def test_v3_records_each_page_the_library_hashes():
    iso = PrefixIsolation()
    table = SimpleNamespace(all_pages=[], referenced_pages={})
    job = isolated_job_class(IsolatedJobV3, V3HashingJob)(H[:2], [page(), page()], table)
    job.xllm_bind(iso, "alice", PAGE)
    job.allocate_pages()
    seq = job.sequences[0]
    job.hash_completed_page(seq, 0)
    assert iso.reusable_pages("alice", H[:2]) == 1 and iso.reusable_pages("bob", H[:2]) == 0
    job.hash_completed_page(seq, 1)
    assert iso.reusable_pages("alice", H[:2]) == 2


# ------ another namespace's fresh page under a hash we are making ourselves: never switch onto it
class V3SwitchingJob(V3Job):
    """exllamav3's ``Job.hash_completed_page``: switch to a referenced page with the same hash (asserting it is full)."""

    def hash_completed_page(self, seq, page_idx):
        held = self.pagetable.referenced_pages.get(H[page_idx])
        assert held is None or held.kv_position == PAGE  # the library's assertion
        seq.allocated_pages[page_idx] = held or page(kv=PAGE, phash=H[page_idx])


def test_v3_keeps_its_page_when_the_hash_is_held_by_an_unwritten_page():
    # alice made this content before; its page was evicted and she was handed a fresh one under
    # the hash, not written yet; bob (not allowed to look it up) just finished the same content
    alices = page(kv=0, phash=H[0])
    table = SimpleNamespace(all_pages=[], referenced_pages={H[0]: alices})
    mine, following = page(kv=PAGE, phash=b"u" * 16), page()
    job = isolated_job_class(IsolatedJobV3, V3SwitchingJob)(H[:2], [mine, following], table)
    job.xllm_bind(PrefixIsolation(), "bob", PAGE)
    job.allocate_pages()
    seq = job.sequences[0]
    job.hash_completed_page(seq, 0)
    assert seq.allocated_pages[0] is mine and mine.phash == b"u" * 16  # ours, under its unique hash
    assert following.prev_hash == b"u" * 16 and table.referenced_pages[H[0]] is alices
    assert job.xllm_isolation.reusable_pages("bob", H[:1]) == 0
    alices.kv_position = PAGE  # once written, an identical page is shared as the library does
    job.hash_completed_page(seq, 0)
    assert seq.allocated_pages[0] is alices and job.xllm_isolation.reusable_pages("bob", H[:1]) == 1


def test_v2_publish_never_shares_an_unwritten_page():
    gen, iso, job, seq = v2_rig("bob", [], fill=[PAGE, PAGE, 0])
    alices = V2Page(gen, H[0], kv_position=0)  # handed to alice under the hash, not written yet
    mine = seq.allocated_pages[0]
    job.xllm_publish()
    assert seq.allocated_pages[0] is mine and mine.ref_count == 1 and gen.referenced_pages[H[0]] is alices
    assert seq.allocated_pages[1].phash != H[1]  # chained after it: not published either, for now
    assert iso.reusable_pages("bob", H[:1]) == 0
    alices.kv_position = PAGE  # a later chunk: now written, shared
    job.xllm_publish()
    assert seq.allocated_pages[0] is alices and seq.allocated_pages[1].phash == H[1]


class V2HashingDecodeJob(V2DecodeJob):
    """exllamav2's decode hashing: a completed page switches to a referenced page with its hash (asserting it is full)."""

    def complete_page(self, seq, index, next_token):
        """Switch to a referenced page with the content hash, else take the hash."""
        held = self.generator.referenced_pages.get(H[index])
        if held is not None:
            assert held.kv_position == PAGE  # the library's assertion
            seq.allocated_pages[index].sub_ref()
            seq.allocated_pages[index] = held
            held.add_ref(0)
        else:
            seq.allocated_pages[index].update_hash(H[index])
        seq.allocated_pages[index + 1].prev_hash = H[index]


def test_v2_decode_keeps_its_page_when_the_hash_is_held_by_an_unwritten_page():
    gen = SimpleNamespace(paged=True, page_size=PAGE, referenced_pages={}, unreferenced_pages={}, all_pages=[])
    alices = V2Page(gen, H[0], kv_position=0)
    job = isolated_job_class(IsolatedJobV2, V2HashingDecodeJob)([], gen)
    iso = PrefixIsolation()
    job.xllm_bind(iso, "bob", PAGE)
    seq = job.sequences[0]
    mine, following = V2Page(gen, b"u" * 16, kv_position=PAGE - 1), V2Page(gen, b"v" * 16)
    seq.kv_position, seq.allocated_pages = PAGE - 1, [mine, following]
    job.receive_sample(None, None, None, None, None, None, [])
    assert seq.allocated_pages[0] is mine and mine.phash not in (H[0], b"u" * 16)  # a fresh unique hash
    assert gen.referenced_pages[H[0]] is alices and gen.referenced_pages[mine.phash] is mine
    assert following.prev_hash == mine.phash and iso.reusable_pages("bob", H[:1]) == 0
