"""vLLM's ``stop_reason`` on chat and legacy completion choices: the stop string that ended the choice, the request's
stop token id that did, or null (EOS, ``length``, tool calls); in a stream on each choice's last chunk. The engine
carries it in ``ChoiceDelta`` (fake backend); the wire through the real server, SDK and httpx. Responses has none."""

from __future__ import annotations

import json

import pytest

from tests.server_fixtures import TINY
from tests.test_engine import collect, make_engine, req
from tests.fake_backend import EOS
from xllm_jupyter.core.types import ChoiceDelta

MSG = [{"role": "user", "content": "Hi"}]
GREEDY = dict(model=TINY, max_tokens=24, temperature=0)


async def _reasons(engine, request) -> dict[int, object]:
    reasons = {}
    async for ev in engine.generate(request):
        if isinstance(ev, ChoiceDelta) and ev.finish is not None:
            reasons[ev.index] = ev.stop_reason
    return reasons


async def test_the_engine_names_the_stop_string_or_the_requests_stop_token():
    engine, _ = make_engine()  # the fake model writes "t7 t8 t9 ..." for this prompt, "t<id> " a token
    assert await _reasons(engine, req(max_tokens=20, stop=("nope", "t9", " t"))) == {0: " t"}  # the earliest match
    assert await _reasons(engine, req(max_tokens=20, stop=("8 t9", "t8"))) == {0: "t8"}
    assert await _reasons(engine, req(max_tokens=20, stop_token_ids=(9,))) == {0: 9}
    assert await _reasons(engine, req(max_tokens=3)) == {0: None}  # length
    assert await _reasons(engine, req(prompt=(99, 1), max_tokens=10)) == {0: None}  # the model's EOS
    # EOS listed in stop_token_ids is still the model's end, unless ignore_eos made it an ordinary token
    assert await _reasons(engine, req(prompt=(99, 1), max_tokens=10, stop_token_ids=(EOS,))) == {0: None}
    assert await _reasons(engine, req(prompt=(99, 1), max_tokens=10, stop_token_ids=(EOS,), ignore_eos=True)) == {0: EOS}
    texts, finishes, _ = await collect(engine, req(max_tokens=20, stop_token_ids=(9,)))
    assert texts[0] == "t7 t8 " and finishes[0].value == "stop"
    await engine.stop()


def _stop_in(text: str) -> str:
    """A 4-character piece of the greedy reply to cut at (the reply is long enough: checked)."""
    assert len(text) > 12, text
    return text[8:12]


def test_chat_names_the_stop_string_in_the_reply_and_the_last_chunk(client, raw):
    full = client.chat.completions.create(messages=MSG, **GREEDY).choices[0]
    assert full.finish_reason == "length" and full.model_extra["stop_reason"] is None
    stop = _stop_in(full.message.content)
    r = client.chat.completions.create(messages=MSG, stop=["\u2603never", stop], **GREEDY).choices[0]
    assert (r.finish_reason, r.model_extra["stop_reason"]) == ("stop", stop)
    chunks = list(client.chat.completions.create(messages=MSG, stop=[stop], stream=True, n=2, **GREEDY))
    last = {c.choices[0].index: c.choices[0] for c in chunks if c.choices}
    assert [(ch.finish_reason, ch.model_extra["stop_reason"]) for ch in last.values()] == [("stop", stop)] * 2
    # only the last chunk carries it: the others keep OpenAI's shape
    body = {"model": TINY, "messages": MSG, "max_tokens": 24, "temperature": 0, "stop": stop, "stream": True}
    events = [json.loads(line[6:]) for line in raw.post("/v1/chat/completions", json=body).text.splitlines()
              if line.startswith("data: {")]
    assert ["stop_reason" in e["choices"][0] for e in events] == [False] * (len(events) - 1) + [True]


