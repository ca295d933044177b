"""The exllama generators' per-step result dicts as TokenEvents (one per sampled token), for both libraries."""

from __future__ import annotations

import codecs
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ..core.types import FinishReason, TokenEvent
from .detokenize import token_text
from .exllama_common import PAGE_SIZE

log = logging.getLogger(__name__)

#: the generators' ``eos_reason`` values and what OpenAI calls them
EOS_REASONS: dict[str, FinishReason] = {
    "stop_token": FinishReason.STOP,
    "stop_string": FinishReason.STOP,
    "end_filter": FinishReason.STOP,
    "loop_detected": FinishReason.STOP,
    "max_new_tokens": FinishReason.LENGTH,
}


@dataclass
class JobInfo:
    """What translation needs to know about one running job."""

    job_id: int
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_tokens: int = 0
    #: prompt tokens served from the prefix cache, known once the job's prefill is done (its first token)
    cached: int | None = None
    #: whether the model's prefix-cache counters have this job yet
    counted: bool = False
    #: special tokens whose text this job's output keeps (tool-call markup: ``ChatTokenizer.keeping``), with the
    #: speller that spells them by it; None: every special token's text is taken out
    kept: Any = None

    def __post_init__(self) -> None:
        # a kept token's name in top_logprobs is its text, as its bytes and the chosen token's name are (the
        # model's ``piece`` spells a special token ""): made once per job, not per result
        self.kept_name: Callable[[int], str] | None = None
        if self.kept is not None:
            spell = self.kept.token_bytes
            self.kept_name = lambda t: token_text(spell(t))


