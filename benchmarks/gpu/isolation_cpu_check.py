"""Check per-user prefix-cache isolation against the real exllamav3 / exllamav2 page bookkeeping, on CPU.

What runs for real: the library's own Python code, imported from an unpacked wheel
(exllamav3 1.6.5, exllamav2 0.3.2), with only its compiled CUDA extension module
(``exllamav3_ext`` / ``exllamav2_ext``) replaced by a stand-in placed in ``sys.modules``.
That covers the library's ``Job`` / ``ExLlamaV2DynamicJob`` (``prepare_for_queue``,
``allocate_pages``, ``prefill`` including its partial-page matching, ``receive_sample``
with its page hashing, ``get_input_ids_list``, ``deallocate_pages``), the exllamav3
``PageTable`` / ``Sequence`` / ``CachePage`` and the exllamav2 page table, the generators'
``enqueue`` and ``iterate_start_jobs``, plus our own ``DynamicGeneratorModel.add`` /
``make_job`` / ``step`` / ``translate_results`` and the ``prefix_isolation`` mixins.

What is stood in: the stand-in extension implements ``count_match`` / ``count_match_tensor``
(leading equal tokens, the partial-page matcher) in Python and raises on anything else; the
model's forward passes are no-ops (no K/V is computed), the cache's page copy only records
which page was copied where, and the sampler is replaced by a scripted list of output
tokens. The generator object is created without ``__init__`` (which loads weights) and given
the attributes these methods read; ``iterate()`` is replaced by a loop that calls the real
methods in the order the library's ``iterate()`` does (start jobs, prefill, decode, release).
Defragmentation, CPU/disk page tiers, recurrent models and speculative decoding are off.
exllamav3 imports ``triton`` at import time: a real triton wheel is put on the path (only
imported, no kernel runs). After every iteration the libraries' own page-table checkers run
(exllamav3 ``PageTable.validate_pagetable``; exllamav2's checker, which it ships switched
off, is switched on), plus a check that every page under a content hash holds those tokens.

So this proves the mixins drive the real page table as intended (which pages a job may
reuse by hash, which pages partial-page matching sees, what is recorded per namespace,
what the library reports as ``cached_tokens``); it does not prove anything about K/V
contents, CUDA kernels or timing, and it only covers the library versions unpacked here.

Oracle: a job may reuse a prompt prefix (``cached_tokens`` as the library reports it) only
if its namespace had already sent or received that exact token prefix; for the other users'
probes, every page read (by hash or by partial-page copy) must also hold tokens written by
that user's own jobs (provenance tracked by the script, not by the mixins); reuse must also
happen where the scenario expects it (a user's own repeats, growing chat turns).
``--control`` switches the policy off to show these checks do fail when pages cross users.

Run (never collected by pytest, not needed by CI; the libraries stay out of .venv)::

    pip download --no-deps exllamav3==1.6.5 exllamav2==0.3.2 triton -d /tmp/exlwheels
    mkdir -p /tmp/exl && (cd /tmp/exl && for w in /tmp/exlwheels/exllama*.whl; do unzip -qo "$w"; done)
    pip install --no-deps --target /tmp/exldeps /tmp/exlwheels/triton-*.whl
    PYTHONPATH=/tmp/exl:/tmp/exldeps OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu/isolation_cpu_check.py
"""

from __future__ import annotations

import argparse
import importlib.machinery
import random
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PAGE = 256
VOCAB = 32000
EOS = 2


# -- the stand-in CUDA extension --------------------------------------------------------------
def _count_match(a: torch.Tensor, b: torch.Tensor, max_a: int) -> int:
    """Leading tokens of ``a[:, :max_a]`` equal to ``b`` (what the kernel computes)."""
    n = min(int(max_a), a.shape[-1], b.shape[-1])
    if n <= 0:
        return 0
    diff = (a[0, :n] != b[0, :n]).nonzero()
    return int(diff[0]) if diff.numel() else n


