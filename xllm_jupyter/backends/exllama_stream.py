"""exllama jobs (both libraries) that put each token out in the step that samples it, where the library would hold it
back."""

from __future__ import annotations

import codecs
import inspect
from typing import Any, Callable

from ..core.errors import EngineError

#: the per-token tensors of a result (``(1, n, ...)``, one row per token), all cut alike
_PER_TOKEN = ("token_ids", "token_probs", "top_k_tokens", "top_k_probs", "logits")


class StreamHeld:
    """Mixed into an exllama job: a token the library holds back goes out at once, with the text it completes.

    exllamav2 0.3.2 holds a step's tokens and text while the text held so far decodes with U+FFFD, and it tests
    everything held since the last release: after one byte that makes no character, every later token stays held
    until the job ends (or five U+FFFD). Streaming stops, and a stop string in that text (the engine matches them
    on streamed text) is seen only at the end, while the job goes on generating to it. exllamav3 holds only while
    the text ends in an incomplete character, but then a byte's token (its logprobs) went out a step after it was
    sampled, with the token that completes the character. Here a held token's result
    gets the token (id, probability, top-k, as the library would release them) and the text its bytes complete:
    an incremental UTF-8 decoder over the tokens' own bytes (``xllm_bind_stream``), as the transformers backend's
    detokenizer releases text and as ``exllama_results.with_held_answer`` splits a release. When the library then
    releases what it held (at a clean decode, the fifth U+FFFD, or the end; at a stop token under ``held``), the
    tokens already out are cut off its result and the rest take their text from the same decoder, so nothing goes
    out twice and a character split across the release still joins up; at the end what the decoder holds goes out
    as U+FFFD (``IncrementalDetokenizer.flush`` says why), and a stop token's own text never. Once the decoder has
    no partial character left, the library's own text takes over again. We give the library no stop strings or
    banned strings (the engine matches stop strings), so its holds are only these.
    """

    #: a token's own bytes (``ChatTokenizer.token_bytes``); None: the library's holds stand (no byte spelling)
    xllm_token_bytes: Callable[[int], bytes] | None = None
    #: held tokens already out, at the head of what the library holds
    xllm_streamed = 0
    #: set while we write the text (from a hold until no partial character is left)
    xllm_decoder: Any = None
    #: where ``results`` is among ``receive_sample``'s arguments after ``next_prob`` (exllamav2 passes
    #: ``filter_eos`` first)
    xllm_results_at = 0

    def xllm_bind_stream(self, token_bytes: Callable[[int], bytes] | None) -> None:
        """Stream held tokens, spelling them with ``token_bytes``."""
        self.xllm_token_bytes = token_bytes

    def receive_sample(self, logits: Any, next_token: Any, next_k_tokens: Any, next_k_probs: Any, next_prob: Any,
                       *rest: Any) -> Any:
        """Take a sampled token (library: it appends this step's result to ``results``); then put out what it held."""
        results: list = rest[self.xllm_results_at]
        first = len(results)
        out = super().receive_sample(  # type: ignore[misc]
            logits, next_token, next_k_tokens, next_k_probs, next_prob, *rest)
        if self.xllm_token_bytes is None or len(results) != first + 1:
            return out
        r = results[first]
        held = not r.get("eos") and "token_ids" not in r
        if self.xllm_decoder is None:
            if not held:
                return out  # the library streams it (every token of an answer in whole characters)
            self.xllm_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if held:
            self.xllm_stream_out(r, next_token, next_prob, next_k_tokens, next_k_probs)
        else:
            self.xllm_stream_release(r)
        return out

    def xllm_stream_out(self, r: dict, token: Any, prob: Any, k_tokens: Any, k_probs: Any) -> None:
        """Give the hold result ``r`` the token the library just held, with the text it completes."""
        # copies on the CPU, as the library releases them: exllamav3 passes the token as a view of a pinned buffer
        # every step rewrites, and the probabilities on the GPU
        r["token_ids"] = _copy(token)
        if self.return_probs and prob is not None:  # type: ignore[attr-defined]
            r["token_probs"] = _copy(prob)
        if self.return_top_tokens > 0 and k_tokens is not None:  # type: ignore[attr-defined]
            r["top_k_tokens"], r["top_k_probs"] = _copy(k_tokens), _copy(k_probs)
        r["text"] = self.xllm_decoder.decode(self.xllm_token_bytes(int(token.reshape(-1)[0])))  # type: ignore[misc]
        self.xllm_streamed += 1

    def xllm_stream_release(self, r: dict) -> None:
        """Cut the tokens already out off the library's release ``r`` (at a stop token, its ``held``); the rest
        with the text they complete (a stop token's none), and at the end what is left as U+FFFD."""
        source = r.pop("held", None) if r.get("eos") and "token_ids" not in r else r
        skip, self.xllm_streamed = self.xllm_streamed, 0
        for key in _PER_TOKEN:
            if source is not None and source.get(key) is not None:
                r[key] = source[key][:, skip:]
        ids = [int(t) for t in r["token_ids"].reshape(-1).tolist()] if r.get("token_ids") is not None else []
        if r.get("eos_reason") == "stop_token" and ids:
            ids = ids[:-1]  # the stop token: counted, its text not shown
        decoder = self.xllm_decoder
        text = "".join(decoder.decode(self.xllm_token_bytes(t)) for t in ids)  # type: ignore[misc]
        if r.get("eos"):
            text += decoder.decode(b"", final=True)
        r["text"] = text
        if not decoder.getstate()[0]:  # whole characters again: the library's text is right from here on
            self.xllm_decoder = None


def _copy(tensor: Any) -> Any:
    """``tensor`` copied to the CPU."""
    return tensor.to("cpu", copy=True)


def check_receive_sample(job: type, mixin: type[StreamHeld], library: str) -> None:
    """EngineError naming ``library`` (name and version), before anything loads, when its ``job.receive_sample`` does
    not take ``results`` where ``mixin`` reads it: the mixin takes it by position (the generators pass it so), so a
    release that moved it would fail every decoding step, or stream another argument's tokens, instead of refusing."""
    try:
        names = list(inspect.signature(job.receive_sample).parameters)
    except (AttributeError, TypeError, ValueError):
        names = []
    at = 6 + mixin.xllm_results_at  # (self, logits, next_token, next_k_tokens, next_k_probs, next_prob, ...)
    if len(names) <= at or names[at] != "results":
        raise EngineError(f"{library}: {job.__name__}.receive_sample does not take 'results' where this xllm passes "
                          f"it; this xllm does not support that release of the library (see the [exl3]/[exl2] "
                          f"extras for the versions)")


class StreamHeldV2(StreamHeld):
    """``StreamHeld`` for exllamav2's ``ExLlamaV2DynamicJob`` (``receive_sample(..., filter_eos, results)``)."""

    xllm_results_at = 1


class StreamHeldV3(StreamHeld):
    """``StreamHeld`` for exllamav3's ``Job`` (``receive_sample(..., results, first_sample_in_sd_batch)``)."""

    xllm_results_at = 0
