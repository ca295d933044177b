"""A LoadedModel over an exllama dynamic generator (exllamav3 ``Generator``, exllamav2 ``DynamicGenerator``).

Both generators batch continuously on their own: jobs enqueued between two ``iterate()``
calls join the running batch, prompts are deduplicated page by page (prefix caching), and
cancelling a job frees its pages at once. This class only maps our jobs onto theirs and
their results onto ``TokenEvent``s; the subclasses build the library's job objects.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from abc import abstractmethod
from typing import Any

from ..core.types import Constraint, FinishReason, SequenceJob, TokenEvent
from .base import LoadedModel, ModelSpec
from .constraints import GrammarCompiler
from .detokenize import BYTE_LEVEL, SENTENCEPIECE, piece_scheme, token_text
from .exllama_common import free_cuda_memory
from .exllama_results import JobInfo, SpeculativeStats, translate_results
from .hf_tokenizer import ChatTokenizer, ChatTokenizerMethods, special_token_text
from .prefix_isolation import PrefixIsolation, isolated_job_class
from .tokenizer_files import release as release_tokenizer

log = logging.getLogger(__name__)


class DynamicGeneratorModel(ChatTokenizerMethods, LoadedModel):
    """Drives one exllama dynamic generator from the engine thread."""

    def __init__(self, spec: ModelSpec, *, generator: Any, chat: ChatTokenizer, context_length: int,
                 vocab_size: int, eos_token_ids: frozenset[int], max_batch_size: int, memory_bytes: int,
                 details: dict[str, Any]):
        self.name = spec.name
        self.format = spec.format
        self.generator = generator
        self.chat = chat
        self.context_length = int(context_length)
        self.vocab_size = int(vocab_size)
        self.eos_token_ids = eos_token_ids
        self.max_batch_size = max(1, int(max_batch_size))
        self._memory = int(memory_bytes)
        self._details = dict(details)
        self._jobs: dict[int, Any] = {}  # our job id -> the library's job
        self._info: dict[int, JobInfo] = {}
        self._cancelled: list[int] = []
        self._grammars = GrammarCompiler(chat.tokenizer, self.vocab_size, self.eos_token_ids)
        self._special = special_token_text(chat.tokenizer)
        self.speculative = SpeculativeStats()
        # held tokens are streamed by their own bytes, where the vocabulary spells them (exllama_stream.StreamHeld)
        scheme = piece_scheme(chat.tokenizer)
        self._stream_bytes = chat.token_bytes if scheme in (BYTE_LEVEL, SENTENCEPIECE) else None
        self._counts_lock = threading.Lock()
        self._prompt_tokens = 0
        self._cached_tokens = 0
        # prompt pages are reused only within a job's cache namespace (prefix_isolation.py)
        self.isolation = PrefixIsolation()

    def grammar(self, constraint: Constraint) -> str:
        """The llguidance grammar text for ``constraint`` (validated and cached on first use)."""
        self._grammars.compile(constraint, probe=False)  # on the step thread: serving probed it already
        return self._grammars.text_for(constraint)  # (the same token ids as exllamav3's own llguidance tokenizer)

    # -- engine thread ----------------------------------------------------------------
    #: the prefix_isolation mixin matching this library's job class
    isolation_mixin: type
    #: the exllama_sampling mixins for it, outermost first
    job_mixins: tuple[type, ...] = ()

    @abstractmethod
    def make_job(self, job: SequenceJob) -> Any:
        """The library's job object for ``job`` (identifier = our job id), of ``self.job_class(...)``."""

    @abstractmethod
    def page_size(self) -> int:
        """Tokens per cache page of the generator."""

    def kept(self, job: SequenceJob) -> Any:
        """The special tokens whose text ``job`` keeps (``ChatTokenizer.keeping``; None: none)."""
        return self.chat.keeping(job.keep_special) if job.keep_special else None

    def library_job(self, job: SequenceJob) -> SequenceJob:
        """``job`` as its library job is made: naming no markup when this vocabulary has none of it special (Qwen's
        ``<tool_call>``), so such a job does not ask the library for special tokens' text (``job_kwargs``)."""
        return job if not job.keep_special or self.kept(job) is not None else dataclasses.replace(job, keep_special=())

    def stream_bytes(self, job: SequenceJob) -> Any:
        """What spells ``job``'s held tokens (``exllama_stream.StreamHeld``): kept special tokens by their text."""
        kept = self.kept(job)
        return kept.token_bytes if kept is not None and self._stream_bytes is not None else self._stream_bytes

    def job_class(self, library_job: type) -> type:
        """``library_job`` with the cache-namespace hooks of ``isolation_mixin`` and the ``job_mixins``."""
        return isolated_job_class(self.isolation_mixin, library_job, *self.job_mixins)

    def add(self, job: SequenceJob) -> None:
        """Enqueue ``job``; the generator starts it at its next iteration."""
        native = self.make_job(job)
        native.xllm_bind(self.isolation, job.cache_namespace, self.page_size())
        self.generator.enqueue(native)
        self._jobs[job.job_id] = native
        self._info[job.job_id] = JobInfo(job.job_id, job.logprobs, job.top_logprobs, len(job.prompt_ids),
                                         kept=self.kept(job))

    def cancel(self, job_id: int) -> None:
        """Drop the job from the generator (its pages are freed now); its final event comes next step."""
        native = self._jobs.pop(job_id, None)
        self._info.pop(job_id, None)
        if native is not None:
            self.generator.cancel(native)
            self._cancelled.append(job_id)
            # the library reports draft counts only in a job's end-of-sequence result, which a job
            # cancelled (a stop string matched, the client left) never gets
            self.speculative.accepted += int(getattr(native, "accepted_draft_tokens", 0) or 0)
            self.speculative.rejected += int(getattr(native, "rejected_draft_tokens", 0) or 0)

    def active_jobs(self) -> int:
        """Jobs added and not yet finished (cancelled ones until their final event)."""
        return len(self._jobs) + len(self._cancelled)

    def admission_budget(self) -> int:
        """Cache pages free for new jobs: unreferenced pages not yet promised to jobs the generator
        has still to start. Admitting by pages keeps the generator's own queue (first come,
        first served) empty, so a user flooding the server cannot put jobs ahead of others there."""
        pending = sum(job.current_new_pages_required() for job in self.generator.pending_jobs)
        return self.free_pages() - pending

    def admission_cost(self, job: SequenceJob) -> int:
        """Cache pages ``job`` holds at most (prompt and answer; cached prompt pages count too), never
        more than the whole cache, so a job that is too big is refused by the library, not kept waiting."""
        return min(-(-self.tokens_held(job) // self.page_size()), self.total_pages())

    @abstractmethod
    def free_pages(self) -> int:
        """The generator's unreferenced cache pages."""

    @abstractmethod
    def total_pages(self) -> int:
        """The generator's cache pages."""

    @abstractmethod
    def tokens_held(self, job: SequenceJob) -> int:
        """Cache tokens the library allocates pages for when it starts ``job`` (its own formula)."""

    def step(self) -> list[TokenEvent]:
        """One generator iteration: prefill chunks of new jobs and one decode step for the rest.

        An error out of ``iterate()`` is not resumable (``drop_failed`` stays the base's None): the library
        prefills and decodes every job in that one call, so any job may be half advanced (pages taken,
        positions moved) and the engine fails the batch. A job the library fails itself is an ``error`` result.
        """
        events = [TokenEvent(job_id, None, "", finish=FinishReason.CANCELLED) for job_id in self._cancelled]
        self._cancelled.clear()
        if not self._jobs:
            return events
        results = self.generator.iterate()
        produced = translate_results(results, self._info, self._piece, self.speculative, self.page_size(),
                                     self._special, self.chat.token_bytes)
        for event in produced:
            info = self._info.get(event.job_id)
            if info is not None and info.cached is not None and not info.counted:
                # counted at the first token, when the prefix cache's share is known: a job the
                # engine cancels later (a stop string) still counts
                info.counted = True
                with self._counts_lock:
                    self._prompt_tokens += info.prompt_tokens
                    self._cached_tokens += info.cached
            if event.finish is not None:
                self._jobs.pop(event.job_id, None)
                self._info.pop(event.job_id, None)
        events.extend(produced)
        return events

    def _piece(self, token_id: int) -> str:
        # the token alone, by its bytes: decoded alone, a part of a character would be U+FFFD
        return token_text(self.chat.token_bytes(token_id))

    # -- any thread ---------------------------------------------------------------------
    def check_constraint(self, constraint: Constraint, *, param: str = "response_format") -> None:
        """Compile ``constraint`` now; InvalidRequest (400) if it is invalid."""
        self._grammars.compile(constraint, param=param)

    def prepare_constraints(self) -> None:
        """Build the grammar engine's tokenizer now (at load: GrammarCompiler says why)."""
        self._grammars.prepare()

    def memory_bytes(self) -> int:
        """GPU bytes the weights and the KV cache took when loaded (never negative: the measurement is a change
        in the process's GPU memory, which an unload during the load can blur)."""
        return max(0, self._memory)

    def details(self) -> dict[str, Any]:
        """Backend, batching mode, cache and speculative-decoding facts for /v1/models and `xllm ps`."""
        with self._counts_lock:
            prompt, cached = self._prompt_tokens, self._cached_tokens
        out = dict(self._details)
        out["prefix_cache"] = {"prompt_tokens": prompt, "cached_tokens": cached,
                               "hit_rate": round(cached / prompt, 4) if prompt else None, "scope": "per cache namespace"}
        if out.get("speculative"):
            spec = dict(out["speculative"])
            spec.update(accepted=self.speculative.accepted, rejected=self.speculative.rejected,
                        acceptance_rate=self.speculative.acceptance_rate)
            out["speculative"] = spec
        return out

    def unload(self) -> None:
        """Free the generator, cache and weights."""
        self._release()
        self._jobs.clear()
        self._info.clear()
        release_tokenizer(self.chat.tokenizer)  # kept a while: a reload (keep_alive ran out) reads nothing again
        free_cuda_memory()

    def _release(self) -> None:
        """Library-specific teardown (subclasses)."""