class _StubExtension(types.ModuleType):
    """Stands in for the compiled extension: the token matcher, and a loud error for anything else."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"stub extension: {name}() was called (needs the CUDA extension)")

        return missing


def install_stub_extensions() -> None:
    """Put stand-ins for ``exllamav3_ext`` / ``exllamav2_ext`` in ``sys.modules`` (the libraries' ext.py then import them)."""
    for name, matcher in (("exllamav3_ext", "count_match_tensor"), ("exllamav2_ext", "count_match")):
        module = _StubExtension(name)
        setattr(module, matcher, _count_match)
        # exllamav3's ext.py accepts a module only if it looks like a compiled extension
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=object(), origin=f"/stub/{name}.so")  # type: ignore[arg-type]
        sys.modules[name] = module


# -- stand-ins for model, cache and tokenizer -------------------------------------------------
class FakeTokenizer:
    """Just what ``receive_sample`` asks of a tokenizer."""

    def __init__(self) -> None:
        self._pieces = [f"<{i}>" for i in range(VOCAB)]

    def get_id_to_piece_list(self, *args: Any) -> list[str]:
        """Token id -> text piece."""
        return self._pieces


class CopyLog:
    """Page copies made by partial-page matching: (source page index, destination page index, tokens)."""

    def __init__(self) -> None:
        self.copies: list[tuple[int, int, int]] = []


class FakeCacheV3:
    """exllamav3 ``Cache`` surface used by the page table and prefill."""

    def __init__(self, num_tokens: int, log: CopyLog):
        self.max_num_tokens = num_tokens
        self.log = log
        self.model = types.SimpleNamespace(loaded_tp=False)

    def copy_page(self, target: Any, src: int, dst: int, n: int) -> None:
        """Record the copy (no K/V exists here)."""
        self.log.copies.append((src, dst, n))

    def get_all_tensors(self) -> list:
        """No tensors: nothing for defrag to rotate."""
        return []


