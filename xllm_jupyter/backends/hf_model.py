"""A loaded HF transformers model serving a continuous batch, one token per job per step.

Each ``step`` prefills the jobs added since the last step (left-padded, batched; ``hf_prefill.py``,
which also resumes a step that a prefill's error stopped), runs one batched decode forward for
the jobs already running, then merges the new jobs' KV into the running batch
(``kv_batch.BatchKV``). Rows leave the batch in the step they finish. With compiled decoding (``hf_compiled.py``; engine.compile, on by default for
fp16/bf16 safetensors on CUDA) the running batch is instead a preallocated slot cache and
the decode step a compiled (CUDA graph) forward; prefill and sampling are the same.
``transformers.TransformersBackend`` loads the weights and builds it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..core import gc_freeze
from ..core.errors import ContextLengthExceeded, EngineError, InvalidRequest, ModelNotFound
from ..core.types import Constraint, FinishReason, SequenceJob, TokenEvent
from .base import LoadedModel, ModelSpec
from .compile_gate import COMPILE_GATE, empty_cuda_cache
from .constraints import BatchMasker, GrammarCompiler
from .detokenize import IncrementalDetokenizer, PieceDecoder, token_text
from .hf_compiled import DECODE_EAGER, DECODE_STATIC, StaticBatch, StaticPlan
from .hf_tokenizer import ChatTokenizer, ChatTokenizerMethods
from .hf_prefill import Prefill
from .kv_batch import BatchKV, cache_argument
from .lora import LoraAdapters
from .sampling import JobSampler, sample
from .tokenizer_files import release as release_tokenizer

log = logging.getLogger(__name__)

#: KV tokens an eager batch on a GPU may claim when engine.cache_tokens is 0 (exllama's default cache size)
EAGER_GPU_KV_TOKENS = 65536


def _eos_ids(model, chat: ChatTokenizer) -> frozenset[int]:
    """EOS ids from generation config, model config and tokenizer, plus end-of-turn tokens."""
    return chat.eos_ids(getattr(model.generation_config, "eos_token_id", None),
                        getattr(model.config.get_text_config(), "eos_token_id", None))


class _Seq:
    """A job's decoding state while it is queued or in the batch."""

    __slots__ = ("job", "sampler", "detok", "completion", "last", "top_n", "matcher", "spell")

    def __init__(self, job: SequenceJob, sampler: "JobSampler", detok: IncrementalDetokenizer,
                 matcher: Any = None, spell: Any = None) -> None:
        self.job = job
        self.spell = spell  # a token's own bytes for logprobs (None: the tokenizer's; KeptSpecials.token_bytes)
        self.matcher = matcher  # llguidance LLMatcher when the job has a constraint
        self.sampler = sampler
        self.detok = detok
        self.completion = 0
        self.last = -1  # the sampled token not yet fed to the model
        self.top_n = job.top_logprobs if job.logprobs else None