@dataclass
class SpeculativeStats:
    """Draft tokens accepted and rejected so far (speculative decoding)."""

    accepted: int = 0
    rejected: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted, or None before anything was drafted."""
        total = self.accepted + self.rejected
        return self.accepted / total if total else None


def _row(value: Any) -> list:
    """The first row of a (1, n[, k]) tensor or nested list as Python lists."""
    if value is None:
        return []
    if hasattr(value, "tolist"):
        # the whole tensor converted, then its row: indexing a tensor first makes a view (a few µs per token)
        return value.tolist()[0]
    return list(value[0])


def job_cached_tokens(job: Any, page_size: int) -> int:
    """Prompt tokens a library job took from the prefix cache (whole pages and a partial match), as its
    end-of-sequence result reports them; known from its first token on, so a job the engine ends
    itself (a stop string) reports them too."""
    try:
        return int(job.cached_pages) * page_size + int(job.cached_tokens)
    except (AttributeError, TypeError, ValueError):
        return 0


def translate_results(results: Iterable[Mapping[str, Any]], jobs: Mapping[int, JobInfo],
                      piece: Callable[[int], str], spec_stats: SpeculativeStats | None = None,
                      page_size: int = PAGE_SIZE, special: Mapping[int, str] | None = None,
                      raw: Callable[[int], bytes] | None = None) -> list[TokenEvent]:
    """TokenEvents for the ``streaming`` and ``error`` results of one ``iterate()`` call (one per sampled token).

    A result may carry several tokens (speculative decoding accepted a draft, the library released what it held);
    each gets an event, with the text it completes where their bytes (``raw``) make the result's text
    (``texts_by_token``), else the step's text rides on the last one. The job's first event carries its cached
    prompt tokens; the ``eos`` result becomes the finishing event, with the usage counters the
    generator reports; a ``stop_token`` end releases what the library still held back and the stop token itself,
    without its text (``with_held_answer``).
    An ``error`` result (exllamav3 dropped a job whose prefill or page
    allocation raised) finishes the job with ERROR, so its request fails instead of hanging.
    ``special`` maps special token ids to their literal text, which exllamav3 streams
    (``<|im_end|>`` under ``ignore_eos``, say) and is taken out, as the transformers backend skips it, bar the ones a
    job keeps (``JobInfo.kept``: tool-call markup), which stay in its text and spell its logprobs.
    ``piece`` names a token for ``top_logprobs``; ``raw`` gives a token's own bytes for logprobs (the
    step's text rides on its last token, and a character split over tokens is in none of them alone).
    """
    events: list[TokenEvent] = []
    for r in results:
        stage = r.get("stage")
        if stage == "error":
            job_id = r.get("identifier", getattr(r.get("job"), "identifier", None))
            info = jobs.get(job_id)  # type: ignore[arg-type]
            if info is not None:
                error = r.get("error")
                log.error("the generator dropped job %s: %s", job_id, type(error).__name__,
                          exc_info=error if isinstance(error, BaseException) else None)
                # (torch.OutOfMemoryError by name: this module imports no torch)
                events.append(TokenEvent(info.job_id, None, "", finish=FinishReason.ERROR,
                                         out_of_memory=type(error).__name__ == "OutOfMemoryError"))
            continue
        if stage != "streaming":
            continue
        info = jobs.get(r.get("identifier"))  # type: ignore[arg-type]
        if info is None:
            continue
        held = bool(r.get("eos") and r.get("eos_reason") == "stop_token" and not _row(r.get("token_ids")))
        texts: list[str] = []  # the text token by token (empty: the step's text rides on its last token)
        spell = raw if info.kept is None or raw is None else info.kept.token_bytes
        name = info.kept_name or piece
        if held:
            r = with_held_answer(r, spell)
            texts = r.get("token_texts") or []
        ids = [int(t) for t in _row(r.get("token_ids"))]
        text = r.get("text") or ""
        if special and text and not held:  # (a held answer's text is its tokens' bytes: no special token's text)
            for token in ids:
                if token in special and (info.kept is None or token not in info.kept.text):
                    text = text.replace(special[token], "", 1)
        if len(ids) > 1 and not texts and spell is not None:
            # several tokens the library held back (an invalid byte: exllamav2 holds all after it until the end):
            # token by token when their bytes make the library's text, for the reason ``with_held_answer`` gives
            split = texts_by_token([spell(t) for t in ids])
            texts = split if "".join(split) == text else []
        finish = None
        prompt_tokens = completion = 0
        cached = 0
        if info.cached is None:
            cached = info.cached = job_cached_tokens(r.get("job"), page_size)
        if r.get("eos"):
            finish = EOS_REASONS.get(str(r.get("eos_reason")), FinishReason.STOP)
            prompt_tokens = int(r.get("prompt_tokens") or 0)
            cached = int(r.get("cached_tokens") or 0)
            completion = int(r.get("new_tokens") or 0)
            if spec_stats is not None:
                spec_stats.accepted += int(r.get("accepted_draft_tokens") or 0)
                spec_stats.rejected += int(r.get("rejected_draft_tokens") or 0)
        probs = _row(r.get("token_probs")) if info.logprobs else []
        top_ids = _row(r.get("top_k_tokens")) if info.top_logprobs else []
        top_probs = _row(r.get("top_k_probs")) if info.top_logprobs else []
        if not ids:
            events.append(TokenEvent(info.job_id, None, text, finish=finish, prompt_tokens=prompt_tokens,
                                     cached_tokens=cached, completion_tokens=completion))
            continue
        if len(ids) == 1 and not probs and not top_ids:
            # one token, no logprobs: every decode step of every job without speculation lands here
            events.append(TokenEvent(info.job_id, ids[0], text, finish=finish, prompt_tokens=prompt_tokens,
                                     cached_tokens=cached, completion_tokens=completion))
            continue
        last = len(ids) - 1
        for i, token in enumerate(ids):
            logprob = _log(probs[i]) if i < len(probs) else None
            alternatives = [int(t) for t in top_ids[i]][: info.top_logprobs] if i < len(top_ids) else []
            top = tuple((name(t), _log(p)) for t, p in zip(alternatives, top_probs[i])) if alternatives else ()
            end = i == last
            events.append(TokenEvent(
                info.job_id, token, texts[i] if texts else text if end else "", logprob, top,
                finish=finish if end else None,
                prompt_tokens=prompt_tokens if end else 0,
                cached_tokens=cached if end else 0,
                completion_tokens=completion if end else 0,
                token_bytes=spell(token) if spell is not None and logprob is not None else None,
                top_bytes=tuple(spell(t) for t in alternatives) if spell is not None and alternatives else (),
            ))
    return events


def with_held_answer(r: Mapping[str, Any], raw: Callable[[int], bytes] | None) -> dict[str, Any]:
    """A ``stop_token`` end result with what the library still held (``r["held"]``) as its tokens and text.

    Both libraries hold a step's text and tokens back while they end in an incomplete UTF-8 character (or a
    possible stop-string match) and end a job on a stop token without emitting them: the end result carries them
    under ``held``, the stop token last. The tokens before it are the answer's (text, tokens, probabilities); the
    stop token is a token of the answer too, counted in usage with its probability, as on the transformers backend
    (and in OpenAI's usage), but its text is not. The text is the answer tokens' own bytes (``raw``) decoded
    together, token by token (``token_texts``: each token's event the characters it completes), a character they
    leave incomplete as U+FFFD on the stop token (what the libraries and the transformers backend release at any
    end); without ``raw``, the held text less the stop token's, all of it on the stop token. Without ``held``, the
    stop token alone (``eos_triggering_token_id``).
    """
    held = r.get("held") or {}
    ids = [int(t) for t in _row(held.get("token_ids"))]
    if not ids and r.get("eos_triggering_token_id") is not None:  # (nothing held: the stop token alone)
        ids = [int(r["eos_triggering_token_id"])]
    keep = max(0, len(ids) - 1)  # the stop token is the last held token
    out = dict(r)
    out["token_ids"] = [ids]
    for key in ("token_probs", "top_k_tokens", "top_k_probs"):
        if held.get(key) is not None:
            out[key] = [_row(held[key])]
    if raw is None:
        text = str(held.get("text") or "")
        stop = str(r.get("eos_triggering_token_str") or "")
        out["text"] = (r.get("text") or "") + (text[: -len(stop)] if stop and text.endswith(stop) else text)
        return out
    # each token's event carries the text it completes, as the transformers backend's detokenizer releases it: the
    # engine then matches a stop string at the token that completes it and counts (usage, logprobs) no token after
    # it, as there (all of it riding on the stop token, every held token counted, the stop token too). The stop
    # token's own text is none; a character the answer leaves incomplete goes out with it as U+FFFD
    # (IncrementalDetokenizer.flush: why U+FFFD and not nothing)
    texts = texts_by_token([raw(t) for t in ids[:keep]] + [b""]) if ids else []
    out["text"] = (r.get("text") or "") + "".join(texts)
    if texts:
        texts[0] = (r.get("text") or "") + texts[0]
        out["token_texts"] = texts
    return out


def texts_by_token(pieces: list[bytes]) -> list[str]:
    """The text each of several tokens' bytes (``pieces``, in order) completes; what the last leaves incomplete
    goes out with it as U+FFFD (nothing more comes in this release)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = [decoder.decode(piece) for piece in pieces]
    if texts:
        texts[-1] += decoder.decode(b"", final=True)
    return texts


def _log(p: float) -> float:
    """log(p), finite for p == 0 (OpenAI clients expect numbers, not -inf)."""
    return math.log(p) if p > 0 else -9999.0
