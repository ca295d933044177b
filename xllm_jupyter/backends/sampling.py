"""Per-job logits processing and sampling for batched decoding (torch).

Order of operations, per row (the same order HF ``generate`` uses, with the OpenAI
penalties next to HF's repetition penalty):

1. repetition penalty (HF: over prompt + generated ids; positive logits divided,
   negative multiplied), then presence/frequency penalties (OpenAI: over generated ids
   only), then ``logit_bias``;
2. greedy rows take the argmax here;
3. sampled rows: temperature, top-k, top-p, min-p, then a draw from the softmax.

Each job owns a CPU ``torch.Generator`` seeded once, and its random draw uses only that
generator, so a seeded job samples the same tokens whatever else shares the batch.
Only rows that need it get the per-row work; the rest is batched over rows.

On CUDA, ``sample`` reads the device once per call (one ``.tolist()`` of the chosen ids,
their logprobs and the non-finite row flags), plus once per widening step of a top-p
search: host lists become device tensors through pinned, non-blocking copies, and row
subsets are taken with index tensors, never with Python lists or boolean masks, which
would each wait for the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..core.errors import InvalidRequest
from ..core.types import SamplingParams

NEG_INF = float("-inf")


def to_device(values: Sequence, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of the host list ``values`` on ``device``, copied without waiting for the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    # a copy from pageable memory synchronizes the stream (it waits for the queued forward
    # pass); one from pinned memory is queued like a kernel, and the caching host allocator
    # keeps the buffer until the copy has run
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def row_index(rows: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``rows`` as a long index tensor on ``device``, for index_select / index_copy_."""
    return to_device(rows, device, torch.long)


