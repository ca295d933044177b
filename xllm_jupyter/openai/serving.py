"""OpenAI request -> Engine -> response dict, or an async iterator of chunk dicts.

No HTTP here: the server layer hands in body bytes and writes what comes back. Every
check that can fail with a 4xx runs before a stream is returned, and the engine's first
event is awaited too (``started``), so a streaming request that cannot run still gets a
real HTTP status instead of an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from ..core.config import CacheConfig, ServerConfig
from ..core.errors import ContextLengthExceeded, InvalidRequest, ModelRemoved
from ..core.types import (ChatMessage, ChoiceDelta, FinishReason, GenerationDone, GenerationParams, GenerationRequest,
                          ModelRuntime, Usage, UserSequences)
from ..engine.manager import request_keep_alive
from .cache import ResponseCache
from .chat_store import StoredCompletions
from .completions import CompletionsMixin
from .context_words import PromptTooLong
from .forced_loops import ForcedLoops
from .generation import Chunk, check_request_token_ids, engine_failure, envelope, started
from .harmony import stop_exempt
from .logprob_wire import chat_logprob_entries
from .model_defaults import ModelDefaults
from .model_privacy import caller_view
from .offload import is_big, off_loop_if, parse_body
from .piece_logprobs import piece_shares
from .template_kwargs import chat_template_kwargs, with_effort
from .timings import Timed, timings_wire, with_timings
from .tool_calling import ToolCalling
from .truncation import fit_front
from .protocol import (
    SYSTEM_FINGERPRINT,
    ChatCompletionRequest,
    LoadRequest,
    UnloadRequest,
    model_object,
    parse_request,
    served_tier,
    usage_dict,
)

log = logging.getLogger(__name__)


@dataclass
class _ChatPrompt:
    """A checked chat request and the prompt it becomes, before anything is queued."""

    req: ChatCompletionRequest  # with the model's Modelfile defaults applied
    model: Any  # the loaded model's runtime info (context length, tokenizer facts)
    defaults: ModelDefaults
    tools: ToolCalling
    constraint: Any  # forced tool calls' or response_format's, else None
    sampling: Any
    keep_alive: Any
    big: bool  # body-proportional work runs off the IOLoop
    prompt: list[int]


class OpenAIServing(CompletionsMixin):
    """The OpenAI-compatible API over one Engine, independent of any web framework."""

    def __init__(self, engine: Any, config: ServerConfig | None = None, cache: CacheConfig | None = None,
                 default_max_tokens: int | None = None):
        self.engine = engine
        self.config = config or ServerConfig()
        #: a chat completion's (and response's) budget when neither the request nor the model's Modelfile sets one
        #: (engine.default_max_tokens); None fills the context, which on a CPU can mean minutes of a looping answer
        self.default_max_tokens = default_max_tokens
        self.cache = ResponseCache(cache)
        #: let users reuse each other's cached prompt prefixes (quotas.share_prefix_cache); off = per-user namespaces
        self.share_prefix_cache = False
        #: chat completions created with ``store: true`` (retrieve, list, update, delete)
        self.stored = StoredCompletions()

    def _namespace(self, user: str | None) -> str:
        """The prefix-cache namespace of ``user``'s jobs ("" = shared by everyone)."""
        return "" if self.share_prefix_cache else (user or "")

    async def _model_identity(self, name: str) -> str:
        """What names the weights behind ``name`` for the response cache (loads it if needed)."""
        model = await self.engine.load(name)
        spec = getattr(model, "spec", None)
        digest = getattr(spec, "digest", None) or getattr(model, "digest", None)
        # without a digest the loaded object itself stands in: a reload gets a new key
        return f"{digest or id(model)}:{name}"

    # ------------------------------------------------------------------ models
    async def list_models(self, user: str | None = None, *, admin: bool = True) -> dict[str, Any]:
        """``GET /v1/models``: loaded models first, then everything the store can load (a non-admin ``user``
        sees only their own activity: model_privacy.py)."""
        infos = await asyncio.to_thread(self.engine.list_models)  # the catalog reads the disk
        return {"object": "list", "data": [self._as_seen(model_object(i), user, admin) for i in infos]}

    async def retrieve_model(self, model_id: str, user: str | None = None, *, admin: bool = True) -> dict[str, Any]:
        """``GET /v1/models/{id}``; ModelNotFound (404) when unknown."""
        return self._as_seen(model_object(await asyncio.to_thread(self.engine.model_info, model_id)), user, admin)

    def _as_seen(self, entry: dict[str, Any], user: str | None, admin: bool) -> dict[str, Any]:
        if admin:
            return entry
        counts = getattr(self.engine, "user_counts", None)
        own = counts(entry["id"]).get(user or "", UserSequences()) if counts is not None else UserSequences()
        return caller_view(entry, own)

    # ------------------------------------------------------------------- admin
    def admin_models(self) -> dict[str, Any]:
        """Loaded models with backend, memory, load and batching facts."""
        data = []
        for info in self.engine.loaded_models(include_loading=True):
            r = info.runtime or ModelRuntime()
            data.append(
                {
                    "id": info.name,
                    "object": "model",
                    "backend": info.backend,
                    "context_length": info.context_length,
                    "memory_bytes": r.memory_bytes,
                    "running": r.running,
                    "queued": r.queued,
                    "max_batch_size": r.max_batch_size,
                    "batch_mode": info.details.get("mode"),  # the backend's word for how it batches
                    "state": r.state,
                    "replicas": max(1, len(r.replicas)),
                    "last_used": r.last_used,
                    "expires_at": r.expires_at,
                    "details": info.wire_details(),
                }
            )
        return {"object": "list", "data": data}

    async def admin_load(self, body: bytes) -> dict[str, Any]:
        """Load a model now (waits until it is in memory)."""
        req: LoadRequest = parse_request(LoadRequest, body)
        await self.engine.load_any(req.model, request_keep_alive(req.keep_alive))  # chat or embedding model
        return model_object(self.engine.model_info(req.model))

    async def admin_unload(self, body: bytes) -> dict[str, Any]:
        """Unload a model; 404 when the name is unknown, ``unloaded: false`` when it was not loaded (``wait_for_load``:
        a load under way ends first)."""
        req: UnloadRequest = parse_request(UnloadRequest, body)
        # a model still loading goes on to the engine even once the store no longer has it: `xllm rm` unloads
        # after removing the files, and that unload tells the load to check its manifest again (or it registers)
        if not self.engine.is_loading(req.model):
            await asyncio.to_thread(self.engine.model_info, req.model)  # 404: neither loaded, loading nor stored
        if req.wait_for_load:
            await self.engine.load_settled(req.model)
        unloaded = await self.engine.unload(req.model, ModelRemoved(req.model) if req.removed else None)
        return {"id": req.model, "object": "model", "unloaded": unloaded}

    # -------------------------------------------------------------- validation
    def _check_n(self, n: int, prompts: int = 1) -> None:
        if n * prompts > self.config.max_n:
            raise InvalidRequest(f"n must be at most {self.config.max_n} (choices per request)", param="n")

    def _max_tokens(self, requested: int | None, param: str, prompt_len: int, ctx: int, prompt_param: str, default: int | None) -> int:
        """The completion budget: the request's, else ``default``, else what fits the context."""
        limit = self.config.max_tokens_limit
        if requested is not None and requested > limit:
            raise InvalidRequest(f"{param} is too large: {requested}. This server allows at most {limit}.", param=param)
        if requested is not None:
            if prompt_len + requested > ctx:  # checked here, not only by the engine: this endpoint's words
                raise PromptTooLong(ctx, prompt_len, requested, prompt_param)
            return requested
        room = ctx - prompt_len
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens. "
                "Please reduce the length of the prompt.",
                param=prompt_param,
            )
        return min(room, limit, default) if default else min(room, limit)

    def _generation(self, req: Any, prompt_ids: Sequence[int], rid: str, *, max_tokens: int, sampling: Any,
                    logprobs: bool, top_logprobs: int, keep_alive: Any, user: str | None, prompt_param: str,
                    constraint: Any = None, prompt_logprobs: bool = False, keep_special: tuple[str, ...] = ()
                    ) -> GenerationRequest:
        """The engine request for ``req``'s prompt ``prompt_ids``, checked (``prompt_param`` names it in errors)."""
        if logprobs or prompt_logprobs:
            self._check_logprob_entries(req.n or 1, max_tokens, top_logprobs, len(prompt_ids) if prompt_logprobs else 0)
        params = GenerationParams(max_tokens=max_tokens, sampling=sampling, stop=req.stop_strings(),
                                  stop_token_ids=tuple(req.stop_token_ids or ()),
                                  ignore_eos=bool(req.ignore_eos), n=req.n or 1, logprobs=logprobs,
                                  top_logprobs=top_logprobs, constraint=constraint, prompt_logprobs=prompt_logprobs,
                                  keep_special=keep_special, stop_exempt=stop_exempt(keep_special))
        gen = GenerationRequest(model=req.model, prompt_ids=tuple(prompt_ids), params=params, request_id=rid,
                                keep_alive=keep_alive, user=user, cache_namespace=self._namespace(user))
        self._validate(gen, prompt_param)
        return gen

    def _check_logprob_entries(self, n: int, max_tokens: int, top: int, prompt_tokens: int) -> None:
        """400 when a reply could carry more token logprobs than ``server.max_logprob_entries``.

        Each is ~90 bytes of JSON, and a reply is held whole in server memory until its client has read it:
        the defaults alone allowed n=16 x 8,192 tokens x 21 entries, a 236 MB reply, and a client reading
        slowly could hold several.
        """
        limit = self.config.max_logprob_entries
        entries = (n * max_tokens + prompt_tokens) * (top + 1)
        if limit and entries > limit:
            raise InvalidRequest(
                f"This request could return {entries:,} token logprobs (n x max_tokens x (top_logprobs + 1)); this "
                f"server returns at most {limit:,} in one reply. Lower max_tokens, n or top_logprobs.",
                param="max_tokens", code="too_many_logprobs")

    def _validate(self, request: GenerationRequest, prompt_param: str) -> None:
        """The engine's own checks, with errors pointing at the right request field."""
        try:
            self.engine.validate(request)
        except InvalidRequest as exc:
            if exc.param == "messages":
                exc.param = prompt_param
            raise

    # -------------------------------------------------------- chat completions
    async def chat_completion(self, body: bytes, user: str | None = None, manages: bool = True,
                              truncate: bool = False) -> dict[str, Any] | AsyncIterator[Chunk]:
        """``POST /v1/chat/completions``: a response dict, or chunks when ``stream`` is true.

        ``user`` is the authenticated caller: it keys fair scheduling, usage and the
        response cache (never shared across users). ``manages``: the caller may send
        ``keep_alive`` (see ``request_keep_alive``). ``truncate``: drop the oldest messages
        when the prompt does not fit the context (Responses ``truncation: "auto"``).
        """
        if truncate:  # not through the cache: the same body without truncation must still fail
            return await self._chat_completion(body, user, manages, truncate=True)
        return await self._cached("chat", body, user, lambda b: self._chat_completion(b, user, manages))

    async def _cached(self, kind: str, body: bytes, user: str | None,
                      make: Callable[[bytes], Awaitable[Any]]) -> dict[str, Any] | AsyncIterator[Chunk]:
        """``make(body)``, or what the response cache holds for it (never shared across users)."""
        return await self.cache.serve(kind, body, make, self._model_identity, namespace=user or "")

    async def chat_prompt_tokens(self, body: bytes, manages: bool = True, truncate: bool = False,
                                 user: str | None = None) -> int:
        """How many prompt tokens ``chat_completion(body, truncate=truncate)`` would send the model; nothing is generated.

        Every check that comes before the prompt is built raises here too (unknown model 404, bad tools 400...);
        the context-length and ``max_tokens`` checks do not: knowing an over-long prompt's size is the point.
        """
        return len((await self._chat_prompt(body, manages, truncate, user)).prompt)

    async def _chat_prompt(self, body: bytes, manages: bool, truncate: bool, user: str | None = None) -> _ChatPrompt:
        """``body`` parsed and checked, with Modelfile defaults applied, and its prompt tokens (``truncate``: fitted;
        a huge prompt is tokenized in ``user``'s turn)."""
        req: ChatCompletionRequest = await parse_body(ChatCompletionRequest, body)
        keep_alive = request_keep_alive(req.keep_alive, manages)
        template_kwargs = chat_template_kwargs(req.model_extra)  # (vLLM's: e.g. Qwen3's enable_thinking)
        self._check_n(req.n or 1)
        big = is_big(body)  # then the work proportional to it runs off the IOLoop
        messages = await off_loop_if(big, req.core_messages)
        model = await self.engine.load(req.model)
        template_kwargs = with_effort(template_kwargs, req.model_extra, model)  # (top-level reasoning_effort)
        defaults = ModelDefaults.of(self.engine, req.model)  # a created model's Modelfile settings
        req = defaults.apply(req)
        messages = defaults.chat_messages(messages)
        sampling = req.sampling_params()
        check_request_token_ids(req, sampling, model)
        tools = ToolCalling.from_request(req, model)

        async def check(constraint: Any, param: str) -> None:  # compiled before anything is queued or streamed
            await self.engine.check_constraint(req.model, constraint, param=param)

        constraint = await tools.decoding(*req.constraint(), check, req.tools)  # (response_format, a guided field)
        prompt = await self.engine.encode_chat(req.model, *await off_loop_if(big, tools.prompt, messages), user=user,
                                               template_kwargs=template_kwargs)
        if truncate:
            reserve = req.requested_max_tokens or 1  # room for the completion asked for, else for one token

            async def encode(kept: list[ChatMessage]) -> list[int]:
                return await self.engine.encode_chat(req.model, *await off_loop_if(big, tools.prompt, kept), user=user,
                                                     template_kwargs=template_kwargs)

            prompt, _ = await fit_front(messages, prompt, model.context_length - reserve, encode)
        constraint = await tools.think(model, prompt, req.model_extra, constraint, check)  # (after any thinking)
        return _ChatPrompt(req, model, defaults, tools, constraint, sampling, keep_alive, big, prompt)

    async def _chat_completion(self, body: bytes, user: str | None = None, manages: bool = True,
                               truncate: bool = False) -> dict[str, Any] | AsyncIterator[Chunk]:
        p = await self._chat_prompt(body, manages, truncate, user)
        req = p.req
        max_tokens = self._max_tokens(
            req.requested_max_tokens, req.max_tokens_param, len(p.prompt), p.model.context_length, "messages",
            p.defaults.max_tokens(self.default_max_tokens)
        )
        rid = "chatcmpl-" + uuid.uuid4().hex
        gen = self._generation(req, p.prompt, rid, max_tokens=max_tokens, sampling=p.sampling, logprobs=bool(req.logprobs),
                               top_logprobs=req.top_logprobs or 0, keep_alive=p.keep_alive, user=user,
                               prompt_param="messages", constraint=p.constraint, keep_special=p.tools.markup_tokens)
        created = int(time.time())
        if req.stream:
            events = await started(self.engine.generate(gen), self.config.keepalive_seconds)
            # a stored stream always counts its usage, for the stored completion (recording drops it unless asked)
            stream = self._chat_stream(events, gen, req.model, rid, created, req.include_usage or bool(req.store), p.tools,
                                       served_tier(req.service_tier),
                                       req.include_usage and bool(req.stream_options.continuous_usage_stats))
            # the timings go on the last chunk the client gets: a stored stream's usage chunk may be dropped
            return with_timings(self.stored.recording(stream, req, user, p.big) if req.store else stream, gen.params.n)
        result = await self._chat_full(gen, req.model, rid, created, p.tools)
        if req.service_tier is not None:
            result["service_tier"] = served_tier(req.service_tier)
        if req.store:
            await self.stored.keep(result, req, user, p.big)
        return result

    async def _chat_full(self, gen: GenerationRequest, model: str, rid: str, created: int, tools: ToolCalling) -> dict[str, Any]:
        n = gen.params.n
        want_lp = gen.params.logprobs
        texts: list[list[str]] = [[] for _ in range(n)]
        lps: list[list[dict]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        stops: list[str | int | None] = [None] * n  # vLLM's stop_reason: the stop string (or token id) that ended it
        loops, thinking = ForcedLoops(gen, tools), tools.tally(n)
        usage, timings = Usage(), None
        async with aclosing(self.engine.generate(gen)) as events:
            async for ev in events:
                if type(ev) is ChoiceDelta:
                    if ev.finish is FinishReason.ERROR:
                        raise engine_failure()
                    loops.count(ev)
                    if finish[ev.index] is not None:
                        continue  # ended early (a forced reply repeating its calls) while others go on
                    thinking.count(ev.index, ev.text, ev.token_ids, ev.finish is not None)
                    texts[ev.index].append(ev.text)
                    if want_lp and ev.logprobs:
                        lps[ev.index].extend(chat_logprob_entries(ev.logprobs))
                    if ev.finish is not None:
                        finish[ev.index], stops[ev.index] = ev.finish.value, ev.stop_reason
                    if loops.repeats(ev):  # its calls are complete: it finishes now (message() says tool_calls)
                        finish[ev.index] = "stop"
                    if loops.all_ended(finish):
                        usage = loops.usage()  # the rest is cancelled as the stream closes
                        break
                elif isinstance(ev, GenerationDone):
                    usage, timings = ev.usage, timings_wire(ev.timings, ev.usage)
        # (a stop of the request's that cut a forced call leaves it incomplete)
        messages = [tools.message("".join(texts[i]), finish[i] or "stop", stops[i] is not None) for i in range(n)]
        choices = [
            {
                "index": i,
                "message": messages[i][0],
                "logprobs": {"content": lps[i], "refusal": None} if want_lp else None,
                "finish_reason": messages[i][1],
                "stop_reason": stops[i] if messages[i][1] == "stop" else None,  # (not a tool call's finish)
            }
            for i in range(n)
        ]
        body = envelope(rid, "chat.completion", created, model, choices, usage, thinking.tokens)
        return {**body, "timings": timings} if timings else body  # (llama.cpp's: the engine's times)

    async def _chat_stream(
        self, engine_events: AsyncIterator[Any], gen: GenerationRequest, model: str, rid: str, created: int,
        include_usage: bool, tools: ToolCalling, service_tier: str | None = None, continuous: bool = False,
    ) -> AsyncIterator[Chunk]:
        # The common fields are built once; each chunk is a shallow copy plus its choice.
        head: Chunk = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if service_tier is not None:
            head["service_tier"] = service_tier
        # (``continuous``, vLLM's continuous_usage_stats: each chunk carries its choice's usage so far)
        made, prompt = [0] * gen.params.n, len(gen.prompt_ids)
        if include_usage:
            head["usage"] = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt} if continuous else None
        want_lp = gen.params.logprobs
        # a reply forced to be tool calls has no content: null, as in the full response
        opening = {"role": "assistant", "content": None if tools.cfg.constrained else ""}
        for i in range(gen.params.n):
            yield {**head, "choices": [{"index": i, "delta": dict(opening), "logprobs": None, "finish_reason": None}]}
        usage, timings = Usage(), None
        # with tools, text goes through a parser that holds back what may become a call
        calls = [tools.streamer() for _ in range(gen.params.n)] if tools.parses else None
        # logprobs of tokens the parser has not released yet ride on the choice's next chunk, so the stream
        # carries every token's, as the full response does
        held_lp: list[list[dict]] = [[] for _ in range(gen.params.n)]
        loops, thinking = ForcedLoops(gen, tools, calls), tools.tally(gen.params.n)
        finished: list[str | None] = [None] * gen.params.n
        async with aclosing(engine_events) as events:  # type: ignore[type-var]
            async for ev in events:
                if type(ev) is ChoiceDelta:
                    if ev.finish is FinishReason.ERROR:
                        raise engine_failure()
                    loops.count(ev)
                    if continuous:
                        made[ev.index] += len(ev.token_ids)
                        head["usage"] = {"prompt_tokens": prompt, "completion_tokens": made[ev.index],
                                         "total_tokens": prompt + made[ev.index]}
                    if finished[ev.index] is not None:
                        continue  # ended early (a forced reply repeating its calls) while others go on
                    if ev.finish is not None:
                        finished[ev.index] = ev.finish.value
                    thinking.count(ev.index, ev.text, ev.token_ids, ev.finish is not None)
                    if calls is not None:
                        reason = None if ev.finish is None else ev.finish.value
                        out = calls[ev.index].deltas(ev.text, reason, ev.stop_string)
                        if loops.repeats(ev):  # its calls are complete: it finishes now, with tool_calls
                            finished[ev.index] = "stop"
                            out += calls[ev.index].deltas("", "stop")
                        if want_lp and ev.logprobs:
                            held_lp[ev.index].extend(chat_logprob_entries(ev.logprobs))
                        # each piece takes its own tokens' logprobs: one engine delta may hold the thinking's end, text
                        # and a call (tokens made within one stream interval)
                        shares = piece_shares(held_lp[ev.index], out, tools.think_end)
                        for (delta, reason), k in zip(out, shares):
                            lp, held = None, held_lp[ev.index]
                            if k:
                                lp, held_lp[ev.index] = {"content": held[:k], "refusal": None}, held[k:]
                            choice = {"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
                            if reason is not None:  # the choice's last chunk
                                choice["stop_reason"] = ev.stop_reason if reason == "stop" else None
                            yield {**head, "choices": [choice]}
                        if loops.all_ended(finished):
                            usage = loops.usage()  # the rest is cancelled as the stream closes
                            break
                    elif ev.text or (want_lp and ev.logprobs):
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": ev.index,
                                    "delta": {"content": ev.text},
                                    "logprobs": {"content": chat_logprob_entries(ev.logprobs), "refusal": None} if want_lp else None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    if ev.finish is not None and calls is None:
                        yield {**head, "choices": [{"index": ev.index, "delta": {}, "logprobs": None,
                                                    "finish_reason": ev.finish.value, "stop_reason": ev.stop_reason}]}
                elif isinstance(ev, GenerationDone):
                    usage, timings = ev.usage, timings_wire(ev.timings, ev.usage)
        if include_usage:
            yield {**head, "choices": [], "usage": usage_dict(usage, thinking.tokens)}
        if timings:
            yield Timed(timings)  # (with_timings puts them on the last chunk, as llama.cpp's server does)
