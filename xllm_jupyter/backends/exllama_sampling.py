"""OpenAI presence/frequency penalties over the answer only, and logprobs of the model's own
distribution, inside the exllama libraries' jobs.

Both libraries' samplers count the prompt as well as the answer for presence and frequency
penalties (one window of recent tokens that starts in the prompt). OpenAI, and our
transformers backend (``sampling.py``), count generated tokens only: with a long system
prompt, ``presence_penalty: 0.6`` would otherwise push down every word the prompt used. These
mixins are combined with the library's job class at ``make_job`` time (``exllama_model.py``):

* exllamav3: the sampler's presence/frequency step keeps its own window length, which we
  set to the tokens generated so far before each sampling (``prepare_sampling_past_ids`` runs
  before every sampled position, draft positions included); repetition keeps the whole
  sequence (HF semantics), as the library's step does.
* exllamav2: one window serves all three penalties there, so the job applies them to the
  logits itself (repetition over prompt and answer, then presence/frequency over the answer,
  the transformers backend's order) and the library's sampler adds ``logit_bias`` after.

Logprobs: exllamav3 reports probabilities from the model's logits (a softmax before any
sampling step), as our transformers backend does. exllamav2 reports its sampler's *final*
probabilities, after temperature and truncation: under greedy decoding (top-k 1) every token
has logprob 0 and no alternatives. ``RawLogprobsV2`` replaces them with the softmax of the
logits as the model gave them.
"""

from __future__ import annotations

from typing import Any

from ..core.types import SamplingParams


class AnswerPenaltiesV3:
    """Mixed into exllamav3's ``Job``: presence/frequency penalties see generated tokens only."""

    xllm_prompt_length = 0
    xllm_answer_steps: tuple[Any, ...] = ()

    def xllm_bind_penalties(self, prompt_length: int) -> None:
        """Find the sampler's presence/frequency step (absent when both penalties are 0)."""
        from exllamav3.generator.sampler.custom import SS_PresFreqP

        self.xllm_prompt_length = int(prompt_length)
        steps = getattr(self.sampler, "steps", ())  # type: ignore[attr-defined]
        self.xllm_answer_steps = tuple(s for s in steps if type(s) is SS_PresFreqP)

    def prepare_sampling_past_ids(self, *args: Any, **kwargs: Any) -> Any:
        """Narrow the penalty window to the answer, then stage the past ids (library)."""
        if self.xllm_answer_steps:
            answer = max(0, len(self.sequences[0].sequence_ids) - self.xllm_prompt_length)  # type: ignore[attr-defined]
            for step in self.xllm_answer_steps:
                step.sustain_range = answer
                step.decay_range = 0
        return super().prepare_sampling_past_ids(*args, **kwargs)  # type: ignore[misc]


class AnswerPenaltiesV2:
    """Mixed into exllamav2's ``ExLlamaV2DynamicJob``: applies the penalties to the logits itself."""

    xllm_penalties: tuple[float, float, float] | None = None  # repetition, presence, frequency
    xllm_prompt_length = 0

    def xllm_bind_penalties(self, prompt_length: int, sampling: SamplingParams) -> None:
        """Take over the penalties ``sampling`` sets (the library's sampler must have them off)."""
        self.xllm_prompt_length = int(prompt_length)
        rep, pres, freq = float(sampling.repetition_penalty), float(sampling.presence_penalty), float(
            sampling.frequency_penalty)
        self.xllm_penalties = (rep, pres, freq) if (rep != 1.0 or pres or freq) else None

    def receive_logits(self, logits: Any, *args: Any, **kwargs: Any) -> Any:
        """Penalize (in place, as the library's own sampler does), then sample (library)."""
        if self.xllm_penalties is not None:
            self.xllm_penalize(logits)
        return super().receive_logits(logits, *args, **kwargs)  # type: ignore[misc]

    def xllm_penalize(self, logits: Any) -> None:
        """Repetition over prompt and answer, then presence/frequency over the answer, on every row."""
        import torch

        from .sampling import apply_presence_frequency, apply_repetition_penalty

        rep, pres, freq = self.xllm_penalties  # type: ignore[misc]
        vocab = logits.shape[-1]
        ids = self.sequences[0].sequence_ids.torch().reshape(-1).to(torch.long)  # type: ignore[attr-defined]
        answer = ids[self.xllm_prompt_length:]
        seen = torch.unique(ids[ids < vocab]) if rep != 1.0 else None
        answer = answer[answer < vocab]
        counted = torch.unique(answer, return_counts=True) if (pres or freq) and answer.numel() else None
        # rows by indexing, never reshape: the library hands a strided slice of its logits buffer,
        # and the penalties must land in that buffer
        for row in _rows(logits):
            if seen is not None:
                apply_repetition_penalty(row, seen.to(row.device), rep)
            if counted is not None:
                apply_presence_frequency(row, counted[0].to(row.device), counted[1].to(row.device), pres, freq)


class RawLogprobsV2:
    """Mixed into exllamav2's job (before ``AnswerPenaltiesV2``): logprobs from the model's logits."""

    xllm_vocab_size = 0

    def xllm_bind_logprobs(self, vocab_size: int) -> None:
        """The real vocabulary (the logits are padded to a multiple of 32 past it)."""
        self.xllm_vocab_size = int(vocab_size)

    def receive_logits(self, logits: Any, *args: Any, **kwargs: Any) -> Any:
        """Softmax of the logits before penalties and sampling touch them; the library's sample, with the token's
        probability and the top alternatives taken from that softmax."""
        if not (self.return_probs or self.return_top_tokens > 0):  # type: ignore[attr-defined]
            return super().receive_logits(logits, *args, **kwargs)  # type: ignore[misc]
        import torch

        raw = logits.float().clone()  # (1, 1, padded vocab); the sampler works on ``logits`` in place
        if 0 < self.xllm_vocab_size < raw.shape[-1]:
            raw[..., self.xllm_vocab_size:] = float("-inf")
        probs = torch.softmax(raw, dim=-1)
        token, top_tokens, top_probs, prob, end_filter = super().receive_logits(logits, *args, **kwargs)  # type: ignore[misc]
        # (a filter that leaves one token makes the library skip its distribution: shapes tell)
        if self.return_probs and prob is not None and prob.numel() == token.numel():  # type: ignore[attr-defined]
            prob = torch.gather(probs.reshape(token.shape[0], -1), 1, token).reshape(prob.shape).to(prob.dtype)
        k = int(self.return_top_tokens)  # type: ignore[attr-defined]
        if k > 0 and top_tokens is not None and top_tokens.numel() == k * token.numel():
            best = torch.topk(probs, k, dim=-1)
            top_tokens = best.indices.reshape(top_tokens.shape).to(top_tokens.dtype)
            top_probs = best.values.reshape(top_probs.shape).to(top_probs.dtype)
        return token, top_tokens, top_probs, prob, end_filter


def _rows(logits: Any) -> list[Any]:
    """Views of every (vocab,) row of a logits tensor of any rank."""
    if logits.dim() == 1:
        return [logits]
    return [row for part in logits for row in _rows(part)]
