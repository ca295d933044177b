"""Per-job logits processing and sampling for batched decoding (torch).

Order of operations, per row (the same order HF ``generate`` uses, with the OpenAI
penalties next to HF's repetition penalty):

1. repetition penalty (HF: over prompt + generated ids; positive logits divided,
   negative multiplied), then presence/frequency penalties (OpenAI: over generated ids
   only), then ``logit_bias``;
2. greedy rows take the argmax here;
3. sampled rows: temperature, top-k, top-p, min-p, then a draw from the softmax.

Each job owns a ``torch.Generator`` seeded once, and its random draw uses only that
generator, so a seeded job samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..core.errors import InvalidRequest
from ..core.types import SamplingParams

NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF repetition penalty in place on a (V,) row: seen logits > 0 are divided, others multiplied."""
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI penalties in place on a (V,) row: ``-= frequency * count + presence * (count > 0)``."""
    if frequency:
        logits.sub_(counts * frequency)
    if presence:
        logits.sub_((counts > 0).to(logits.dtype) * presence)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (0 = off); rows of (N, V), ``top_k`` of (N,)."""
    off = top_k <= 0
    # rows with top_k off use k=1 here so one large k never forces a full sort
    k = torch.where(off, 1, top_k.clamp(max=logits.shape[-1]))
    kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).unsqueeze(-1))
    kth.masked_fill_(off.unsqueeze(-1), NEG_INF)
    return logits.masked_fill_(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter (1 = off): keep the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # mass strictly before each token; a token is kept while that mass is below top_p,
    # so the top token always survives
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = before >= top_p.unsqueeze(-1)
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill_(drop, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's (0 = off)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(-1)
    return logits.masked_fill_(probs < threshold, NEG_INF)


def new_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator seeded with ``seed``, or from OS randomness when ``seed`` is None."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


class JobSampler:
    """One job's sampling state: parameters, token history for penalties, generator."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int, device) -> None:
        self.params = params
        self.greedy = params.greedy
        self.generator = None if self.greedy else new_generator(params.seed, device)
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty must be > 0", param="repetition_penalty")
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(prompt_ids), dtype=torch.long, device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        if params.logit_bias:
            ids = [int(i) for i in params.logit_bias]
            if any(i < 0 or i >= vocab_size for i in ids):
                raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor([float(params.logit_bias[i]) for i in params.logit_bias], device=device),
            )
        # the per-row loop below only visits rows that have something to do
        self.adjusts = self.seen is not None or self.counts is not None or self.bias is not None
        self.filters = not self.greedy and (params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0)

    def observe(self, token_id: int) -> None:
        """Record a generated token for the penalties."""
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1

    def adjust(self, row: torch.Tensor) -> None:
        """Penalties and logit bias, in place on this job's (V,) logits row."""
        p = self.params
        if self.seen is not None:
            apply_repetition_penalty(row, self.seen, p.repetition_penalty)
        if self.counts is not None:
            apply_presence_frequency(row, self.counts, p.presence_penalty, p.frequency_penalty)
        if self.bias is not None:
            row.index_add_(0, self.bias[0], self.bias[1].to(row.dtype))


@dataclass
class SampleResult:
    """Chosen ids for a batch, plus logprobs for the rows that asked for them."""

    token_ids: list[int]
    #: row -> (chosen token logprob, [(token id, logprob), ...] top alternatives)
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]]


def sample(logits: torch.Tensor, samplers: Sequence[JobSampler], top_logprobs: Sequence[int | None]) -> SampleResult:
    """Pick one token per row of ``logits`` (N, V), modifying ``logits`` in place.

    ``top_logprobs[i]`` is None when row i wants no logprobs, else how many
    alternatives to report; logprobs come from the raw (unprocessed) logits.
    """
    logits = logits.float()
    want_lp = [i for i, n in enumerate(top_logprobs) if n is not None]
    raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None
    for i, s in enumerate(samplers):
        if s.adjusts:
            s.adjust(logits[i])
    chosen = logits.argmax(dim=-1)
    rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if rows:
        chosen[rows] = _draw([samplers[i] for i in rows], logits[rows])
    token_ids = chosen.tolist()
    out: dict[int, tuple[float, list[tuple[int, float]]]] = {}
    for j, i in enumerate(want_lp):
        row = raw_lp[j]
        n = top_logprobs[i] or 0
        alts: list[tuple[int, float]] = []
        if n > 0:
            vals, idx = row.topk(min(n, row.shape[-1]))
            alts = list(zip(idx.tolist(), vals.tolist()))
        out[i] = (float(row[token_ids[i]]), alts)
    return SampleResult(token_ids, out)


def _draw(samplers: Sequence[JobSampler], logits: torch.Tensor) -> torch.Tensor:
    """Temperature, filters, then one draw per row from its own generator."""
    device = logits.device
    temps = torch.tensor([s.params.temperature for s in samplers], device=device, dtype=logits.dtype)
    logits = logits / temps.unsqueeze(-1)
    if any(s.filters for s in samplers):
        p = [s.params for s in samplers]
        if any(x.top_k > 0 for x in p):
            apply_top_k(logits, torch.tensor([x.top_k for x in p], device=device))
        if any(x.top_p < 1.0 for x in p):
            # 2.0 for rows with top_p off: rounding in the cumulative sum can never reach it
            # (and at least 1e-6, so top_p <= 0 still keeps the top token instead of none)
            top_p = [max(x.top_p, 1e-6) if x.top_p < 1.0 else 2.0 for x in p]
            apply_top_p(logits, torch.tensor(top_p, device=device, dtype=logits.dtype))
        if any(x.min_p > 0.0 for x in p):
            # min_p above 1 would drop even the top token
            min_p = [min(max(x.min_p, 0.0), 1.0) for x in p]
            apply_min_p(logits, torch.tensor(min_p, device=device, dtype=logits.dtype))
    probs = logits.softmax(dim=-1)
    # Gumbel-style race (argmax of p / Exp(1)) samples exactly from probs; each row's
    # noise comes from its own generator, so other rows never shift its random stream.
    noise = torch.empty_like(probs)
    for i, s in enumerate(samplers):
        noise[i].exponential_(generator=s.generator)
    # exponential_ can return exactly 0; 0/0 would be NaN, which argmax would pick
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
