"""Legacy completions' ``echo``: the prompt before each choice's text, and with ``logprobs`` the prompt's tokens
scored as the model sees them, the way lm-evaluation-harness's ``local-completions`` scores loglikelihood tasks.

Real server, real openai SDK, the tiny random Llama; the scores are checked against an independent transformers
forward over the same token ids.
"""

from __future__ import annotations

import openai
import pytest
import torch

from tests.server_fixtures import TINY
from xllm_jupyter.core.errors import Unsupported
from xllm_jupyter.core.types import GenerationParams, GenerationRequest

CONTEXT = "Question: what colour is the sky? Answer:"
CONTINUATIONS = [" blue", " green with envy"]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """The tiny Llama and its tokenizer loaded apart from the server, in float32: the scores to match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def hf_logprobs(reference, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids`` (row t predicts token t + 1)."""
    model, _ = reference
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check_prompt_scores(reference, lp, ids: list[int], text: str, k: int) -> None:
    """``lp``'s first ``len(ids)`` entries are the prompt's tokens, scored as the reference model scores them."""
    _, tok = reference
    n = len(ids)
    want = hf_logprobs(reference, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first token
    assert lp.tokens[:n] == [tok.decode([t]) for t in ids]
    for t in range(1, n):
        assert lp.token_logprobs[t] == pytest.approx(want[t - 1, ids[t]].item(), abs=1e-4)
        top = lp.top_logprobs[t]
        assert top[lp.tokens[t]] == pytest.approx(lp.token_logprobs[t], abs=1e-6)  # the token itself is always there
        best = sorted(top.values(), reverse=True)[:k]
        assert best == pytest.approx(want[t - 1].topk(k).values.tolist(), abs=1e-4)
        assert len(top) in (k, k + 1)
    # offsets point into the echoed text, token by token
    assert "".join(lp.tokens[:n]) == text
    assert lp.text_offset[:n] == [len("".join(lp.tokens[:t])) for t in range(n)]


def test_echo_scores_the_prompt_like_a_forward_pass(client, reference):
    """max_tokens 0 with echo and logprobs: the prompt alone, every token scored (first null), nothing generated."""
    _, tok = reference
    ids = tok.encode(CONTEXT + CONTINUATIONS[1])
    r = client.completions.create(model=TINY, prompt=CONTEXT + CONTINUATIONS[1], echo=True, logprobs=5, max_tokens=0,
                                  temperature=0)
    c = r.choices[0]
    assert c.text == CONTEXT + CONTINUATIONS[1] and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(ids)
    check_prompt_scores(reference, c.logprobs, ids, c.text, 5)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)


@pytest.mark.parametrize("max_tokens", [0, 1])
@pytest.mark.parametrize("k", [1, 5])
def test_the_lm_eval_harness_request_shape(client, reference, max_tokens, k):
    """local-completions' loglikelihood request: a batch of context + continuation prompts (strings, or token ids
    when it tokenizes), echo, logprobs, temperature 0, max_tokens 1 (or 0); it sums token_logprobs[ctxlen:-1]."""
    _, tok = reference
    prompts = [CONTEXT + c for c in CONTINUATIONS]
    ctxlen = len(tok.encode(CONTEXT))
    for sent in (prompts, [tok.encode(p) for p in prompts]):
        r = client.completions.create(model=TINY, prompt=sent, echo=True, logprobs=k, max_tokens=max_tokens,
                                      temperature=0, seed=1234)
        assert [c.index for c in r.choices] == [0, 1]
        for choice, prompt in zip(sorted(r.choices, key=lambda c: c.index), prompts):
            ids = tok.encode(prompt)
            lp = choice.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
                == len(ids) + max_tokens
            assert choice.text.startswith(prompt) and choice.finish_reason == "length"
            check_prompt_scores(reference, lp, ids, prompt, k)
            want = hf_logprobs(reference, ids)
            continuation = sum(want[t - 1, ids[t]].item() for t in range(ctxlen, len(ids)))
            end = len(lp.token_logprobs) - max_tokens
            assert sum(lp.token_logprobs[ctxlen:end]) == pytest.approx(continuation, abs=1e-3)
            if max_tokens:  # the generated token follows, greedy, with its own score and offset
                assert want[-1, :].argmax().item() == tok.convert_tokens_to_ids(tok.tokenize(lp.tokens[-1]))[0]
                assert lp.token_logprobs[-1] == pytest.approx(want[-1].max().item(), abs=1e-4)
                assert lp.text_offset[-1] == len(prompt) and choice.text == prompt + lp.tokens[-1]
        assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
        assert r.usage.completion_tokens == 2 * max_tokens


