"""``POST /v1/completions``: the legacy completions API (prompts in, text out), over the engine.

A mixin of ``OpenAIServing``, which owns the engine, the response cache and the checks used here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, AsyncIterator, Sequence

from ..core.config import ServerConfig
from ..core.errors import InvalidRequest
from ..core.types import ChoiceDelta, FinishReason, GenerationDone, GenerationRequest, Usage
from ..engine.manager import request_keep_alive
from .cache import ResponseCache
from .generation import Chunk, check_token_ids, engine_failure, envelope, interleaved, started, sum_usage
from .model_defaults import ModelDefaults
from .offload import is_big, off_loop_if, parse_body
from .protocol import SYSTEM_FINGERPRINT, CompletionRequest, legacy_logprobs, legacy_text_advance, usage_dict


class CompletionsMixin:
    """``OpenAIServing``'s legacy completions; it provides what is declared here."""

    engine: Any
    config: ServerConfig
    cache: ResponseCache
    _check_n: Callable[[int, int], None]
    _max_tokens: Callable[..., int]
    _generation: Callable[..., GenerationRequest]
    _model_identity: Callable[[str], Awaitable[str]]
    _namespace: Callable[[str | None], str]
    _cached: Callable[..., Awaitable[Any]]

    async def completion(self, body: bytes, user: str | None = None,
                         manages: bool = True) -> dict[str, Any] | AsyncIterator[Chunk]:
        """``POST /v1/completions``: a response dict, or chunks when ``stream`` is true (``user``, ``manages``: as
        for chat)."""
        return await self._cached("completions", body, user, lambda b: self._completion(b, user, manages))

    async def _completion(self, body: bytes, user: str | None = None,
                          manages: bool = True) -> dict[str, Any] | AsyncIterator[Chunk]:
        req: CompletionRequest = await parse_body(CompletionRequest, body)
        keep_alive = request_keep_alive(req.keep_alive, manages)
        n = req.n or 1
        prompts = req.prompts()
        if req.candidates > n and req.candidates * len(prompts) > self.config.max_n:
            # best_of asked for the candidates: the error names it, not n
            raise InvalidRequest(f"best_of is too large: {req.candidates} completions for each of {len(prompts)} prompt(s). "
                                 f"This server generates at most {self.config.max_n} per request.", param="best_of")
        self._check_n(req.candidates, len(prompts))
        model = await self.engine.load(req.model)
        defaults = ModelDefaults.of(self.engine, req.model)
        req = defaults.apply(req)
        rid = "cmpl-" + uuid.uuid4().hex
        sampling = req.sampling_params()
        check_token_ids(sampling.logit_bias, model, "logit_bias")
        # best_of: generate that many per prompt, with logprobs to rank them by, and return the n best
        candidates = req.candidates
        ranked = candidates > n
        gen_req = req.model_copy(update={"n": candidates}) if ranked else req
        gens: list[GenerationRequest] = []
        offsets: list[int] = []
        for p in prompts:
            if isinstance(p, str):
                ids = await self.engine.encode_text(req.model, p)
                offsets.append(len(p))
            else:
                await off_loop_if(is_big(body), check_token_ids, p, model, "prompt")
                ids = p
                offsets.append(0)
            # OpenAI's legacy endpoint defaults to 16 tokens, unlike chat
            max_tokens = self._max_tokens(req.max_tokens, "max_tokens", len(ids), model.context_length, "prompt", defaults.max_tokens(16))
            gen = self._generation(gen_req, ids, rid, max_tokens=max_tokens, sampling=sampling,
                                   logprobs=req.logprobs is not None or ranked, top_logprobs=req.logprobs or 0,
                                   keep_alive=keep_alive, user=user, prompt_param="prompt")
            gens.append(gen)
        created = int(time.time())
        if req.stream:
            events = await started(interleaved(self.engine, gens), self.config.keepalive_seconds)
            return self._completion_stream(events, gens, offsets, req.model, rid, created, req.include_usage)
        return await self._completion_full(gens, offsets, req.model, rid, created, n, req.logprobs is not None)

    async def _completion_full(
        self, gens: Sequence[GenerationRequest], offsets: Sequence[int], model: str, rid: str, created: int,
        keep: int, show_logprobs: bool,
    ) -> dict[str, Any]:
        """The full response: of each prompt's completions, the ``keep`` best (all of them unless best_of)."""
        n = gens[0].params.n
        total = n * len(gens)
        texts: list[list[str]] = [[] for _ in range(total)]
        lps: list[list] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        usages: list[Usage] = []
        want_lp = gens[0].params.logprobs
        async for p, ev in interleaved(self.engine, gens):
            if type(ev) is ChoiceDelta:
                if ev.finish is FinishReason.ERROR:
                    raise engine_failure()
                i = p * n + ev.index
                texts[i].append(ev.text)
                if want_lp:
                    lps[i].extend(ev.logprobs)
                if ev.finish is not None:
                    finish[i] = ev.finish.value
            elif isinstance(ev, GenerationDone):
                usages.append(ev.usage)
        chosen = [i for p in range(len(gens)) for i in _best(range(p * n, (p + 1) * n), lps, keep)]
        choices = [
            {
                "index": k,
                "text": "".join(texts[i]),
                "logprobs": legacy_logprobs(tuple(lps[i]), offsets[i // n]) if show_logprobs else None,
                "finish_reason": finish[i] or "stop",
            }
            for k, i in enumerate(chosen)
        ]
        # every candidate was generated: usage counts them all, as OpenAI bills best_of
        return envelope(rid, "text_completion", created, model, choices, sum_usage(usages))

    async def _completion_stream(
        self,
        engine_events: AsyncIterator[tuple[int, Any]],
        gens: Sequence[GenerationRequest],
        offsets: Sequence[int],
        model: str,
        rid: str,
        created: int,
        include_usage: bool,
    ) -> AsyncIterator[Chunk]:
        head: Chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": SYSTEM_FINGERPRINT}
        if include_usage:
            head["usage"] = None
        n = gens[0].params.n
        want_lp = gens[0].params.logprobs
        text_pos = [offsets[i // n] for i in range(n * len(gens))]  # running text_offset per choice
        usages: list[Usage] = []
        async for p, ev in engine_events:
            if type(ev) is ChoiceDelta:
                if ev.finish is FinishReason.ERROR:
                    raise engine_failure()
                i = p * n + ev.index
                if ev.text or ev.finish is not None or (want_lp and ev.logprobs):
                    lp = None
                    if want_lp:
                        lp = legacy_logprobs(ev.logprobs, text_pos[i])
                        text_pos[i] += legacy_text_advance(ev.logprobs)  # characters, as the full reply counts
                    finish = ev.finish.value if ev.finish is not None else None
                    yield {**head, "choices": [{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": finish}]}
            elif isinstance(ev, GenerationDone):
                usages.append(ev.usage)
        if include_usage:
            yield {**head, "choices": [], "usage": usage_dict(sum_usage(usages))}


def _best(candidates: range, logprobs: Sequence[Sequence[Any]], keep: int) -> list[int]:
    """The ``keep`` candidates with the highest log probability per token (OpenAI's best_of), best first."""
    if keep >= len(candidates):
        return list(candidates)

    def per_token(i: int) -> float:
        lps = logprobs[i]
        return sum(e.logprob for e in lps) / len(lps) if lps else float("-inf")

    return sorted(candidates, key=per_token, reverse=True)[:keep]