def test_legacy_completions_name_the_stop_string(client):
    kw = dict(model=TINY, prompt="Hello", max_tokens=24, temperature=0)
    full = client.completions.create(**kw).choices[0]
    assert full.finish_reason == "length" and full.model_extra["stop_reason"] is None
    stop = _stop_in(full.text)
    r = client.completions.create(**kw, stop=stop).choices[0]
    assert (r.finish_reason, r.model_extra["stop_reason"]) == ("stop", stop)
    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    assert chunks[-1].choices[0].model_extra["stop_reason"] == stop
    assert all("stop_reason" not in c.choices[0].model_extra for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_finish_has_no_stop_reason(client, stream):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = client.chat.completions.create(messages=MSG, tools=tools, tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=40, seed=1, model=TINY, stream=stream)
    if stream:
        last = [c.choices[0] for c in r if c.choices][-1]
    else:
        last = r.choices[0]
    assert last.finish_reason == "tool_calls" and last.model_extra["stop_reason"] is None


def test_the_responses_api_has_no_stop_reason(raw):
    body = {"model": TINY, "input": "Hi", "max_output_tokens": 16, "temperature": 0, "stop": "e"}
    r = raw.post("/v1/responses", json=body)
    assert r.status_code == 200 and "stop_reason" not in r.text


#: a plain token of the tiny model's vocabulary (not its EOS), forced at every step by logit_bias
FORCED = 300


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_token_id_of_the_request_is_named(client, stream):
    """vLLM's ``stop_token_ids``: the choice ends at the token (its text is not shown) and ``stop_reason`` is its id."""
    kw = dict(temperature=0, max_tokens=8, logit_bias={str(FORCED): 100}, stream=stream,
              extra_body={"stop_token_ids": [7, FORCED]})
    chat = client.chat.completions.create(model=TINY, messages=MSG, **kw)
    legacy = client.completions.create(model=TINY, prompt="Hello", **kw)
    if stream:
        chat_last, legacy_last = [c.choices[0] for c in chat if c.choices][-1], list(legacy)[-1].choices[0]
    else:
        chat_last, legacy_last = chat.choices[0], legacy.choices[0]
        assert chat.usage.completion_tokens == 1 and chat_last.message.content == "" and legacy_last.text == ""
    for last in (chat_last, legacy_last):
        assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", FORCED)


@pytest.mark.parametrize("ids", [[-1], [2**31], ["7"], 7])
def test_stop_token_ids_are_token_ids(raw, ids):
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": MSG, "max_tokens": 2, "stop_token_ids": ids})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("stop_token_ids"), r.text


def test_the_responses_api_takes_stop_token_ids(client):
    kw = dict(model=TINY, input="Hi", max_output_tokens=16, temperature=0, extra_body={"logit_bias": {str(FORCED): 100}})
    assert client.responses.create(**kw).status == "incomplete"  # the forced token runs to max_output_tokens
    kw["extra_body"]["stop_token_ids"] = [FORCED]
    r = client.responses.create(**kw)
    assert r.status == "completed" and r.output_text == "" and r.usage.output_tokens == 1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_stop_token_id_outside_the_vocabulary_is_a_400(raw, path):
    """An id no token of the model has would never end the choice (ids from another model's tokenizer, say): a 400
    naming ``stop_token_ids``, as ``logit_bias`` ids outside the vocabulary are (and as vLLM now checks them)."""
    body = {"model": TINY, **{"/v1/chat/completions": {"messages": MSG, "max_tokens": 2},
                              "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
                              "/v1/responses": {"input": "Hi", "max_output_tokens": 16}}[path]}
    for ids in ([FORCED, 2**31 - 1], [10**6]):
        r = raw.post(path, json={**body, "stop_token_ids": ids})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["type"]) == ("stop_token_ids", "invalid_request_error")
        assert f"Token id {ids[-1]} in 'stop_token_ids' is outside this model's vocabulary" in err["message"]
    assert raw.post(path, json={**body, "stop_token_ids": [FORCED] * 1000 + [0]}).status_code == 200  # repeats are fine


async def test_the_choices_of_a_request_share_one_stop_token_set():
    """The n choices of a request hold its stop tokens (and EOS) as one set, not a copy each: a request may list
    thousands of ids (a 150k-token vocabulary's are ~8 MB as a set), and each copy lived as long as its choice."""
    engine, backend = make_engine()
    await collect(engine, req(max_tokens=2))  # (loads the model)
    model, seen = backend.models["fake"], []
    add = model.add
    model.add = lambda job: (seen.append(job.stop_token_ids), add(job))[1]
    await collect(engine, req(max_tokens=3, n=4, stop_token_ids=tuple(range(500, 600))))
    assert len(seen) == 4 and all(s is seen[0] for s in seen) and {550, EOS} <= seen[0]
    await engine.stop()
