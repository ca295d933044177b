"""Legacy completions' ``echo``: each choice's text starts with its prompt, and with ``logprobs`` its
``logprobs`` start with the prompt's tokens as the model scored them.

Evaluation tools (lm-evaluation-harness's ``local-completions``, HELM and the like) score a
loglikelihood task by sending context + continuation with ``echo``, ``logprobs`` and
``max_tokens`` 0 or 1, and reading ``token_logprobs`` over the prompt. As on api.openai.com the
first prompt token has no logprob (nothing comes before it): its ``token_logprobs`` and
``top_logprobs`` entries are null. ``max_tokens`` 0 generates nothing: the engine only scores
the prompt (once, however many choices share it), or, without logprobs, is not asked at all.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Sequence

from ..core.types import ChoiceDelta, FinishReason, GenerationDone, PromptLogprobs, TokenLogprob, Usage
from .logprob_wire import legacy_logprobs, legacy_text_advance


def prompt_logprobs(prompt: PromptLogprobs) -> dict[str, Any]:
    """The legacy ``logprobs`` of a prompt's tokens, ``text_offset`` counted from the prompt's start."""
    first = TokenLogprob(prompt.first_token, 0.0, (), prompt.first_raw)
    rest = legacy_logprobs(prompt.scored, legacy_text_advance((first,)))
    return {
        "tokens": [prompt.first_token, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def joined(head: dict[str, Any], tail: dict[str, Any]) -> dict[str, Any]:
    """Two legacy ``logprobs`` objects one after the other (the prompt's, then the completion's)."""
    return {key: [*head[key], *tail[key]] for key in head}


async def copies(events: AsyncIterator[tuple[int, Any]], n: int) -> AsyncIterator[tuple[int, Any]]:
    """A prompt-only request's events with its one choice repeated ``n`` times: choices that generate
    nothing are the same, so the prompt is scored once for them all."""
    async for p, ev in events:
        if type(ev) is ChoiceDelta:
            for k in range(n):
                yield p, ChoiceDelta(k, ev.text, ev.token_ids, ev.logprobs, ev.finish, ev.stop_reason)
        else:
            yield p, ev


async def unscored(prompt_tokens: Sequence[int], n: int) -> AsyncIterator[tuple[int, Any]]:
    """The events of prompt-only choices without logprobs, for prompts of these lengths: the echo is the whole
    answer, so no model runs (this serves on every backend)."""
    for p, count in enumerate(prompt_tokens):
        for k in range(n):
            yield p, ChoiceDelta(k, "", finish=FinishReason.LENGTH)
        yield p, GenerationDone(Usage(prompt_tokens=count))