def test_echo_without_logprobs_is_text(client):
    """Without logprobs echo only puts the prompt before the completion; max_tokens 0 is the prompt alone."""
    kw = dict(model=TINY, prompt=["a b c", "d e"], temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(max_tokens=4, **kw)
    echoed = client.completions.create(max_tokens=4, echo=True, **kw)
    assert [c.text for c in echoed.choices] == ["a b c" + plain.choices[0].text, "d e" + plain.choices[1].text]
    assert all(c.logprobs is None for c in echoed.choices)
    only = client.completions.create(max_tokens=0, echo=True, n=2, **kw)
    assert [(c.index, c.text, c.finish_reason) for c in only.choices] == \
        [(0, "a b c", "length"), (1, "a b c", "length"), (2, "d e", "length"), (3, "d e", "length")]
    assert only.usage.completion_tokens == 0 and only.usage.prompt_tokens == plain.usage.prompt_tokens


def test_n_choices_share_the_prompt_scores(client, reference):
    """Every choice of a prompt starts with the same scored prompt, then its own completion."""
    _, tok = reference
    ids = tok.encode(CONTEXT)
    r = client.completions.create(model=TINY, prompt=CONTEXT, echo=True, logprobs=2, max_tokens=3, n=2, seed=3,
                                  temperature=1.0, extra_body={"ignore_eos": True})
    for c in r.choices:
        check_prompt_scores(reference, c.logprobs, ids, CONTEXT, 2)
        assert len(c.logprobs.tokens) == len(ids) + 3 and c.text.startswith(CONTEXT)
    zero = client.completions.create(model=TINY, prompt=CONTEXT, echo=True, logprobs=2, max_tokens=0, n=3)
    assert len(zero.choices) == 3 and all(c.logprobs == zero.choices[0].logprobs for c in zero.choices)


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_sends_the_prompt_first(client, reference, max_tokens):
    """A stream's first chunk of each choice starts with its prompt (and its scores); the chunks add up to the
    full reply's text and logprobs."""
    kw = dict(model=TINY, prompt=[CONTEXT, "d e"], echo=True, logprobs=2, max_tokens=max_tokens, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    for choice in full.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        prompt = [CONTEXT, "d e"][choice.index]
        assert mine[0].text.startswith(prompt) and mine[0].logprobs.token_logprobs[0] is None
        assert "".join(m.text for m in mine) == choice.text
        for key in ("tokens", "text_offset", "top_logprobs"):
            assert [x for m in mine for x in getattr(m.logprobs, key)] == getattr(choice.logprobs, key)
        assert [x for m in mine for x in m.logprobs.token_logprobs] == \
            pytest.approx(choice.logprobs.token_logprobs, abs=1e-5)
        assert mine[-1].finish_reason == "length"
    plain = [c.choices[0] for c in client.completions.create(stream=True, **{**kw, "logprobs": None}) if c.choices]
    for index, prompt in enumerate([CONTEXT, "d e"]):
        first = next(c for c in plain if c.index == index)
        assert first.text.startswith(prompt) and first.logprobs is None
    assert "".join(c.text for c in plain if c.index == 0) == full.choices[0].text


@pytest.mark.parametrize("body, param, code, fixed", [
    ({"max_tokens": 0}, "max_tokens", "integer_below_min_value", {"echo": True}),
    ({"max_tokens": 0, "echo": False}, "max_tokens", "integer_below_min_value", {"echo": True}),
    ({"max_tokens": -1, "echo": True}, "max_tokens", "integer_below_min_value", {"max_tokens": 0}),
    ({"echo": True, "suffix": "}"}, "suffix", "unsupported_parameter", {"suffix": ""}),
    ({"echo": True, "logprobs": 6}, "logprobs", "integer_above_max_value", {"logprobs": 5}),
    ({"echo": True, "best_of": 2, "stream": True, "max_tokens": 1}, "best_of", "invalid_value", {"stream": False}),
])
def test_bad_echo_combinations_are_400s(raw, body, param, code, fixed):
    """Each is refused for its one bad part, naming it: the same request with that part fixed is served."""
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    if body.get("max_tokens") == 0:
        assert "echo" in err["message"]  # says what 0 is for
    ok = raw.post("/v1/completions", json={"model": TINY, "prompt": "x", **body, **fixed})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"].startswith("x")


def test_a_backend_that_cannot_score_refuses_echo_with_logprobs(xllm_server, client):
    """exllama cannot give prompt logits: echo with logprobs is a 400 naming the backend, never scores left out;
    echo alone is text and still works there."""
    model = xllm_server.call(xllm_server.engine.load(TINY))
    model.scores_prompts = False  # (what an exllama model says)
    try:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=TINY, prompt="a b", echo=True, logprobs=1, max_tokens=1)
        assert info.value.param == "echo" and "transformers backend" in info.value.body["message"]
        assert info.value.code == "unsupported_parameter"
        assert client.completions.create(model=TINY, prompt="a b", echo=True, max_tokens=0).choices[0].text == "a b"
        assert client.completions.create(model=TINY, prompt="a b", echo=True, max_tokens=2).choices[0].text \
            .startswith("a b")
        # the engine refuses such a job itself, whoever asks
        request = GenerationRequest(model=TINY, prompt_ids=(1, 2), params=GenerationParams(max_tokens=0,
                                                                                            prompt_logprobs=True))

        async def consume():
            async for _ in xllm_server.engine.generate(request):
                pass

        with pytest.raises(Unsupported):
            xllm_server.call(consume())
    finally:
        del model.scores_prompts
    assert model.scores_prompts


def test_echo_bodies_over_the_wire(raw):
    """The raw JSON: null first entries, top_logprobs as objects, no NaN."""
    r = raw.post("/v1/completions", json={"model": TINY, "prompt": "a b c", "echo": True, "logprobs": 0,
                                          "max_tokens": 0})
    assert r.status_code == 200
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(d, dict) and len(d) == 1 for d in lp["top_logprobs"][1:])
    assert "NaN" not in r.text and "Infinity" not in r.text
    # a one-token prompt: only the unscored first entry
    one = raw.post("/v1/completions", json={"model": TINY, "prompt": [28], "echo": True, "logprobs": 2,
                                            "max_tokens": 0}).json()["choices"][0]
    assert one["logprobs"]["token_logprobs"] == [None] and one["logprobs"]["text_offset"] == [0]
    assert one["text"] == one["logprobs"]["tokens"][0] != ""
    # an empty prompt has nothing to echo or score
    assert raw.post("/v1/completions", json={"model": TINY, "prompt": "", "echo": True, "max_tokens": 0}).status_code \
        == 400


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompts_scores_are_converted_once_for_all_its_choices(client, monkeypatch, stream):
    """The wire form of a scored prompt (a dict per token, on the IOLoop) is built once per prompt, not once per
    choice: n choices of an 8k-token prompt took n x 30 ms of loop time before (0.45 s at n = 16)."""
    from xllm_jupyter.openai import completions

    built: list[int] = []
    real = completions.prompt_logprobs

    def counting(prompt):
        built.append(len(prompt))
        return real(prompt)

    monkeypatch.setattr(completions, "prompt_logprobs", counting)
    prompts = [CONTEXT, CONTEXT + CONTINUATIONS[1]]
    kwargs = dict(model=TINY, prompt=prompts, echo=True, logprobs=2, n=2, seed=1, temperature=1.0)
    for max_tokens in (0, 2):
        built.clear()
        if stream:
            chunks = list(client.completions.create(max_tokens=max_tokens, stream=True, **kwargs))
            firsts = {}
            for ch in chunks:
                for c in ch.choices:
                    firsts.setdefault(c.index, c)
            texts = {i: c.text for i, c in firsts.items()}
        else:
            r = client.completions.create(max_tokens=max_tokens, **kwargs)
            texts = {c.index: c.text for c in r.choices}
        assert sorted(texts) == list(range(4))
        assert all(texts[i].startswith(prompts[i // 2]) for i in range(4))  # every choice still echoes its prompt
        assert len(built) == 2 and len(set(built)) == 2, built  # one conversion per prompt, not per choice