def apply_repetition_penalty(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF repetition penalty in place on a (V,) row: logits of ``ids`` > 0 divided, others multiplied."""
    picked = logits.gather(0, ids)
    return logits.scatter_(0, ids, torch.where(picked > 0, picked / penalty, picked * penalty))


def apply_presence_frequency(
    logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI penalties in place on a (V,) row: ``-= frequency * count + presence`` for generated ``ids``."""
    return logits.index_add_(0, ids, -(counts.to(logits.dtype) * frequency + presence))


@dataclass(frozen=True)
class Filters:
    """Per-row truncation settings for one group of rows (0 / 1.0 / 0.0 = off)."""

    top_k: list[int]
    top_p: list[float]
    min_p: list[float]

    @classmethod
    def of(cls, params: Sequence[SamplingParams], vocab: int) -> "Filters":
        """Normalized settings: top_k >= vocab is off, top_p > 0, min_p <= 1."""
        return cls(
            [x.top_k if 0 < x.top_k < vocab else 0 for x in params],
            # at least 1e-6, so top_p <= 0 keeps the top token instead of none
            [min(max(x.top_p, 1e-6), 1.0) for x in params],
            # min_p above 1 would drop even the top token
            [min(max(x.min_p, 0.0), 1.0) for x in params],
        )

    def truncates(self, row: int) -> bool:
        """True when ``row`` keeps only a top slice of the vocabulary (top-k or top-p)."""
        return bool(self.top_k[row]) or self.top_p[row] < 1.0

    def select(self, rows: Sequence[int]) -> "Filters":
        """The settings of ``rows`` only."""
        return Filters([self.top_k[i] for i in rows], [self.top_p[i] for i in rows], [self.min_p[i] for i in rows])


def candidates(logits: torch.Tensor, f: Filters, *, first_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, then min-p on rows that each have top_k or top_p set.

    Returns ``(values, ids)`` of shape (N, K), best first: every row's surviving
    tokens lie in its top K, dropped ones have value -inf. Working on K columns
    instead of sorting the whole vocabulary is what makes this cheap.
    """
    n, vocab = logits.shape
    device = logits.device
    no_k = [i for i in range(n) if f.top_k[i] == 0]  # these rows rely on top_p alone
    no_k_index = row_index(no_k, device) if no_k and len(no_k) < n else None
    k = max(f.top_k)
    lse_no_k = None
    if no_k:
        full = logits if no_k_index is None else logits.index_select(0, no_k_index)
        lse_no_k = full.logsumexp(dim=-1, keepdim=True)
        probs = (full - lse_no_k).exp()
        want = to_device([f.top_p[i] for i in no_k], device)
        # a row with non-finite logits (sample() flags it) reaches no top_p: it must not
        # widen the search to the whole vocabulary for every row
        broken = ~torch.isfinite(lse_no_k.squeeze(-1))
        # the nucleus is nearly always within the first few dozen tokens; widen until
        # every row's top-k mass reaches its top_p, which makes the cut exact (one host
        # read per try: topk needs its k on the host)
        k_p = min(first_k, vocab)
        while k_p < vocab and not bool(((probs.topk(k_p, dim=-1).values.sum(dim=-1) >= want) | broken).all()):
            k_p = min(k_p * 16, vocab)
        k = max(k, k_p)
    values, ids = logits.topk(k, dim=-1)
    position = torch.arange(k, device=device)
    top_k = to_device([t or k for t in f.top_k], device)
    values = values.masked_fill(position >= top_k.unsqueeze(-1), NEG_INF)
    if any(p < 1.0 for p in f.top_p):
        # HF order: top-p sees the distribution after top-k; rows without top_k need the
        # full vocabulary's normalizer, not the truncated one
        if no_k_index is None and no_k:
            lse = lse_no_k
        else:
            lse = values.logsumexp(dim=-1, keepdim=True)
            if no_k:
                lse.index_copy_(0, no_k_index, lse_no_k)
        probs = (values - lse).exp()
        top_p = to_device([p if p < 1.0 else float("inf") for p in f.top_p], device)
        # mass strictly before each token; kept while below top_p, so the top token survives
        values = values.masked_fill(probs.cumsum(dim=-1) - probs >= top_p.unsqueeze(-1), NEG_INF)
    return apply_min_p(values, f.min_p), ids


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's top token's (0 = off).

    Done on logits: p_i < m * p_max  <=>  logit_i < logit_max + log(m).
    """
    if not any(min_p):
        return logits
    # log(0) = -inf: rows with min_p off get a threshold nothing falls below
    floor = to_device(list(min_p), logits.device, logits.dtype).log()
    threshold = logits.max(dim=-1, keepdim=True).values + floor.unsqueeze(-1)
    return logits.masked_fill(logits < threshold, NEG_INF)


def filter_logits(logits: torch.Tensor, f: Filters) -> torch.Tensor:
    """Full-vocabulary view of the filters: a copy of ``logits`` with dropped tokens at -inf."""
    rows = [i for i in range(logits.shape[0]) if f.truncates(i)]
    out = apply_min_p(logits.clone(), f.min_p)
    if rows:
        index = row_index(rows, logits.device)
        picked = logits.index_select(0, index)
        values, ids = candidates(picked, f.select(rows))
        out.index_copy_(0, index, torch.full_like(picked, NEG_INF).scatter_(-1, ids, values))
    return out


def new_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator seeded with ``seed``, or from OS randomness when ``seed`` is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    elif not -(2**63) <= seed < 2**64:  # what torch takes; any other int still seeds reproducibly
        seed %= 2**64
    gen.manual_seed(seed)
    return gen


class JobSampler:
    """One job's sampling state: parameters, token history for penalties, generator."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int, device) -> None:
        self.params = params
        self.greedy = params.greedy
        self.device = device
        # on the CPU whatever the device: a draw there is a few hundred nanoseconds, where a CUDA generator's
        # is a kernel launch per row per step (64 sampled streams: 64 launches before every step's draw)
        self.generator = None if self.greedy else new_generator(params.seed, "cpu")
        if params.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty must be > 0", param="repetition_penalty")
        # penalties work on the few distinct ids seen so far (gather/scatter), never on
        # whole-vocabulary masks; the id tensors are rebuilt only when a new id appears
        self._repeat: set[int] | None = set(prompt_ids) if params.repetition_penalty != 1.0 else None
        self._repeat_ids: torch.Tensor | None = None
        self._generated: set[int] | None = set() if (params.presence_penalty or params.frequency_penalty) else None
        self._generated_ids: torch.Tensor | None = None
        # explicit float32 here and in the draws: torch's default dtype is process-wide, and a half-precision
        # model load on another thread sets it while it builds the model (bf16 draws step by 1/256)
        self.counts = None if self._generated is None else torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = [int(i) for i in params.logit_bias]
            if any(i < 0 or i >= vocab_size for i in ids):
                raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")
            self.bias = (
                torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor([float(v) for v in params.logit_bias.values()], dtype=torch.float32, device=device),
            )
        # the per-row loop in sample() only visits rows that have something to do
        self.adjusts = self._repeat is not None or self._generated is not None or self.bias is not None

    def observe(self, token_id: int) -> None:
        """Record a generated token for the penalties."""
        if self._repeat is not None and token_id not in self._repeat:
            self._repeat.add(token_id)
            self._repeat_ids = None
        if self._generated is not None:
            self.counts[token_id] += 1
            if token_id not in self._generated:
                self._generated.add(token_id)
                self._generated_ids = None

    def adjust(self, row: torch.Tensor) -> None:
        """Penalties and logit bias, in place on this job's (V,) logits row."""
        p = self.params
        if self._repeat:
            if self._repeat_ids is None:
                self._repeat_ids = row_index(sorted(self._repeat), self.device)
            apply_repetition_penalty(row, self._repeat_ids, p.repetition_penalty)
        if self._generated:
            if self._generated_ids is None:
                self._generated_ids = row_index(sorted(self._generated), self.device)
            ids = self._generated_ids
            apply_presence_frequency(row, ids, self.counts.gather(0, ids), p.presence_penalty, p.frequency_penalty)
        if self.bias is not None:
            row.index_add_(0, self.bias[0], self.bias[1].to(row.dtype))


@dataclass
class SampleResult:
    """Chosen ids for a batch, plus logprobs for the rows that asked for them."""

    token_ids: list[int]
    #: row -> (chosen token logprob, [(token id, logprob), ...] top alternatives)
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]]
    #: rows whose logits could not be sampled (NaN, +inf, or -inf everywhere; e.g. fp16
    #: overflow): their token id is meaningless, they have no logprobs, the caller fails them
    bad_rows: list[int] = field(default_factory=list)


