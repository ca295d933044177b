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
  the transformers backend's order), then ``logit_bias``, top-k, top-p and min-p
  (``LogitsV2``); the library's sampler only applies the temperature and draws. Its own
  top-p keeps the tokens whose mass stays within P, leaving out the token that crosses it
  (exllamav2 0.3.2, ``top_p_cpu``), where OpenAI and HF keep it, and it adds the bias after
  our penalties could see it.

Sampling order (``v3_sampler_steps``): exllamav3's ``ComboSampler`` adds ``logit_bias``
before the repetition penalty and cuts min-p before top-p, whose mass it then counts over what
min-p kept (1.6.5 ``sampler/presets.py``); the steps are built here in the transformers
backend's order instead (``sampling.py``).

Logprobs: exllamav3 reports probabilities from the model's logits (a softmax before any
sampling step), as our transformers backend does. exllamav2 reports its sampler's *final*
probabilities, after temperature and truncation: under greedy decoding (top-k 1) every token
has logprob 0 and no alternatives. ``RawLogprobsV2`` replaces them with the softmax of the
logits as the model gave them.
"""

from __future__ import annotations

from typing import Any

from ..core.types import SamplingParams
from .exllama_common import V2_MIN_TEMPERATURE

#: the smallest top-p honoured (as ``sampling.Filters``: top_p <= 0 keeps the top token, not none)
MIN_TOP_P = 1e-6
#: the smallest temperature handed to exllamav3: its temperature step divides float32 logits in place (30 over 1e-38
#: is +inf, and the softmax after it NaN: any token) and its fused kernel multiplies by 1/T (inf past ~3e-39, and
#: 0 * inf at the top logit); below this every logit gap a float32 can hold still decides, as at any tinier one
V3_MIN_TEMPERATURE = 1e-30


def v3_sampler_steps(s: SamplingParams) -> list[tuple[str, tuple[Any, ...]]]:
    """exllamav3 sampler steps, as (class name in ``exllamav3.generator.sampler.custom``, arguments), that sample
    ``s`` as the transformers backend does: repetition, presence/frequency, ``logit_bias``; then argmax, or
    temperature, top-k, top-p, min-p and a draw.

    Steps at their neutral values become no-ops in the library's ``CustomSampler``. Min-p goes before top-k
    where top-p or min-p is off (then the order does not matter), so the library still fuses the truncation
    into one kernel: its fused tail takes the filters in the order (min-p, top-k, top-p) only.
    """
    head: list[tuple[str, tuple[Any, ...]]] = [
        ("SS_RepP", (float(s.repetition_penalty),)),
        ("SS_PresFreqP", (float(s.presence_penalty), float(s.frequency_penalty))),
        ("SS_LogitBias", ({int(k): float(v) for k, v in s.logit_bias.items()},)),
    ]
    if s.greedy:
        return [*head, ("SS_Argmax", ())]
    top_p, min_p = min(max(float(s.top_p), MIN_TOP_P), 1.0), min(max(float(s.min_p), 0.0), 1.0)
    cuts: list[tuple[str, tuple[Any, ...]]] = [("SS_TopK", (max(0, int(s.top_k)),)), ("SS_TopP", (top_p,))]
    temperature = max(float(s.temperature), V3_MIN_TEMPERATURE)
    if top_p == 1.0 or min_p == 0.0:
        return [*head, ("SS_Temperature", (temperature,)), ("SS_MinP", (min_p,)), *cuts, ("SS_Sample", ())]
    # step by step (not fusable): a first SS_Sort copies the logits. Were the temperature first, it would divide
    # float32 logits in place (SS_Temperature on its INIT state), and the job's logprobs, a softmax of the same
    # tensor taken after sampling, would be the tempered distribution's (exllamav3 1.6.5 ``Job.receive_logits``)
    return [*head, ("SS_Sort", ()), ("SS_Temperature", (temperature,)), *cuts, ("SS_MinP", (min_p,)),
            ("SS_Sample", ())]


def v3_sampler(s: SamplingParams) -> Any:
    """The exllamav3 ``CustomSampler`` of ``v3_sampler_steps(s)``."""
    from exllamav3.generator.sampler import CustomSampler, custom

    return CustomSampler([getattr(custom, name)(*args) for name, args in v3_sampler_steps(s)])


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


class LogitsV2:
    """Mixed into exllamav2's job after ``AnswerPenaltiesV2``: ``logit_bias``, then top-k, top-p and min-p on the
    tempered distribution as the transformers backend cuts it (``sampling.filter_logits``); the library's sampler
    is left the temperature and the draw (``exllama_common.v2_sampler_fields``)."""

    xllm_bias: tuple[Any, Any] | None = None  # (token ids, values)
    xllm_filters: Any = None  # sampling.Filters, or None when nothing is cut
    xllm_temperature = 1.0
    xllm_divide = False  # a temperature the library would take for greedy decoding: the job divides by it
    xllm_vocab = 0

    def xllm_bind_logits(self, sampling: SamplingParams, vocab_size: int) -> None:
        """Take over ``sampling``'s bias and truncation (the library's settings must have them off)."""
        import torch

        from .sampling import Filters

        self.xllm_vocab = int(vocab_size)
        if sampling.logit_bias:
            ids = torch.tensor([int(t) for t in sampling.logit_bias], dtype=torch.long)
            # (float32 whatever torch's process-wide default: a model load elsewhere may have it at bf16)
            self.xllm_bias = (ids, torch.tensor([float(v) for v in sampling.logit_bias.values()], dtype=torch.float32))
        filters = Filters.of([sampling], self.xllm_vocab)
        if not sampling.greedy:
            self.xllm_temperature = float(sampling.temperature)
            # (the library's settings then say 1.0: exllama_common.v2_sampler_fields)
            self.xllm_divide = self.xllm_temperature < V2_MIN_TEMPERATURE
            if filters.truncates(0) or filters.min_p[0] > 0:
                self.xllm_filters = filters

    def receive_logits(self, logits: Any, *args: Any, **kwargs: Any) -> Any:
        """Bias and cut every row in place (the library samples from that buffer), then sample (library)."""
        if self.xllm_bias is not None or self.xllm_filters is not None or self.xllm_divide:
            self.xllm_apply(logits)
        return super().receive_logits(logits, *args, **kwargs)  # type: ignore[misc]

    def xllm_apply(self, logits: Any) -> None:
        """Bias, then drop (-inf) what top-k/top-p/min-p drop at the sampling temperature, on every row; a
        temperature the library would not sample at is applied here."""
        import torch

        from .sampling import filter_logits

        for row in _rows(logits):
            if self.xllm_bias is not None:
                row.index_add_(0, self.xllm_bias[0].to(row.device), self.xllm_bias[1].to(row.device, row.dtype))
            if self.xllm_filters is None and not self.xllm_divide:
                continue
            real = row[: self.xllm_vocab]  # the rest is padding to a multiple of 32: no token
            # shifted by the row's largest logit (the same distribution, and what the library's softmax does
            # too): divided as they are by a tiny temperature (1e-38), logits overflow float32 to +inf, and
            # inf - inf is NaN in the softmax of the cuts and of the library's draw
            top = real.max()
            shift = top if bool(torch.isfinite(top)) else 0.0
            if self.xllm_filters is not None:
                kept = filter_logits(((real.float() - shift) / self.xllm_temperature).unsqueeze(0),
                                     self.xllm_filters)[0]
                real.masked_fill_(~torch.isfinite(kept), float("-inf"))
            row[self.xllm_vocab:] = float("-inf")  # (padding past the maximum would overflow in its place)
            if self.xllm_divide:
                real.sub_(shift).div_(self.xllm_temperature)


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
