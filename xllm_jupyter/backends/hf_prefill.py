"""The transformers model's prefill: new prompts in left-padded groups, and what a failed one leaves.

Each step prefills the jobs added since the last one (``hf_model.TransformersModel.step``) in
groups of similar length, before the running batch decodes. A group that runs out of memory
fails alone (events with ``out_of_memory``). Any other error in a group's prefill stops the
step before the running batch is touched (a prefill fills a cache of its own), so the step
can resume once the engine has blamed that group (``drop_failed``): the groups prefilled
before it keep their first tokens and join the batch, the jobs after it wait for the next
step, and the failed group is dropped. The resumed step returns what the failed one made first,
so a job prefilled then has two tokens in it. An error anywhere else is not resumable.

Jobs that ask for ``prompt_logprobs`` are prefilled in groups of their own, chunk by chunk,
scoring every prompt token (prompt_scoring.py); one with ``max_tokens`` 0 ends right there.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..core.types import FinishReason, TokenEvent
from .compile_gate import COMPILE_GATE, empty_cuda_cache
from .kv_batch import BatchKV, new_cache, zero_padding
from .prompt_scoring import SCORE_BYTES, PromptScores, chunk_positions, scored_forward

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Interrupted:
    """A step stopped by a failed prefill: what it made before, whose prefill failed, who is still to come."""

    events: list[TokenEvent]
    joined: list[tuple[Any, Any, list[Any]]]  # (cache, mask, seqs) of the groups prefilled before it
    failed: list[Any]
    rest: list[Any]  # new jobs not prefilled yet, in the order they came


class Prefill:
    """TransformersModel's prefill and its failed-step resume (a mixin: it works on the model's own state)."""

    #: set by a step that a prefill error stopped; ``drop_failed`` takes it
    _interrupted: Interrupted | None = None
    #: jobs may ask for ``prompt_logprobs`` (LoadedModel's flag)
    scores_prompts = True
    #: bytes of logits one scoring prefill chunk may hold (prompt_scoring.py)
    score_bytes = SCORE_BYTES

    def _prefill_new(self, new: list[Any], events: list[TokenEvent]) -> list[tuple[Any, Any, list[Any]]]:
        """Prefill ``new`` group by group; a group's error (not out of memory) leaves ``_interrupted`` and raises."""
        groups = prefill_groups(new)
        joined: list[tuple[Any, Any, list[Any]]] = []
        for at, group in enumerate(groups):
            try:
                joined.append(self._prefill_or_fail(group, events))
            except Exception:
                later = {id(s) for g in groups[at + 1:] for s in g}
                self._interrupted = Interrupted(events, joined, group, [s for s in new if id(s) in later])
                raise
        return joined

    def drop_failed(self, suspects: frozenset[int]) -> frozenset[int] | None:
        """After a step that raised: drop the group whose prefill failed if the engine suspects all of it, and
        resume the rest (None, the model emptied: the step failed elsewhere, or blames jobs it did not add now)."""
        interrupted, self._interrupted = self._interrupted, None
        blamed = frozenset(s.job.job_id for s in interrupted.failed) if interrupted is not None else frozenset()
        if not blamed or not blamed <= suspects:
            self._reset()
            return None
        try:
            with self._lora.lock, torch.inference_mode():
                self._join(interrupted.joined)  # prefilled: their first tokens are in the events kept below
        except Exception:
            log.exception("%s: resuming after a failed prefill failed", self.name)
            self._reset()
            return None
        self._pending.extendleft(reversed(interrupted.rest))
        self._carried = interrupted.events  # the next step returns them first
        if self.device.type == "cuda":  # what the failed forward had allocated goes back
            empty_cuda_cache()
        return blamed

    def _prefill_or_fail(self, seqs: list[Any], events: list[TokenEvent]):
        """``_prefill``; out of memory fails this group's jobs only (a long prompt must not end every stream)."""
        try:
            return self._prefill(seqs, events)
        except torch.OutOfMemoryError:
            log.warning("%s: out of memory prefilling %d prompt(s) of up to %d tokens; failing them", self.name,
                        len(seqs), max(len(s.job.prompt_ids) for s in seqs))
            events.extend(dataclasses.replace(self._event(seq, None, "", finish=FinishReason.ERROR), out_of_memory=True)
                          for seq in seqs)
            if self.device.type == "cuda":  # what the failed forward had allocated goes back before the decode
                empty_cuda_cache()
            return None, None, []

    def _prefill(self, seqs: list[Any], events: list[TokenEvent]):
        """One left-padded forward over new prompts; returns their cache for the unfinished ones."""
        lengths = [len(s.job.prompt_ids) for s in seqs]
        width = max(lengths)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - lengths[row]:] = torch.tensor(seq.job.prompt_ids, dtype=torch.long)
            mask[row, width - lengths[row]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = min(lengths) != width
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        scoring = [row for row, s in enumerate(seqs) if s.job.prompt_logprobs]
        scores = PromptScores(scoring, width, max(seqs[r].job.top_logprobs for r in scoring), ids.device) \
            if scoring else None

        def forward(start: int, end: int):
            out = self.model(input_ids=ids[:, start:end], attention_mask=mask[:, :end] if padded else None,
                             position_ids=positions[:, start:end], use_cache=True, logits_to_keep=1 if scores is None else 0,
                             **{self._cache_arg: cache})
            if padded and scores is not None and end < width:  # the next chunk attends over these columns (see zero_padding)
                zero_padding(cache, mask[:, :end])
            return out.logits

        with self._lora.forward([s.job.adapter for s in seqs]), COMPILE_GATE.forward():
            if scores is None:
                last, passes = forward(0, width)[:, -1, :], 1
            else:
                chunk = chunk_positions(len(seqs), len(scoring), self.vocab_size, self.score_bytes)
                last, passes = scored_forward(forward, ids, scores, chunk)
        self.forward_passes += passes
        if padded:
            zero_padding(cache, mask)
        mark = len(events)
        live = [row for row, s in enumerate(seqs) if s.job.max_tokens > 0]  # (0: the job only scores its prompt)
        keep = [live[i] for i in self._advance([seqs[r] for r in live], last[live], events)] if live else []
        events.extend(self._event(s, None, "", finish=FinishReason.LENGTH) for s in seqs if s.job.max_tokens <= 0)
        if scores is not None:
            self._attach_scores(scores, [seqs[r] for r in scoring], events, mark)
        if not keep:  # (every job ended here: score-only, or finished on its first token)
            return None, None, []
        if len(keep) != len(seqs):
            part = BatchKV()
            part.join(cache, mask, lengths)
            part.keep(keep)
            return part.cache, part.mask, [seqs[i] for i in keep]
        return cache, mask, seqs

    def _attach_scores(self, scores: PromptScores, seqs: list[Any], events: list[TokenEvent], mark: int) -> None:
        """Put each scoring job's ``PromptLogprobs`` on its event among ``events[mark:]`` (its first one)."""
        found = scores.results([s.job.prompt_ids for s in seqs], [s.job.top_logprobs for s in seqs],
                               self.chat.token_bytes)
        by_job = {s.job.job_id: lp for s, lp in zip(seqs, found)}
        for at in range(mark, len(events)):
            lp = by_job.get(events[at].job_id)
            if lp is not None:
                events[at] = dataclasses.replace(events[at], prompt_logprobs=lp)


def prefill_groups(seqs: list[Any]) -> list[list[Any]]:
    """Split new jobs into prefill batches so padding stays under about a third of the work; jobs that score
    their prompts go in groups of their own (their prefill keeps every position's logits)."""
    scoring = [s for s in seqs if s.job.prompt_logprobs]
    if scoring:
        return _by_length([s for s in seqs if not s.job.prompt_logprobs]) + _by_length(scoring)
    return _by_length(seqs)


def _by_length(seqs: list[Any]) -> list[list[Any]]:
    ordered = sorted(seqs, key=lambda s: len(s.job.prompt_ids))
    groups: list[list[Any]] = []
    for seq in ordered:
        if groups:
            group = groups[-1]
            n = len(seq.job.prompt_ids)  # the longest so far: the list is sorted
            real = sum(len(s.job.prompt_ids) for s in group) + n
            if (len(group) + 1) * n <= 1.5 * real + 32:
                group.append(seq)
                continue
        groups.append([seq])
    return groups
