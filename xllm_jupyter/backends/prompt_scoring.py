"""Prompt logprobs for the transformers backend: a prefill that scores every prompt token.

Legacy completions' ``echo`` with ``logprobs`` (how lm-evaluation-harness and similar tools
score loglikelihood tasks) asks how likely each prompt token was given the tokens before it.
Generating needs only the last position's logits, so a plain prefill keeps only those
(``logits_to_keep=1``); scoring needs every position's: rows x positions x vocabulary, which
for a long prompt and a 128k vocabulary is gigabytes. So a scoring prefill runs the prompt in
chunks of positions, each forward extending the same KV cache, and reduces each chunk's logits
to what is kept (each prompt token's logprob and its top alternatives) before the next one:
memory stays near ``SCORE_BYTES`` whatever the prompt's length. The cache it leaves is the one
a one-shot prefill makes, so the jobs decode on like any other. Jobs that do not score never
pay for this: they are prefilled in groups of their own (``hf_prefill.prefill_groups``).

This backend keeps no prompt-prefix cache, so a scoring prefill always runs (and scores) the
whole prompt. exllama's page cache would skip cached prompt pages, whose logits are gone: one
reason those backends leave ``LoadedModel.scores_prompts`` off and refuse such jobs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..core.types import PromptLogprobs, TokenLogprob
from .detokenize import token_text

#: bytes of logits and log-probabilities one scoring chunk may hold (it sets the chunk's positions)
SCORE_BYTES = 256 << 20


def chunk_positions(rows: int, scoring_rows: int, vocab: int, budget: int = SCORE_BYTES) -> int:
    """Positions per scoring forward: the chunk's logits (model dtype, every row) and the scoring rows'
    float32 logits and log-probabilities together stay within ``budget`` bytes."""
    per_position = vocab * (rows * 4 + scoring_rows * 8)  # (4 bytes covers a float32 model's logits too)
    return max(1, budget // per_position)


class PromptScores:
    """Each scoring row's logprob of every prompt position's token and the top alternatives, filled chunk by chunk."""

    def __init__(self, rows: Sequence[int], width: int, top_n: int, device: torch.device) -> None:
        self.rows = torch.tensor(list(rows), dtype=torch.long, device=device)
        self.top_n = top_n
        # column t: the token at t + 1 (the last position predicts the first generated token, not a prompt one)
        self.chosen = torch.zeros((len(rows), max(0, width - 1)), dtype=torch.float32, device=device)
        self.top_values = torch.zeros((len(rows), max(0, width - 1), top_n), dtype=torch.float32, device=device)
        self.top_ids = torch.zeros((len(rows), max(0, width - 1), top_n), dtype=torch.long, device=device)

    def add(self, logits: torch.Tensor, ids: torch.Tensor, start: int) -> None:
        """Score the positions ``start ..`` that ``logits`` (rows x positions x vocab) covers."""
        stop = min(start + logits.shape[1], self.chosen.shape[1])
        if stop <= start:
            return
        logprobs = torch.log_softmax(logits[self.rows, : stop - start].float(), dim=-1)
        targets = ids[self.rows, start + 1: stop + 1]
        self.chosen[:, start:stop] = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if self.top_n:
            values, top = logprobs.topk(self.top_n, dim=-1)
            self.top_values[:, start:stop] = values
            self.top_ids[:, start:stop] = top

    def results(self, prompts: Sequence[Sequence[int]], tops: Sequence[int],
                spell: Callable[[int], bytes]) -> list[PromptLogprobs]:
        """Each scoring row's ``PromptLogprobs`` (``prompts``: their token ids, in row order; ``tops``: how many
        alternatives each asked for; ``spell``: a token's bytes)."""
        chosen, values, top_ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
        width = self.chosen.shape[1] + 1
        out = []
        for k, (prompt, n_top) in enumerate(zip(prompts, tops)):
            begin = width - len(prompt)  # left padding: the prompt's first token sits here
            scored = []
            for pos, token in zip(range(begin, width - 1), prompt[1:]):
                raw = spell(token)
                top_raw = tuple(spell(i) for i in top_ids[k][pos][:n_top])
                top = tuple((token_text(r), v) for r, v in zip(top_raw, values[k][pos][:n_top]))
                scored.append(TokenLogprob(token_text(raw), chosen[k][pos], top, raw, top_raw))
            first = spell(prompt[0])
            out.append(PromptLogprobs(token_text(first), first, tuple(scored)))
        return out


def scored_forward(forward: Callable[[int, int], torch.Tensor], ids: torch.Tensor, scores: PromptScores,
                   chunk: int) -> tuple[torch.Tensor, int]:
    """Run the prompt through ``forward(start, end)`` (the positions' logits, extending the cache) chunk by chunk,
    scoring as it goes; returns the last position's logits (to sample the first token from) and the forwards run."""
    width = ids.shape[1]
    last = None
    passes = 0
    for start in range(0, width, chunk):
        logits = forward(start, min(width, start + chunk))
        passes += 1
        scores.add(logits, ids, start)
        last = logits[:, -1, :].clone()  # (a view would keep the whole chunk's logits alive)
        del logits
    assert last is not None  # (a prompt has at least one token)
    return last, passes