class FakeCacheV2:
    """exllamav2 cache surface used by prefill."""

    def __init__(self, num_tokens: int, log: CopyLog):
        self.max_seq_len = num_tokens
        self.current_seq_len = 0
        self.log = log

    def copy_states(self, target: Any, src_from: int, src_n: int, dst_from: int, dst_n: int, *args: Any) -> None:
        """Record the copy in page units."""
        self.log.copies.append((src_from // PAGE, dst_from // PAGE, src_n))

    def all_tensors(self) -> list:
        """No tensors."""
        return []


class FakeModel:
    """Forward passes that compute nothing (K/V content is out of scope here)."""

    caps: dict = {}
    output_device = torch.device("cpu")

    def prefill(self, *args: Any, **kwargs: Any) -> None:
        """exllamav3 prefill forward."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """exllamav3 forward."""

    def forward_chunk(self, *args: Any, **kwargs: Any) -> None:
        """exllamav2 prefill forward."""


# -- rigs: the real generator objects, without weights --------------------------------------------
@dataclass
class Outcome:
    """One finished request as our backend reported it."""

    label: str
    namespace: str
    prompt: list[int]
    output: list[int]
    cached_tokens: int
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    #: writers of every page the job read (hash reuse and partial-page copies)
    sources: list[frozenset[str]] = field(default_factory=list)


class Rig:
    """Our DynamicGeneratorModel over a real library generator, driven token by token with scripted output."""

    library = ""

    def __init__(self, num_pages: int):
        self.log = CopyLog()
        self.page_size = PAGE
        self.writers: dict[int, frozenset[str]] = {}
        self.reads: dict[int, list[frozenset[str]]] = {}
        self.hash_pages: dict[int, int] = {}  # job id -> prompt pages it got by hash (full when it started)
        self.scripts: dict[int, list[int]] = {}
        self.next_id = 0
        self.unwritten: list[str] = []  # a job's sequence passed a page that nobody has written (see _passed_unwritten)
        self.model = self._build(num_pages)
        self.generator = self.model.generator
        self.generator.iterate = self._iterate  # model.step() calls this

    def _build(self, num_pages: int) -> Any:
        raise NotImplementedError

    def _start_jobs(self, results: list) -> None:
        raise NotImplementedError

    def _prefill(self, job: Any, results: list) -> None:
        job.prefill(results)

    # provenance (independent of the mixins' own bookkeeping): which namespaces' jobs wrote the
    # tokens a physical page holds, and which writers' pages each job read (hash reuse or copy)
    def _note_started(self, results: list) -> None:
        for r in results:
            if r.get("stage") == "started":
                job = r["job"]
                full = [p for seq in job.sequences for p in seq.allocated_pages if p.kv_position == self.page_size]
                self.hash_pages[job.identifier] = len(full)
                self.reads.setdefault(job.identifier, []).extend(self.writers.get(id(p), frozenset()) for p in full)

    def _passed_unwritten(self, job: Any) -> None:
        """Every page before a sequence's position must be full: the job attends to it from now on."""
        for seq in job.sequences:
            for index, page in enumerate(seq.allocated_pages[: seq.kv_position // self.page_size]):
                if page.kv_position != self.page_size:
                    self.unwritten.append(f"job {job.identifier} ({job.xllm_namespace}) at {seq.kv_position} "
                                          f"holds page {index} with {page.kv_position} tokens written")

    def _tracked(self, job: Any, call: Any) -> None:
        """Run one library call that may write tokens into the job's pages; update provenance."""
        ns = job.xllm_namespace
        before = {id(p): p.kv_position for seq in job.sequences for p in seq.allocated_pages}
        copies_before = len(self.log.copies)
        call()
        self._passed_unwritten(job)
        by_index = {p.page_index: p for p in self.pages()}
        copied: dict[int, tuple[frozenset, int]] = {}
        for src, dst, n in self.log.copies[copies_before:]:
            source = self.writers.get(id(by_index[src]), frozenset())
            self.reads.setdefault(job.identifier, []).append(source)
            copied[dst] = (source, n)
        for seq in job.sequences:
            for page in seq.allocated_pages:
                k0 = before.get(id(page))
                if k0 is None or page.kv_position <= k0:
                    continue
                if page.page_index in copied:
                    source, n = copied[page.page_index]
                    self.writers[id(page)] = source | {ns} if page.kv_position > n else source
                elif k0 == 0:
                    self.writers[id(page)] = frozenset({ns})
                else:
                    self.writers[id(page)] = self.writers.get(id(page), frozenset()) | {ns}

    def _iterate(self) -> list[dict]:
        """Mirrors the library's iterate(): start jobs, prefill, one decode step, release finished jobs."""
        gen = self.generator
        results: list[dict] = []
        self._start_jobs(results)
        self._note_started(results)
        for job in list(gen.active_jobs):
            if not job.is_prefill_done():
                self._tracked(job, lambda: self._prefill(job, results))
                continue
            if job.time_first_token is None:
                job.time_first_token = time.time()
            # the decode step's input token goes into its page (library code; the forward is skipped)
            self._tracked(job, lambda: job.get_input_ids_list(None, 0, add_to_cache=True))
            token = torch.tensor([[self.scripts[job.identifier].pop(0)]], dtype=torch.long)
            eos = self._receive(job, token, results)
            self._passed_unwritten(job)
            if eos:
                job.deallocate_pages()
                gen.active_jobs.remove(job)
        self.validate()
        return results

    def validate(self) -> None:
        """The library's own page-table checks, plus: every full page under a content hash holds those tokens."""
        checksum = self._checksum()
        for page in self.pages():
            if page.kv_position == self.page_size and page.phash[:8] != bytes(8):  # random hashes are small counters
                assert page.phash == checksum(page.sequence, page.prev_hash), f"{self.library}: stale hash on {page}"

    def _checksum(self) -> Any:
        raise NotImplementedError

    def _receive(self, job: Any, token: torch.Tensor, results: list) -> bool:
        raise NotImplementedError

    def run(self, label: str, namespace: str, prompt: list[int], output: list[int]) -> Outcome:
        """Submit one request through our backend and step until it finishes."""
        from xllm_jupyter.core.types import SamplingParams, SequenceJob

        job_id = self.next_id
        self.next_id += 1
        self.scripts[job_id] = list(output) + [EOS]
        before = len(self.log.copies)
        self.model.add(SequenceJob(job_id=job_id, prompt_ids=tuple(prompt), max_tokens=len(output) + 8,
                                   sampling=SamplingParams(), stop_token_ids=frozenset({EOS}), cache_namespace=namespace))
        cached = None
        for _ in range(10_000):
            for event in self.model.step():
                if event.job_id == job_id and event.finish is not None:
                    cached = event.cached_tokens
            if cached is not None:
                break
        assert cached is not None, f"{label}: the job never finished"
        return Outcome(label, namespace, list(prompt), list(output), int(cached), self.log.copies[before:],
                       self.reads.get(job_id, []))


class RigV3(Rig):
    """exllamav3 1.6.5: Generator + PageTable + Job (with IsolatedJobV3)."""

    library = "exllamav3"

    def _build(self, num_pages: int) -> Any:
        from exllamav3.generator.generator import Generator
        from exllamav3.generator.pagetable import PageTable

        from xllm_jupyter.backends.exllamav3 import ExllamaV3Model
        from xllm_jupyter.backends.prefix_isolation import PrefixIsolation

        gen = object.__new__(Generator)  # no weights: set what the page/job code reads
        gen.__dict__.update(
            model=FakeModel(), tokenizer=FakeTokenizer(), max_total_tokens=num_pages * PAGE, max_draft_tokens=0,
            recurrent_cache=None, recurrent_checkpoint_interval=PAGE, mtp_draft=False, dflash_draft=False,
            draft_model=None, draft_cache=None, max_batch_size=8, max_chunk_size=2048, padded_vocab_size=VOCAB,
            ngram_match_min=0, hybrid_draft_tokens=0, ngram_corpus=None, disk_page_cache=None, enable_defrag=False,
            job_serial=0, pending_jobs=[], active_jobs=[],
        )
        gen.cache = FakeCacheV3(num_pages * PAGE, self.log)
        gen.pagetable = PageTable(gen, gen.cache)
        model = object.__new__(ExllamaV3Model)
        model.__dict__.update(generator=gen, isolation=PrefixIsolation(), _jobs={}, _info={}, _cancelled=[],
                              _tokenizer=None, _counts_lock=__import__("threading").Lock(), _prompt_tokens=0,
                              _cached_tokens=0, chat=None)
        from xllm_jupyter.backends.exllama_results import SpeculativeStats

        model.speculative = SpeculativeStats()
        model._piece = lambda token_id: f"<{token_id}>"
        return model

    def _start_jobs(self, results: list) -> None:
        from exllamav3.generator.generator import Generator

        Generator.iterate_start_jobs(self.generator, results)

    def _receive(self, job: Any, token: torch.Tensor, results: list) -> bool:
        eos, _, _ = job.receive_sample(None, token, None, None, None, results)
        return bool(eos)

    def pages(self) -> list[Any]:
        """All cache pages."""
        return self.generator.pagetable.all_pages

    def validate(self) -> None:
        """PageTable.validate_pagetable (ref counts, unique hashes, page tokens == job tokens) and ours."""
        self.generator.pagetable.validate_pagetable(self.generator.active_jobs)
        super().validate()

    def _checksum(self) -> Any:
        from exllamav3.generator.pagetable import tensor_hash_checksum

        return tensor_hash_checksum


class RigV2(Rig):
    """exllamav2 0.3.2: ExLlamaV2DynamicGenerator page table + ExLlamaV2DynamicJob (with IsolatedJobV2)."""

    library = "exllamav2"

    def __init__(self, num_pages: int, paged: bool = True):
        self.paged = paged
        super().__init__(num_pages)
        if not paged:
            self.library = "exllamav2 (unpaged)"

    def _build(self, num_pages: int) -> Any:
        from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator

        from xllm_jupyter.backends.exllama_results import SpeculativeStats
        from xllm_jupyter.backends.exllamav2 import ExllamaV2Model
        from xllm_jupyter.backends.prefix_isolation import PrefixIsolation

        tokens = num_pages * PAGE
        gen = object.__new__(ExLlamaV2DynamicGenerator)
        gen.__dict__.update(
            model=FakeModel(), tokenizer=FakeTokenizer(), cache=FakeCacheV2(tokens, self.log), paged=self.paged,
            page_size=PAGE if self.paged else tokens, max_pages=num_pages if self.paged else 1,
            max_total_tokens=tokens, max_batch_size=8 if self.paged else 1, max_chunk_size=2048,
            padded_vocab_size=VOCAB, draft_model=None, draft_cache=None, num_draft_tokens=0, use_ngram_draft=False,
            filter_queue=None, current_loras=None, job_serial=0, pending_jobs=[], active_jobs=[],
        )
        gen.reset_page_table()
        self.page_size = gen.page_size
        gen.last_defrag_serial = 1 << 60  # defrag rotates K/V tensors: out of scope
        # the library ships its page-table checker switched off (validate_cache is a no-op); switch it on
        gen.validate_cache = gen._ExLlamaV2DynamicGenerator___validate_cache
        model = object.__new__(ExllamaV2Model)
        model.__dict__.update(generator=gen, isolation=PrefixIsolation(), _jobs={}, _info={}, _cancelled=[],
                              _sampler_vocab=VOCAB, _counts_lock=__import__("threading").Lock(), _prompt_tokens=0,
                              _cached_tokens=0, chat=None, speculative=SpeculativeStats())
        model._piece = lambda token_id: f"<{token_id}>"
        return model

    def _start_jobs(self, results: list) -> None:
        from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator

        ExLlamaV2DynamicGenerator.iterate_start_jobs(self.generator, results)

    def _receive(self, job: Any, token: torch.Tensor, results: list) -> bool:
        eos, _ = job.receive_sample(None, token, None, None, None, False, results)
        return bool(eos)

    def pages(self) -> list[Any]:
        """All cache pages."""
        return self.generator.all_pages

    def _checksum(self) -> Any:
        from exllamav2.generator import dynamic

        return dynamic._tensor_hash_checksum


# -- the scenario -----------------------------------------------------------------------------------
@dataclass
class Check:
    """One line of the report."""

    library: str
    label: str
    expect: str
    cached: int
    ok: bool
    note: str = ""


def _seen_before(history: dict[str, list[list[int]]], namespace: str, prefix: list[int]) -> bool:
    """True when ``namespace`` already sent or received a sequence starting with ``prefix``."""
    n = len(prefix)
    return any(len(seq) >= n and seq[:n] == prefix for seq in history.get(namespace, []))


def run_scenario(rig: Rig, seed: int = 0) -> list[Check]:
    """alice / bob / chat turns; every reuse is checked against what the namespace already had."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, VOCAB) for _ in range(n)]

    history: dict[str, list[list[int]]] = {}
    checks: list[Check] = []

    def ask(label: str, ns: str, prompt: list[int], expect: str, predicate, out_len: int = 8,
            own_pages_only: bool = False) -> Outcome:
        out = rig.run(label, ns, prompt, tokens(out_len))
        notes = []
        ok = predicate(out.cached_tokens)
        if out.cached_tokens > 0 and not _seen_before(history, ns, prompt[: out.cached_tokens]):
            ok = False
            notes.append("LEAK: reused tokens this namespace never had")
        foreign = [sorted(w) for w in out.sources if ns not in w]
        if own_pages_only and foreign:
            ok = False
            notes.append(f"read pages written only by {foreign}")
        if out.sources:
            notes.append("read pages written by " + ", ".join(sorted({"+".join(sorted(w)) or "?" for w in out.sources})))
        if out.copies:
            notes.append(f"partial-page copies (src, dst, tokens) {out.copies}")
        checks.append(Check(rig.library, label, expect, out.cached_tokens, ok, "; ".join(notes)))
        history.setdefault(ns, []).append(prompt + out.output + [EOS])
        return out

    secret = tokens(600)
    ask("alice: 600-token prompt (cold)", "alice", secret, "== 0", lambda c: c == 0)
    ask("alice: same prompt again", "alice", secret, ">= 256", lambda c: c >= PAGE)
    ask("bob: alice's prompt", "bob", secret, "== 0", lambda c: c == 0, own_pages_only=True)
    # bob has now sent the whole prompt himself: his own first page may serve his probe, alice's may not
    ask("bob: 100-token prefix of it (sub-page)", "bob", secret[:100], "no page; own tokens only",
        lambda c: c < PAGE, own_pages_only=True)
    ask("bob: alice's prompt again", "bob", secret, ">= 256", lambda c: c >= PAGE, own_pages_only=True)
    ask("alice: same prompt a third time", "alice", secret, ">= 256", lambda c: c >= PAGE)

    # a fresh probe: bob's sub-page probe first, then the whole prompt (only his own probe may be reused)
    secret2 = tokens(600)
    ask("alice: second prompt (cold)", "alice", secret2, "== 0", lambda c: c == 0)
    ask("bob: 100-token prefix of alice's second prompt", "bob", secret2[:100], "== 0", lambda c: c == 0,
        own_pages_only=True)
    ask("bob: alice's second prompt", "bob", secret2, "< 256 (own probe only)", lambda c: c < PAGE,
        own_pages_only=True)
    ask("bob: alice's second prompt again", "bob", secret2, ">= 256", lambda c: c >= PAGE, own_pages_only=True)

    # growing chat turns in one namespace; another namespace replaying the transcript gets nothing
    system = tokens(300)
    turn1 = ask("carol: chat turn 1 (cold)", "carol", system, "== 0", lambda c: c == 0, out_len=40)
    convo2 = system + turn1.output + [EOS] + tokens(200)
    turn2 = ask("carol: chat turn 2 (history + new message)", "carol", convo2, ">= 256", lambda c: c >= PAGE,
                out_len=60)
    convo3 = convo2 + turn2.output + [EOS] + tokens(150)
    ask("carol: chat turn 3", "carol", convo3, ">= 512", lambda c: c >= 2 * PAGE)
    ask("dave: replays carol's turn 3 transcript", "dave", convo3, "== 0", lambda c: c == 0, own_pages_only=True)
    ask("dave: replays it again", "dave", convo3, ">= 512", lambda c: c >= 2 * PAGE, own_pages_only=True)
    return checks


def run_concurrent(rig: Rig, seed: int = 1) -> list[Check]:
    """bob sends alice's prompt while alice's job is still decoding (her pages are referenced), then alice does.

    alice's first job made her prompt pages moments ago (they are still in use), so her second job
    may take them by hash; bob's may take nothing, by hash or by partial-page copy. Later, with the
    first job's output past a page boundary, alice sends the prompt plus that output and may also
    take the page her job completed while decoding; carol (who never sent the prompt) sends the same
    and gets nothing (not bob: he has sent the prompt himself by then).
    """
    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    rng = random.Random(seed)
    prompt = [rng.randrange(100, VOCAB) for _ in range(600)]
    finished: dict[int, int] = {}

    def add(job_id: int, ns: str, out_len: int, ids: list[int] = prompt) -> None:
        rig.scripts[job_id] = [rng.randrange(100, VOCAB) for _ in range(out_len)] + [EOS]
        rig.model.add(SequenceJob(job_id=job_id, prompt_ids=tuple(ids), max_tokens=out_len + 8,
                                  sampling=SamplingParams(), stop_token_ids=frozenset({EOS}), cache_namespace=ns))

    def step() -> None:
        for event in rig.model.step():
            if event.finish is not None:
                finished[event.job_id] = event.cached_tokens

    base = 1000
    add(base, "alice", 300)  # long decode: alice's prompt pages stay referenced
    output = list(rig.scripts[base][:200])  # what alice's first job will send her
    for _ in range(20):
        step()
    add(base + 1, "bob", 4)
    add(base + 2, "alice", 4)
    # once the first job has sent 200 tokens (its third page, 600 + 168 tokens, is complete) ...
    for _ in range(2000):
        step()
        if len(rig.scripts[base]) <= 301 - len(output):
            break
    assert base not in finished, "alice's first job ended too soon for the decode-page check"
    # ... alice continues the conversation (prompt + the output so far) while the first job still runs
    add(base + 3, "carol", 4, prompt + output)
    add(base + 4, "alice", 4, prompt + output)
    for _ in range(2000):
        step()
        if len(finished) == 5:
            break
    label = rig.library

    def check(job_id: int, ns: str, what: str, expect: str, min_pages: int) -> Check:
        """``min_pages`` > 0: at least that many pages by hash; 0: nothing reused at all."""
        cached, pages, sources = finished.get(job_id, -1), rig.hash_pages.get(job_id, -1), rig.reads.get(job_id, [])
        note = f"{pages} page(s) by hash"
        if sources:
            note += "; read pages written by " + ", ".join(sorted({"+".join(sorted(w)) or "?" for w in sources}))
        own = all(ns in w for w in sources)  # every page read holds tokens this namespace's jobs wrote
        ok = own and (pages >= min_pages and cached >= min_pages * PAGE if min_pages else cached == 0 and pages == 0)
        return Check(label, f"concurrent: {what}", expect, cached, ok, note)

    return [
        check(base + 1, "bob", "bob sends alice's prompt while her job runs", "== 0, own pages only", 0),
        check(base + 2, "alice", "alice's second job meanwhile", ">= 2 pages by hash", 2),
        check(base + 3, "carol", "carol sends alice's prompt + output so far", "== 0, own pages only", 0),
        check(base + 4, "alice", "alice sends prompt + output so far", ">= 3 pages by hash", 3),
    ]


def run_hazard(build: Any, seed: int = 5) -> list[Check]:
    """Another namespace's fresh page under a content hash we are making ourselves: never switch onto it.

    alice sent prompt P (and got output O) earlier, then its pages were evicted. bob, who never
    sent P, makes P's pages on unique pages; alice sends P (or P + part of O) while he does, so
    her lookups miss and she is handed fresh, still unwritten pages under P's hashes. When bob
    completes the same content (a prefill chunk, or a page his decoding fills) the library would
    switch him onto her unwritten page: exllamav3 fails an assertion, exllamav2 shares it
    silently. Checked: no library assertion, no job ever passes a page nobody wrote, bob reuses
    nothing and reads only pages his own jobs wrote.
    """
    from xllm_jupyter.core.types import SamplingParams, SequenceJob

    checks: list[Check] = []
    for phase in ("prefill", "decode"):
        rig = build()
        rig.generator.max_chunk_size = 2 * PAGE  # bob's prompt is prefilled over several steps
        rng = random.Random(seed)
        prompt = [rng.randrange(100, VOCAB) for _ in range(1200)]
        output = [rng.randrange(100, VOCAB) for _ in range(200)]  # page 4 (1024..1279) completes in decoding
        finished: dict[int, int] = {}
        note = ""
        try:
            rig.run("alice: P (cold)", "alice", prompt, output)
            rig.run("dave: filler (evicts P)", "dave", [rng.randrange(100, VOCAB) for _ in range(3500)], [5] * 4)

            def add(job_id: int, ns: str, ids: list[int], out: list[int]) -> None:
                rig.scripts[job_id] = list(out) + [EOS]
                rig.model.add(SequenceJob(job_id=job_id, prompt_ids=tuple(ids), max_tokens=len(out) + 8,
                                          sampling=SamplingParams(), stop_token_ids=frozenset({EOS}),
                                          cache_namespace=ns))

            def step() -> None:
                for event in rig.model.step():
                    if event.finish is not None:
                        finished[event.job_id] = event.cached_tokens

            add(100, "bob", prompt, output if phase == "decode" else [7] * 4)
            step()
            if phase == "decode":  # until bob's next token completes page 4
                while not any(j.identifier == 100 and j.sequences[0].kv_position == 5 * PAGE - 1
                              for j in rig.generator.active_jobs):
                    step()
                add(101, "alice", prompt + output[:100], [7] * 4)
            else:
                add(101, "alice", prompt, [7] * 4)
            for _ in range(1000):
                step()
                if len(finished) == 2:
                    break
        except AssertionError as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            note = f"library assertion in {frame.name}: {frame.line}"
        sources = rig.reads.get(100, [])
        foreign = [sorted(w) for w in sources if "bob" not in w]
        notes = [n for n in (note, "; ".join(rig.unwritten[:2]), f"bob read pages written only by {foreign}" if foreign else "")
                 if n]
        ok = not notes and len(finished) == 2 and finished[100] == 0
        notes.append(f"alice reused {finished.get(101, -1)} tokens")
        checks.append(Check(rig.library, f"hazard ({phase}): bob makes P while alice is handed fresh P pages",
                            "no assert; no unwritten page", finished.get(100, -1), ok, "; ".join(notes)))
    return checks


def run_unpaged(rig: RigV2, seed: int = 2) -> list[Check]:
    """exllamav2 unpaged (one page = the whole cache): the previous job's tokens are matched against the next prompt."""
    rng = random.Random(seed)
    prompt = [rng.randrange(100, VOCAB) for _ in range(600)]
    label = rig.library
    out = []
    for name, ns, expect, pred in (
        ("alice: prompt (cold)", "alice", "== 0", lambda c: c == 0),
        ("alice: same prompt again", "alice", ">= 256", lambda c: c >= PAGE),
        ("bob: alice's prompt", "bob", "== 0", lambda c: c == 0),
        ("bob: same prompt again", "bob", ">= 256", lambda c: c >= PAGE),
        ("alice: after bob's job", "alice", "== 0 (page now holds bob's)", lambda c: c == 0),
    ):
        res = rig.run(name, ns, prompt, [rng.randrange(100, VOCAB) for _ in range(8)])
        out.append(Check(label, name, expect, res.cached_tokens, pred(res.cached_tokens)))
    return out


def main() -> int:
    """Run every scenario on every library that imports; print a PASS/FAIL table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=64, help="cache pages per generator (256 tokens each)")
    parser.add_argument("--control", action="store_true",
                        help="negative control: switch the isolation policy off (every page reusable and visible "
                             "to everyone); the isolation checks must then FAIL")
    args = parser.parse_args()
    install_stub_extensions()
    if args.control:
        from xllm_jupyter.backends.prefix_isolation import PrefixIsolation

        PrefixIsolation.reusable_pages = lambda self, namespace, page_hashes: len(page_hashes)  # type: ignore[method-assign]
        PrefixIsolation.visible = lambda self, namespace, page: True  # type: ignore[method-assign]

    checks: list[Check] = []
    skipped: list[str] = []
    builders = (("exllamav3", lambda: RigV3(args.pages)), ("exllamav2", lambda: RigV2(args.pages)))
    for name, build in builders:
        try:
            __import__(name)
        except Exception as exc:  # report and go on with the other library
            skipped.append(f"{name}: not importable ({type(exc).__name__}: {exc})")
            continue
        checks += run_scenario(build())
        checks += run_concurrent(build())
        checks += run_hazard(lambda: RigV3(16) if name == "exllamav3" else RigV2(16))
        if name == "exllamav2":
            checks += run_unpaged(RigV2(args.pages, paged=False))

    width = max(len(c.label) for c in checks) if checks else 20
    print(f"{'library':<20} {'check':<{width}} {'expect':<28} {'cached':>6}  result")
    for c in checks:
        print(f"{c.library:<20} {c.label:<{width}} {c.expect:<28} {c.cached:>6}  {'PASS' if c.ok else 'FAIL'}"
              + (f"  ({c.note})" if c.note else ""))
    for line in skipped:
        print("SKIPPED", line)
    failed = sum(not c.ok for c in checks)
    print(f"\n{len(checks) - failed} passed, {failed} failed" + (f", {len(skipped)} library skipped" if skipped else ""))
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
