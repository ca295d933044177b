"""Per-namespace prefix reuse for the exllama generators (backends/prefix_isolation.py), on CPU.

The policy is pure Python and tested directly. The job mixins are exercised over a small
stand-in carrying the attribute names of exllamav3 1.6.5's ``Job``/``Sequence`` and
exllamav2 0.3.2's ``ExLlamaV2DynamicJob``: this checks our arithmetic (which pages may be
looked up, how many become new pages, what partial matching sees), not the libraries,
which tests/test_gpu_backends.py runs for real on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

from xllm_jupyter.backends.prefix_isolation import (
    IsolatedJobV2,
    IsolatedJobV3,
    PrefixIsolation,
    VisiblePages,
    isolated_job_class,
)

H = [bytes([i]) * 16 for i in range(8)]  # page hashes
PAGE = 256


def page(kv=0, can_revert=False, phash=b"r" * 16):
    return SimpleNamespace(kv_position=kv, can_revert=can_revert, phash=phash)


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


def test_visible_pages_hides_other_namespaces_and_delegates_the_rest():
    iso = PrefixIsolation()
    mine, theirs, nobodys = page(), page(), page()
    iso.claim("alice", [mine], reused=lambda pg: False)
    iso.claim("bob", [theirs], reused=lambda pg: False)
    table = SimpleNamespace(all_pages=[mine, theirs, nobodys], referenced_pages={"x": 1})
    view = VisiblePages(table, iso, "alice")
    assert view.all_pages == [mine] and view.referenced_pages is table.referenced_pages


# ------------------------------------------------- the mixins over stand-in jobs
class V3Job:
    """The exllamav3 Job/Sequence attributes our mixin touches, with the library's page accounting."""

    def __init__(self, hashes, pages, table):
        self.sequences = [SimpleNamespace(page_hashes=None, max_cached_pages=None, allocated_pages=None)]
        self._hashes, self._pages = hashes, pages
        self.pagetable = table  # one page table, shared by every job of the generator
        self.seen = None

    def prepare_for_queue(self, generator, serial_number, rq=False):
        self.sequences[0].page_hashes = list(self._hashes)
        self.all_unique_hashes = list(self._hashes)

    def allocate_pages(self):
        self.sequences[0].allocated_pages = list(self._pages)

    def prefill(self, results):
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
        self.sequences = [SimpleNamespace(page_hashes=None, new_unique_pages=1, allocated_pages=None)]
        self._hashes, self.generator = hashes, generator
        self.matched_against = None

    def prepare_for_queue(self, generator, serial_number):
        self.sequences[0].page_hashes = list(self._hashes)
        self.all_unique_hashes = list(self._hashes)

    def allocate_pages(self):
        self.sequences[0].allocated_pages = [self.generator.all_pages[0]]

    def prefill(self, results):
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
