"""``POST /v1/completions``: the legacy completions API (prompts in, text out), over the engine.

A mixin of ``OpenAIServing``, which owns the engine, the response cache and the checks used here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, AsyncIterator, Sequence

from ..core.config import ServerConfig
from ..core.errors import InvalidRequest, Unsupported
from ..core.types import ChoiceDelta, FinishReason, GenerationDone, GenerationRequest, PromptLogprobs, Usage
from ..engine.manager import request_keep_alive
from .cache import ResponseCache
from .echo import copies, joined, prompt_logprobs, unscored
from .generation import Chunk, check_request_token_ids, check_token_ids, engine_failure, envelope, interleaved, started, sum_usage
from .guided import requested_constraint
from .logprob_wire import legacy_logprobs, legacy_text_advance
from .model_defaults import ModelDefaults
from .offload import is_big, off_loop_if, parse_body
from .protocol import SYSTEM_FINGERPRINT, CompletionRequest, usage_dict
from .timings import Timed, timings_wire, with_timings


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
        extra = req.model_extra or {}
        # vLLM's structured outputs, and its response_format on this route (guided.py)
        answer, answer_param = requested_constraint(extra.get("response_format"), extra)
        n = req.n or 1
        prompts = req.prompts()
        if req.candidates > n and req.candidates * len(prompts) > self.config.max_n:
            # best_of asked for the candidates: the error names it, not n
            raise InvalidRequest(f"best_of is too large: {req.candidates} completions for each of {len(prompts)} prompt(s). "
                                 f"This server generates at most {self.config.max_n} per request.", param="best_of")
        self._check_n(req.candidates, len(prompts))
        model = await self.engine.load(req.model)
        echo, show_logprobs = bool(req.echo), req.logprobs is not None
        if echo and show_logprobs and not model.scores_prompts:
            raise Unsupported(f"'echo' with 'logprobs' needs the prompt's tokens scored, which the {model.backend_name} "
                              "backend cannot do; use a model on the transformers backend, or leave out 'logprobs'",
                              param="echo")
        defaults = ModelDefaults.of(self.engine, req.model)
        req = defaults.apply(req)
        rid = "cmpl-" + uuid.uuid4().hex
        sampling = req.sampling_params()
        check_request_token_ids(req, sampling, model)
        if answer is not None:  # compiled before anything is queued or streamed: a bad grammar is a plain 400
            await self.engine.check_constraint(req.model, answer, param=answer_param)
        # best_of: generate that many per prompt, with logprobs to rank them by, and return the n best
        candidates = req.candidates
        ranked = candidates > n and req.max_tokens != 0
        gen_req = req.model_copy(update={"n": candidates}) if ranked else req
        if req.max_tokens == 0:  # (echo: the choices are the prompt alone, the same for all: one job scores it)
            gen_req = req.model_copy(update={"n": 1})
        gens: list[GenerationRequest] = []
        texts: list[str] = []  # what echo puts before each prompt's choices
        for p in prompts:
            if isinstance(p, str):
                ids = await self.engine.encode_text(req.model, p, user=user)
                texts.append(p)
            else:
                await off_loop_if(is_big(body), check_token_ids, p, model, "prompt")
                ids = p
                texts.append(await off_loop_if(is_big(body), model.detokenize, ids) if echo else "")
            # OpenAI's legacy endpoint defaults to 16 tokens, unlike chat
            max_tokens = self._max_tokens(req.max_tokens, "max_tokens", len(ids), model.context_length, "prompt", defaults.max_tokens(16))
            gen = self._generation(gen_req, ids, rid, max_tokens=max_tokens, sampling=sampling,
                                   logprobs=show_logprobs or ranked, top_logprobs=req.logprobs or 0,
                                   keep_alive=keep_alive, user=user, prompt_param="prompt",
                                   prompt_logprobs=echo and show_logprobs, constraint=answer)
            gens.append(gen)
        # text_offset counts characters of the choice's text, which without echo follows the prompt too
        offsets = [len(t) for t in texts]
        shown = EchoPlan(texts if echo else None, show_logprobs, n)
        created = int(time.time())
        events = self._events(gens, req.max_tokens == 0, echo and show_logprobs, n)
        if req.stream:
            events = await started(events, self.config.keepalive_seconds)
            continuous = req.include_usage and bool(req.stream_options.continuous_usage_stats)  # type: ignore[union-attr]
            return with_timings(self._completion_stream(events, shown, offsets, req.model, rid, created, req.include_usage,
                                                        [len(g.prompt_ids) for g in gens] if continuous else None),
                                shown.n * len(offsets))
        return await self._completion_full(events, gens, shown, offsets, req.model, rid, created)

    def _events(self, gens: Sequence[GenerationRequest], prompt_only: bool, scored: bool,
                n: int) -> AsyncIterator[tuple[int, Any]]:
        """The engine's events for ``gens``; for prompt-only (``max_tokens`` 0) echo, ``n`` copies of the one
        choice, and without logprobs no engine at all."""
        if not prompt_only:
            return interleaved(self.engine, gens)
        if scored:
            return copies(interleaved(self.engine, gens), n)
        return unscored([len(g.prompt_ids) for g in gens], n)

    async def _completion_full(
        self, events: AsyncIterator[tuple[int, Any]], gens: Sequence[GenerationRequest], shown: EchoPlan,
        offsets: Sequence[int], model: str, rid: str, created: int,
    ) -> dict[str, Any]:
        """The full response: of each prompt's completions, the ``shown.n`` best (all of them unless best_of)."""
        n = max(gens[0].params.n, shown.n)  # (candidates, or the copies of a prompt-only choice)
        total = n * len(gens)
        texts: list[list[str]] = [[] for _ in range(total)]
        lps: list[list] = [[] for _ in range(total)]
        finish: list[str | None] = [None] * total
        stops: list[str | int | None] = [None] * total  # vLLM's stop_reason
        usages: list[Usage] = []
        timings: dict[str, Any] | None = None
        scores: dict[int, PromptLogprobs] = {}
        want_lp = gens[0].params.logprobs
        async for p, ev in events:
            if type(ev) is ChoiceDelta:
                if ev.finish is FinishReason.ERROR:
                    raise engine_failure()
                i = p * n + ev.index
                texts[i].append(ev.text)
                if want_lp:
                    lps[i].extend(ev.logprobs)
                if ev.finish is not None:
                    finish[i], stops[i] = ev.finish.value, ev.stop_reason
            elif type(ev) is PromptLogprobs:
                scores[p] = ev
            elif isinstance(ev, GenerationDone):
                usages.append(ev.usage)
                timings = timings_wire(ev.timings, ev.usage) if len(gens) == 1 else None  # (one prompt's: llama.cpp's)
        chosen = [i for p in range(len(gens)) for i in _best(range(p * n, (p + 1) * n), lps, shown.n)]
        choices = [
            {
                "index": k,
                "text": shown.text(i // n) + "".join(texts[i]),
                "logprobs": shown.logprobs(scores.get(i // n), tuple(lps[i]), offsets[i // n]),
                "finish_reason": finish[i] or "stop",
                "stop_reason": stops[i],
            }
            for k, i in enumerate(chosen)
        ]
        # every candidate was generated: usage counts them all, as OpenAI bills best_of
        body = envelope(rid, "text_completion", created, model, choices, sum_usage(usages))
        return {**body, "timings": timings} if timings else body

    async def _completion_stream(
        self,
        engine_events: AsyncIterator[tuple[int, Any]],
        shown: EchoPlan,
        offsets: Sequence[int],
        model: str,
        rid: str,
        created: int,
        include_usage: bool,
        prompts: Sequence[int] | None = None,
    ) -> AsyncIterator[Chunk]:
        """The chunks; with ``prompts`` (each prompt's tokens: vLLM's continuous_usage_stats) each carries its choice's
        usage so far."""
        head: Chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": SYSTEM_FINGERPRINT}
        if include_usage:
            head["usage"] = None
        n = shown.n
        text_pos = [offsets[i // n] for i in range(n * len(offsets))]  # running text_offset per choice
        first = [True] * (n * len(offsets))
        usages: list[Usage] = []
        timed: dict[str, Any] | None = None
        scores: dict[int, PromptLogprobs] = {}
        held: dict[int, list[ChoiceDelta]] = {}  # deltas of a prompt whose scores (which go first) are still to come
        made = [0] * (n * len(offsets))

        def chunk(p: int, ev: ChoiceDelta) -> Chunk | None:
            i = p * n + ev.index
            if prompts is not None:
                made[i] += len(ev.token_ids)
                head["usage"] = {"prompt_tokens": prompts[p], "completion_tokens": made[i], "total_tokens": prompts[p] + made[i]}
            echoed, first[i] = first[i] and shown.echo, False
            if not (ev.text or ev.finish is not None or (shown.show_logprobs and ev.logprobs) or echoed):
                return None
            lp = None
            if shown.show_logprobs:
                lp = shown.logprobs(scores.get(p) if echoed else None, ev.logprobs, text_pos[i])
                text_pos[i] += legacy_text_advance(ev.logprobs)  # characters, as the full reply counts
            text = shown.text(p) + ev.text if echoed else ev.text
            if ev.finish is None:
                return {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": None}]}
            return {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish.value,
                                         "stop_reason": ev.stop_reason}]}  # (vLLM's, on the choice's last chunk)

        async for p, ev in engine_events:
            if type(ev) is ChoiceDelta:
                if ev.finish is FinishReason.ERROR:
                    raise engine_failure()
                if shown.scored and p not in scores:
                    held.setdefault(p, []).append(ev)
                    continue
                out = chunk(p, ev)
                if out is not None:
                    yield out
            elif type(ev) is PromptLogprobs:
                scores[p] = ev
                for waiting in held.pop(p, ()):
                    out = chunk(p, waiting)
                    if out is not None:
                        yield out
            elif isinstance(ev, GenerationDone):
                usages.append(ev.usage)
                timed = timings_wire(ev.timings, ev.usage)
        if held:  # the engine never scored that prompt: the reply would lack what was asked for
            raise engine_failure()
        if include_usage:
            yield {**head, "choices": [], "usage": usage_dict(sum_usage(usages))}
        if len(offsets) == 1 and timed:  # (one prompt's; with_timings puts them on the last chunk)
            yield Timed(timed)


class EchoPlan:
    """What each choice shows besides its generated text: the prompt (``echo``) and the logprobs."""

    def __init__(self, texts: Sequence[str] | None, show_logprobs: bool, n: int) -> None:
        self.texts = texts  # each prompt's text, when echoed
        self.show_logprobs = show_logprobs
        self.n = n  # choices returned per prompt
        # id(PromptLogprobs) -> (it, its wire form): converted once for all its choices, not once each (on the
        # IOLoop, a dict per prompt token: 8k tokens x n = 16 choices took 0.45 s); the object is held so its id stays its
        self._converted: dict[int, tuple[PromptLogprobs, dict[str, Any]]] = {}

    @property
    def echo(self) -> bool:
        """True when each choice starts with its prompt."""
        return self.texts is not None

    @property
    def scored(self) -> bool:
        """True when the prompt's tokens are scored (echo with logprobs)."""
        return self.echo and self.show_logprobs

    def text(self, p: int) -> str:
        """What goes before prompt ``p``'s choices' text ("" without echo)."""
        return self.texts[p] if self.texts is not None else ""

    def logprobs(self, prompt: PromptLogprobs | None, completion: Sequence[Any], offset: int) -> dict[str, Any] | None:
        """A choice's legacy ``logprobs`` (or a chunk's): ``prompt``'s scored tokens (when given) before the
        completion's, whose ``text_offset`` starts at ``offset``; None when not asked for."""
        if not self.show_logprobs:
            return None
        tail = legacy_logprobs(tuple(completion), offset)
        if prompt is None:
            return tail
        held = self._converted.get(id(prompt))
        if held is None:
            held = self._converted[id(prompt)] = (prompt, prompt_logprobs(prompt))
        return joined(held[1], tail)


def _best(candidates: range, logprobs: Sequence[Sequence[Any]], keep: int) -> list[int]:
    """The ``keep`` candidates with the highest log probability per token (OpenAI's best_of), best first."""
    if keep >= len(candidates):
        return list(candidates)

    def per_token(i: int) -> float:
        lps = logprobs[i]
        return sum(e.logprob for e in lps) / len(lps) if lps else float("-inf")

    return sorted(candidates, key=per_token, reverse=True)[:keep]