def sample(logits: torch.Tensor, samplers: Sequence[JobSampler], top_logprobs: Sequence[int | None]) -> SampleResult:
    """Pick one token per row of ``logits`` (N, V), modifying ``logits`` in place.

    ``top_logprobs[i]`` is None when row i wants no logprobs, else how many
    alternatives to report; logprobs come from the raw (unprocessed) logits.
    What the host needs comes back in one device-to-host copy (see the module docstring).
    """
    logits = logits.float()
    n, vocab = logits.shape
    device = logits.device
    # A row can be sampled only when its maximum is finite: NaN and +inf propagate into the
    # max (softmax and argmax then return garbage), and a row that is -inf everywhere has
    # nothing to draw. A single -inf is legitimate (grammar masks write them before this
    # call) and stays: the check is on the logits as given, before penalties and bias.
    finite = torch.isfinite(logits.amax(dim=-1))
    want_lp = [i for i, k in enumerate(top_logprobs) if k is not None]
    lp_index = row_index(want_lp, device) if want_lp and len(want_lp) < n else None
    raw_lp = None
    if want_lp:  # before the in-place penalties below
        raw_lp = torch.log_softmax(logits if lp_index is None else logits.index_select(0, lp_index), dim=-1)
    for i, s in enumerate(samplers):
        if s.adjusts:
            s.adjust(logits[i])
    rows = [i for i, s in enumerate(samplers) if not s.greedy]
    if rows and len(rows) == n:
        chosen = _draw(samplers, logits)
    else:
        chosen = logits.argmax(dim=-1)
        if rows:
            index = row_index(rows, device)
            chosen.index_copy_(0, index, _draw([samplers[i] for i in rows], logits.index_select(0, index)))
    if not want_lp:
        host = torch.stack([chosen, finite.long()]).tolist()
        return SampleResult(host[0], {}, [i for i, ok in enumerate(host[1]) if not ok])
    # logprobs of all wanting rows at once: the chosen ids' and the top max-n alternatives
    picked = raw_lp.gather(-1, (chosen if lp_index is None else chosen.index_select(0, lp_index)).unsqueeze(-1))
    k = min(max(0, *(top_logprobs[i] for i in want_lp)), vocab)
    top_vals, top_ids = raw_lp.topk(k, dim=-1)
    # float64 holds the ids (< 2**53) and the float32 logprobs exactly: one copy for all
    host = torch.cat([chosen.double(), finite.double(), picked.double().flatten(), top_vals.double().flatten(),
                      top_ids.double().flatten()]).tolist()
    token_ids = [int(t) for t in host[:n]]
    bad_rows = [i for i in range(n) if not host[n + i]]
    m = len(want_lp)
    lp_at, vals_at, ids_at = 2 * n, 2 * n + m, 2 * n + m + m * k  # where each part starts
    out: dict[int, tuple[float, list[tuple[int, float]]]] = {}
    for j, i in enumerate(want_lp):
        if not host[n + i]:
            continue
        first, last = j * k, j * k + min(max(top_logprobs[i], 0), k)  # (k: at most the vocabulary)
        alts = zip(host[ids_at + first: ids_at + last], host[vals_at + first: vals_at + last])
        out[i] = (host[lp_at + j], [(int(t), v) for t, v in alts])
    return SampleResult(token_ids, out, bad_rows)


