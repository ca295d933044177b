"""Logprobs describe tokens, not released text: a character split over tokens gives each of them its own
bytes (chat ``bytes``, legacy ``tokens``), alternatives carry real bytes too, and legacy ``top_logprobs``
always hold the sampled token. Real server, tiny Llama with SmolLM2's byte-level BPE tokenizer, openai SDK."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.server_fixtures import TINY
from tests.test_exllama_adapters import ScriptedGenerator, ScriptedModel, streaming
from xllm_jupyter.backends.base import ModelSpec
from xllm_jupyter.backends.hf_tokenizer import ChatTokenizer
from xllm_jupyter.core.types import SamplingParams, SequenceJob

MSG = [{"role": "user", "content": "Say something."}]
#: every tokenization of these characters splits them: SmolLM2's vocabulary has no token holding a whole one
SPLIT = "メ😀"
#: the three byte-level tokens of "😀" (f0 9f | 98 | 80), forced with logit_bias
EMOJI_TOKENS = {10813: "\\xf0\\x9f", 242: "\\x98", 218: "\\x80"}


def _whole(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _check_entries(entries, content: str) -> None:
    raws = [bytes(e.bytes) for e in entries]
    assert b"".join(raws) == content.encode("utf-8")
    assert all(raws) and not all(_whole(r) for r in raws)  # every token has bytes; some hold part of a character
    for e, raw in zip(entries, raws):
        assert e.token == raw.decode("utf-8", errors="backslashreplace") and "\ufffd" not in e.token
        # greedy under the grammar: the chosen token is an alternative too, with the same bytes
        assert any(bytes(a.bytes) == raw and a.token == e.token and a.logprob == pytest.approx(e.logprob, abs=1e-4)
                   for a in e.top_logprobs)
        assert all(a.token == bytes(a.bytes).decode("utf-8", errors="backslashreplace") for a in e.top_logprobs)
    # tokens the grammar rules out have -inf, which JSON cannot carry: OpenAI's -9999.0 instead
    alternatives = [a.logprob for e in entries for a in e.top_logprobs]
    assert all(math.isfinite(p) and p >= -9999.0 for p in alternatives) and -9999.0 in alternatives


def test_chat_logprobs_give_each_token_of_a_split_character_its_own_bytes(client):
    kwargs = dict(model=TINY, messages=MSG, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3,
                  response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": [SPLIT]}}})
    r = client.chat.completions.create(**kwargs)
    content = r.choices[0].message.content
    assert json.loads(content) == SPLIT
    _check_entries(r.choices[0].logprobs.content, content)
    details = r.usage.completion_tokens_details
    assert (details.reasoning_tokens, details.audio_tokens, details.accepted_prediction_tokens,
            details.rejected_prediction_tokens) == (0, 0, 0, 0)

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    _check_entries(streamed, content)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 0


def test_legacy_logprobs_name_each_token_and_always_hold_the_sampled_one(client):
    prompt = "Hi"
    bias = {str(t): 100 for t in EMOJI_TOKENS}
    # logprobs come from the model's logits, before the bias: the top alternative is never the sampled token
    r = client.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0, logit_bias=bias, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 6
    assert set(lp.tokens) <= set(EMOJI_TOKENS.values())  # the token's own bytes, not the text it released
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == pytest.approx(logprob) and len(top) <= 2
    # offsets count characters: a token that continues a character stays at it
    starts = [t == EMOJI_TOKENS[10813] for t in lp.tokens]
    assert lp.text_offset == [len(prompt) + sum(starts[:i]) - (0 if starts[i] else 1) for i in range(len(starts))]
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    # streamed, the offsets are the same (each chunk continues from the characters before it)
    chunks = list(client.completions.create(model=TINY, prompt=prompt, max_tokens=6, temperature=0, logit_bias=bias,
                                            logprobs=1, stream=True))
    assert [o for c in chunks if c.choices and c.choices[0].logprobs
            for o in c.choices[0].logprobs.text_offset] == lp.text_offset

    r = client.completions.create(model=TINY, prompt=prompt, max_tokens=4, temperature=1, seed=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs == [{t: p} for t, p in zip(lp.tokens, lp.token_logprobs)]


def test_exllama_events_carry_each_tokens_bytes(tiny_llama_dir):
    chat = ChatTokenizer.from_directory(str(tiny_llama_dir), "s")
    model = ScriptedModel(ModelSpec(name="s", path=Path(tiny_llama_dir)), generator=ScriptedGenerator(), chat=chat,
                          context_length=2048, vocab_size=len(chat.tokenizer), eos_token_ids=chat.eos_ids(),
                          max_batch_size=8, memory_bytes=1, details={})
    model.add(SequenceJob(job_id=1, prompt_ids=(1, 2), max_tokens=4, sampling=SamplingParams(temperature=0),
                          logprobs=True, top_logprobs=2))
    ids = chat.tokenize("メ", add_special_tokens=False)  # two tokens (e3 83 | a1); the step's text rides on the last
    assert len(ids) == 2
    model.generator.script.append([streaming(1, ids, "メ", token_probs=torch.tensor([[0.5, 0.25]]),
                                             top_k_tokens=torch.tensor([[ids, ids[::-1]]]),
                                             top_k_probs=torch.tensor([[[0.5, 0.1], [0.25, 0.1]]]))])
    first, second = model.step()
    assert (first.token_bytes, second.token_bytes) == (b"\xe3\x83", b"\xa1")
    assert first.top_bytes == (b"\xe3\x83", b"\xa1") and second.top_bytes == (b"\xa1", b"\xe3\x83")
    assert [t for t, _ in first.top_logprobs] == ["\\xe3\\x83", "\\xa1"]
    assert second.logprob == pytest.approx(math.log(0.25))