class TransformersModel(ChatTokenizerMethods, Prefill, LoadedModel):
    """A transformers model decoding a continuous batch of jobs, one token per job per step."""

    backend_name = "transformers"

    def __init__(self, spec: ModelSpec, model, tokenizer, *, device, max_batch_size: int = 16,
                 static: "StaticPlan | None" = None, kv_tokens: int | None = None) -> None:
        self.name = spec.name
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.format = spec.format
        self.max_batch_size = max(1, max_batch_size)
        text_config = model.config.get_text_config()
        self.context_length = int(spec.context_length or getattr(text_config, "max_position_embeddings", 0) or 2048)
        self.chat = ChatTokenizer(tokenizer, spec.name)
        self._pieces = PieceDecoder(self._decode_piece)  # the jobs' detokenizers share its memory
        self.eos_token_ids = _eos_ids(model, self.chat)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self._cache_arg = cache_argument(model)
        self._pending: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # row i of the batch is _running[i]
        self._cancelled: set[int] = set()
        self._carried: list[TokenEvent] = []  # events of a step a failed prefill stopped (hf_prefill.py)
        self._batch: BatchKV | StaticBatch = BatchKV()
        #: prompt + answer tokens the eager batch's jobs may claim together (None: the batch size only)
        self.kv_tokens = kv_tokens
        if static is not None:
            # the slot cache is allocated whole: its length bounds every sequence
            self.context_length = static.slot_tokens(self.context_length, self.max_batch_size)
            self._batch = StaticBatch(model, device, slots=self.max_batch_size, tokens=self.context_length,
                                      compile_backend=static.compile_backend)
        self._adapters_seen = False  # LoRA hooks stay on the model once attached: no compiled graph then
        self._grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_token_ids)
        self._masker: BatchMasker | None = None  # created with the first constrained job
        self._lora = LoraAdapters(model, device)
        self._weight_bytes = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
        #: jobs in the most recent decode forward pass (tests and stats)
        self.last_batch_size = 0
        #: decode forward passes that carried more than one job
        self.batched_steps = 0
        #: model forward passes run (prefill and decode)
        self.forward_passes = 0

    @property
    def decode_mode(self) -> str:
        """How decode steps run: ``compiled-static``, ``static`` (slot cache, eager) or ``eager``."""
        if not isinstance(self._batch, StaticBatch):
            return DECODE_EAGER
        return DECODE_STATIC if self._adapters_seen else self._batch.mode

    def warm_up(self) -> None:
        """Compile the decode step for every batch width now (no-op unless compiled)."""
        if isinstance(self._batch, StaticBatch):
            with torch.inference_mode():
                self._batch.warm_up(self._pad_id, self.name)

    def check_constraint(self, constraint: Constraint, *, param: str = "response_format") -> None:
        """Compile ``constraint`` into the grammar cache (any thread); InvalidRequest (400) if invalid."""
        self._grammars.compile(constraint, param=param)

    def prepare_constraints(self) -> None:
        """Build the grammar engine's tokenizer now (at load: GrammarCompiler says why)."""
        self._grammars.prepare()

    def _decode_piece(self, ids: Sequence[int]) -> str:
        return self.chat.decode_piece(ids)

    # -- scheduling (engine thread) ---------------------------------------------------

    def add(self, job: SequenceJob) -> None:
        """Queue ``job``; its prefill runs in the next step that has room in the batch."""
        if not job.prompt_ids:
            raise InvalidRequest("The prompt is empty", param="prompt")
        if job.max_tokens < (0 if job.prompt_logprobs else 1):  # (0: the job only scores its prompt)
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if job.adapter is not None and job.adapter not in self._lora:
            raise ModelNotFound(job.adapter)
        if len(job.prompt_ids) >= self.context_length:
            raise ContextLengthExceeded(f"The prompt has {len(job.prompt_ids)} tokens; this model's context "
                                        f"is {self.context_length} tokens", param="messages")
        sampler = JobSampler(job.sampling, job.prompt_ids, self.vocab_size, self.device)
        matcher = None
        if job.constraint is not None:
            matcher = self._grammars.new_matcher(job.constraint)
            if self._masker is None:
                self._masker = BatchMasker(self.vocab_size)
        kept = self.chat.keeping(job.keep_special) if job.keep_special else None  # (tool markup: ChatTokenizer.keeping)
        detok = IncrementalDetokenizer(kept.decode if kept else self._pieces, job.prompt_ids)
        self._pending.append(_Seq(job, sampler, detok, matcher, kept.token_bytes if kept else None))

    def cancel(self, job_id: int) -> None:
        """Mark ``job_id`` cancelled; the next step drops it (no-op when unknown or finished)."""
        if any(s.job.job_id == job_id for s in self._running) or any(s.job.job_id == job_id for s in self._pending):
            self._cancelled.add(job_id)

    def active_jobs(self) -> int:
        """Jobs queued or running."""
        return len(self._pending) + len(self._running)

    def step(self) -> list[TokenEvent]:
        """Prefill new jobs (first token each), decode one token for every running job.

        If a forward pass fails, EngineError is raised. A prefill's error leaves the running batch as it
        was, and ``drop_failed`` can drop that prefill's jobs and resume (hf_prefill.py); any other failure
        drops every queued and running job: the engine fails them all.
        """
        if self._interrupted is not None:  # (a caller that did not call drop_failed after the failure)
            self.drop_failed(frozenset())
        try:
            with self._lora.lock:  # adapters attach and detach only between steps
                return self._step()
        except Exception as exc:
            if self._interrupted is None:
                self._reset()
            raise EngineError("The transformers backend failed during a generation step") from exc

    def _step(self) -> list[TokenEvent]:
        events, self._carried = self._carried, []
        with torch.inference_mode():
            if self._cancelled:
                self._drop_cancelled(events)
            new = self._admit()
            joined = self._prefill_new(new, events) if new else []
            if self._running:
                self._decode(events)
            self._join(joined)
        return events

    def _join(self, joined: list) -> None:
        """Add prefilled groups' rows to the running batch."""
        for cache, mask, seqs in joined:
            if seqs:
                self._batch.join(cache, mask, [len(s.job.prompt_ids) for s in seqs],
                                 [self.admission_cost(s.job) for s in seqs])
                self._running.extend(seqs)  # rows are appended in the same order as the batch's

    def _reset(self) -> None:
        """Drop every queued and running job (after a failed step the batch cannot resume)."""
        self._pending.clear()
        self._running.clear()
        self._cancelled.clear()
        self._carried = []
        self._interrupted = None
        self._batch.clear()

    def admission_check(self) -> Callable[[SequenceJob], bool] | None:
        """Admit jobs while the batch's KV cache stays within ``kv_tokens`` (eager decoding with a budget).

        The batch is left-padded to its longest row, so its cache is rows x the longest claim
        (prompt + the most the answer may add), not the sum of the claims: one long job beside
        fifteen short ones takes sixteen long rows. Without a budget the eager cache grows with
        every job the batch size lets in (16 rows of a 128k-context model would claim far more GPU
        memory than a card has). An idle model takes the next job whatever it claims.
        """
        if self.kv_tokens is None:
            return None
        claims = [self.admission_cost(s.job) for s in (*self._pending, *self._running)]
        rows, longest, budget = len(claims), max(claims, default=0), self.kv_tokens

        def fits(job: SequenceJob) -> bool:
            nonlocal rows, longest
            widest = max(longest, self.admission_cost(job))
            if rows and (rows + 1) * widest > budget:
                return False
            rows, longest = rows + 1, widest
            return True

        return fits

    def admission_cost(self, job: SequenceJob) -> int:
        """The prompt and the most the answer may add, within the context: the row's widest claim."""
        return min(len(job.prompt_ids) + job.max_tokens, self.context_length)

    def _admit(self) -> list[_Seq]:
        room = self.max_batch_size - len(self._running)
        new: list[_Seq] = []
        while self._pending and len(new) < room:
            new.append(self._pending.popleft())
        return new

    def _drop_cancelled(self, events: list[TokenEvent]) -> None:
        gone = self._cancelled
        self._cancelled = set()
        for seq in [s for s in self._pending if s.job.job_id in gone]:
            self._pending.remove(seq)
            events.append(self._event(seq, None, "", finish=FinishReason.CANCELLED))
        keep = []
        for i, seq in enumerate(self._running):
            if seq.job.job_id in gone:
                events.append(self._event(seq, None, "", finish=FinishReason.CANCELLED))
            else:
                keep.append(i)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]
            self._batch.keep(keep)

    def _decode(self, events: list[TokenEvent]) -> None:
        """One batched forward feeding every running job its last token."""
        last = [s.last for s in self._running]
        adapters = [s.job.adapter for s in self._running]
        if isinstance(self._batch, StaticBatch):
            adapters = self._batch.by_slot(adapters, None)  # the forward's rows are slots
        with self._lora.forward(adapters):
            if isinstance(self._batch, StaticBatch):
                logits = self._batch.forward(last, self._pad_id, eager=self._adapters_seen)
            else:
                attn, positions = self._batch.step_inputs()
                ids = torch.tensor(last, dtype=torch.long, device=self.device).unsqueeze(1)
                with COMPILE_GATE.forward():
                    out = self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                                     **{self._cache_arg: self._batch.cache})
                logits = out.logits[:, -1, :]
        self.forward_passes += 1
        self.last_batch_size = len(self._running)
        if self.last_batch_size > 1:
            self.batched_steps += 1
        nonfinite: list[int] = []
        keep = self._advance(self._running, logits, events, nonfinite)
        if nonfinite and isinstance(self._batch, StaticBatch):
            # their NaN/inf keys stay in the slot, and masked columns still reach attention's sum (0 * NaN):
            # the slot's next occupant would fail too (slot_cache.py)
            self._batch.scrub(nonfinite)
        self._keep_rows(keep)

    def _advance(self, seqs: list[_Seq], logits, events: list[TokenEvent], nonfinite: list[int] | None = None
                 ) -> list[int]:
        """Sample one token per row, emit events; return the rows that keep going (``nonfinite`` gets the rows
        whose logits were not finite)."""
        constrained = [row for row, s in enumerate(seqs) if s.matcher is not None] if self._masker else ()
        if constrained:
            # disallowed tokens go to -inf before any sampling step, so greedy and sampled
            # rows alike can only pick what the grammar allows
            self._masker.apply(logits, constrained, [seqs[row].matcher for row in constrained])
        result = sample(logits, [s.sampler for s in seqs], [s.top_n for s in seqs])
        bad = set(result.bad_rows)
        keep: list[int] = []
        for row, (seq, token) in enumerate(zip(seqs, result.token_ids)):
            try:  # what one job's row does must not fail the others (the forward pass is done)
                if row in bad:  # this job fails alone; the rest of the batch goes on
                    if nonfinite is not None:
                        nonfinite.append(row)
                    events.append(self._unsampleable(seq))
                    continue
                seq.completion += 1
                lp = result.logprobs.get(row)
                job = seq.job
                grammar_done = False
                if seq.matcher is not None:
                    if not seq.matcher.consume_token(token):
                        # only reachable when the matcher itself failed (e.g. a parser limit):
                        # this job fails alone, the batch goes on
                        events.append(self._constraint_failed(seq))
                        continue
                    grammar_done = seq.matcher.is_stopped()
                if token in job.stop_token_ids:  # its own text is none; a held incomplete character is U+FFFD
                    events.append(self._event(seq, token, seq.detok.flush(), lp, FinishReason.STOP))
                    continue
                text = seq.detok.push(token)
                if grammar_done:  # the grammar allows nothing more: a normal stop, like EOS
                    events.append(self._event(seq, token, text + seq.detok.flush(), lp, FinishReason.STOP))
                    continue
                if seq.completion >= job.max_tokens or len(job.prompt_ids) + seq.completion >= self.context_length:
                    events.append(self._event(seq, token, text + seq.detok.flush(), lp, FinishReason.LENGTH))
                    continue
                seq.sampler.observe(token)
                seq.last = token
                events.append(self._event(seq, token, text, lp))
                keep.append(row)
            except Exception:
                log.exception("%s: job %s failed after its forward pass; failing it alone", self.name, seq.job.job_id)
                events.append(self._event(seq, None, "", finish=FinishReason.ERROR))
        return keep

    def _unsampleable(self, seq: _Seq) -> TokenEvent:
        """The ERROR event of a job whose logits had nothing to sample (NaN or inf, or all masked)."""
        if seq.matcher is not None and seq.matcher.is_error():  # the grammar allowed nothing: its own failure
            return self._constraint_failed(seq)
        # fp16 overflow, typically (a bf16-trained model run in float16): argmax would pick garbage
        log.warning("%s: non-finite logits for job %s; failing it", self.name, seq.job.job_id)
        return dataclasses.replace(
            self._event(seq, None, "", finish=FinishReason.ERROR),
            error="The model produced non-finite logits (a numeric overflow: try engine.dtype bfloat16 or float32)")

    def _constraint_failed(self, seq: _Seq) -> TokenEvent:
        """The ERROR event of a job whose grammar failed (e.g. a limit of the grammar engine): its request's fault."""
        reason = " ".join(str(seq.matcher.get_error()).split())[:300]
        log.info("%s: constraint failed for job %s: %s", self.name, seq.job.job_id, reason)
        return dataclasses.replace(self._event(seq, None, "", finish=FinishReason.ERROR), constraint_error=reason)

    def _event(self, seq: _Seq, token: int | None, text: str, lp=None, finish: FinishReason | None = None
               ) -> TokenEvent:
        counts = {} if finish is None else {"prompt_tokens": len(seq.job.prompt_ids),
                                            "completion_tokens": seq.completion}
        if lp is None:
            return TokenEvent(job_id=seq.job.job_id, token_id=token, text=text, finish=finish, **counts)
        # logprobs describe each token by its own bytes: decoded alone, a part of a character is U+FFFD
        spell = seq.spell or self.chat.token_bytes
        top_bytes = tuple(spell(i) for i, _ in lp[1])
        top = tuple((token_text(raw), v) for raw, (_, v) in zip(top_bytes, lp[1]))
        return TokenEvent(job_id=seq.job.job_id, token_id=token, text=text, logprob=lp[0], top_logprobs=top,
                          finish=finish, token_bytes=None if token is None else spell(token), top_bytes=top_bytes,
                          **counts)

    # -- resources --------------------------------------------------------------------

    def load_adapter(self, name: str, path: Path) -> None:
        """Attach the peft LoRA at ``path`` as ``name``; rows naming it decode with it (waits for the step)."""
        with self._lora.lock:
            self._lora.attach(name, Path(path))
            self._adapters_seen = True

    def unload_adapter(self, name: str) -> bool:
        """Detach adapter ``name``; its queued and running jobs end (cancelled) in the next step."""
        with self._lora.lock:
            users = [s.job.job_id for s in (*self._pending, *self._running) if s.job.adapter == name]
            if not self._lora.detach(name):
                return False
            self._cancelled.update(users)  # their rows must never reach a forward pass without it
            return True

    def memory_bytes(self) -> int:
        """Weights and buffers plus LoRA adapters and the batch's KV cache, in bytes."""
        return self._weight_bytes + self._lora.nbytes() + self._batch.nbytes()

    def details(self) -> dict[str, Any]:
        """Device, dtype, batching mode and source format."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.") if self.model is not None else None
        return {"device": str(self.device), "dtype": dtype, "mode": "continuous-batching", "format": self.format,
                "decode": self.decode_mode, **self._static_details(),
                **({"adapters": self._lora.names()} if self._lora.names() else {})}

    def _static_details(self) -> dict[str, Any]:
        # how the slot cache decodes: attention function, and whether compiled steps skip their guard checks
        if not isinstance(self._batch, StaticBatch) or self.model is None:
            return {}
        decoder = self._batch.decoder
        return {"attention": self.model.config.get_text_config()._attn_implementation,
                **({"guard_checks": "skipped" if decoder.skips_guards else "checked"} if decoder.compiled else {})}

    def unload(self) -> None:
        """Drop weights, cache and queued jobs; the object is unusable afterwards."""
        full = gc_freeze.is_frozen(self.model)  # unfrozen since its load: a plain collection frees its cycles
        if isinstance(self._batch, StaticBatch):
            self._batch.release()  # dynamo would keep its compiled graphs (CUDA graphs, memory pool) alive
        self._batch = BatchKV()  # also drops a slot cache and its compiled step
        self._pending.clear()
        self._running.clear()
        self.model = None
        # these hold the model too: the weights must be unreferenced before the collect below frees them
        self._lora = LoraAdapters(None, self.device)  # (empty: details and memory still answer)
        self._masker = None
        release_tokenizer(self.chat.tokenizer)  # kept a while: a reload (keep_alive ran out) reads nothing again
        gc_freeze.collect(full)  # (unfreezes first where a freeze caught the model, cycles and all)
        if self.device.type == "cuda":
            empty_cuda_cache()