#: below this temperature a row is shifted by its largest logit before the division (see ``_draw``)
TINY_TEMPERATURE = 1e-3


def _draw(samplers: Sequence[JobSampler], logits: torch.Tensor) -> torch.Tensor:
    """Temperature, filters, then one draw per row from its own generator."""
    device = logits.device
    wanted = [s.params.temperature for s in samplers]
    if min(wanted) < TINY_TEMPERATURE:
        # logits over a tiny temperature (1e-38) overflow to +inf, and the softmax of a row holding +inf is NaN: any
        # token. Shifted by its largest logit first, a row keeps its distribution and tops out at 0; the floor keeps a
        # temperature that rounds to 0 in the logits' dtype (float16 below ~6e-8) from dividing 0 by 0
        logits = logits - logits.amax(dim=-1, keepdim=True)
        floor = torch.finfo(logits.dtype).tiny
        wanted = [max(t, floor) for t in wanted]
    temps = to_device(wanted, device, logits.dtype)
    logits = logits / temps.unsqueeze(-1)
    f = Filters.of([s.params for s in samplers], logits.shape[-1])
    # Inverse-CDF draw: one uniform per row from that row's own generator, so other rows
    # never shift its random stream (an exponential race would need V draws per row)
    u = torch.cat([torch.rand(1, generator=s.generator, dtype=torch.float32) for s in samplers])
    if device.type == "cuda":  # one queued copy for all rows
        u = u.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        u = u.to(device)
    cut = [i for i in range(len(samplers)) if f.truncates(i)]
    full = [i for i in range(len(samplers)) if not f.truncates(i)]
    if not full:
        return _draw_cut(logits, f, u)
    if not cut:
        return _inverse_cdf(apply_min_p(logits, f.min_p), u)
    # both kinds: one index tensor puts the truncated rows first, the rest after
    order = row_index(cut + full, device)
    logits, u = logits.index_select(0, order), u.index_select(0, order)
    c = len(cut)
    drawn = torch.cat([_draw_cut(logits[:c], f.select(cut), u[:c]),
                       _inverse_cdf(apply_min_p(logits[c:], [f.min_p[i] for i in full]), u[c:])])
    return torch.empty_like(drawn).index_copy_(0, order, drawn)


def _draw_cut(logits: torch.Tensor, f: Filters, u: torch.Tensor) -> torch.Tensor:
    """Token ids drawn from rows that all have top-k or top-p set."""
    values, ids = candidates(logits, f)
    return ids.gather(-1, _inverse_cdf(values, u).unsqueeze(-1)).squeeze(-1)


def _inverse_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column index drawn from each row's softmax, given one uniform number per row."""
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    # scaled by the row's own total, so float rounding in the sum never points past the end;
    # right=True never lands on a zero-probability (flat) step
    picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp_(max=logits.shape[-1] - 1)
