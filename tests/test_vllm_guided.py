"""vLLM's structured-output fields (``guided_json``/``guided_regex``/``guided_choice``/``guided_grammar`` and the
``structured_outputs`` object) constrain chat and legacy completions, through the openai SDK's ``extra_body`` as
clients ported from vLLM send them. They were dropped as unknown fields: the random tiny model's text matched none.
Each output is checked over several seeds; malformed or conflicting fields are 400s naming the field."""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.server_fixtures import TINY

HI = [{"role": "user", "content": "Answer"}]
SEEDS = (1, 2, 3, 4)
PLATE = "[a-z]{3}-[0-9]{2}"
CHOICES = ["red", "green blue", 'say "hi"', "café"]
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"]}
GBNF = 'root ::= answer " " digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'


def chat(client, extra, seed, **kw):
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=24, seed=seed, extra_body=extra, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


def legacy(client, extra, seed):
    r = client.completions.create(model=TINY, prompt="Answer:", max_tokens=24, seed=seed, extra_body=extra)
    return r.choices[0].text, r.choices[0].finish_reason


@pytest.mark.parametrize("extra", [{"guided_regex": PLATE}, {"structured_outputs": {"regex": PLATE}}])
@pytest.mark.parametrize("call", [chat, legacy])
def test_regex(client, call, extra):
    for seed in SEEDS:
        text, finish = call(client, extra, seed)
        assert re.fullmatch(PLATE, text) and finish == "stop", (seed, text)


@pytest.mark.parametrize("extra", [{"guided_choice": CHOICES}, {"structured_outputs": {"choice": CHOICES}}])
@pytest.mark.parametrize("call", [chat, legacy])
def test_choice(client, call, extra):
    for seed in SEEDS:
        text, finish = call(client, extra, seed)
        assert text in CHOICES and finish == "stop", (seed, text)


@pytest.mark.parametrize("extra", [{"guided_json": SCHEMA}, {"guided_json": json.dumps(SCHEMA)},
                                   {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}])
@pytest.mark.parametrize("call", [chat, legacy])
def test_json_schema(client, call, extra):
    for seed in SEEDS:
        text, finish = call(client, extra, seed)
        value = json.loads(text)
        assert value["color"] in ("red", "green") and isinstance(value["ok"], bool), (seed, text)
        assert set(value) == {"color", "ok"} and finish == "stop", (seed, text)


def test_json_object(client):
    for seed in SEEDS[:2]:
        r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=200, seed=seed,
                                           extra_body={"structured_outputs": {"json_object": True}})
        assert r.choices[0].finish_reason == "length" or isinstance(json.loads(r.choices[0].message.content), dict)
        assert r.choices[0].message.content.startswith("{"), r.choices[0].message.content


@pytest.mark.parametrize("extra", [{"guided_grammar": GBNF}, {"structured_outputs": {"grammar": GBNF}},
                                   {"guided_grammar": 'start: ("yes" | "no") " " /[0-9]/'}])  # Lark too, as vLLM's
@pytest.mark.parametrize("call", [chat, legacy])
def test_grammar(client, call, extra):
    for seed in SEEDS:
        text, finish = call(client, extra, seed)
        assert re.fullmatch("(yes|no) [0-9]", text) and finish == "stop", (seed, text)


def test_streamed_chat_matches(client):
    for seed in SEEDS[:2]:
        stream = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=24, seed=seed, stream=True,
                                                extra_body={"guided_regex": PLATE})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert re.fullmatch(PLATE, text), (seed, text)


def test_response_format_schema_wins_over_a_mirrored_guided_json(client):
    # vLLM writes response_format's schema over guided_json's: clients send both
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    other = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    for seed in SEEDS[:2]:
        text, _ = chat(client, {"guided_json": other}, seed, response_format=fmt)
        assert set(json.loads(text)) == {"color", "ok"}, text
        text, _ = chat(client, {"guided_json": other}, seed, response_format={"type": "text"})  # text: no constraint
        assert set(json.loads(text)) == {"n"}, text


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": PLATE, "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_json": SCHEMA, "structured_outputs": {"regex": PLATE}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": PLATE, "choice": ["a"]}}, "structured_outputs.choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": PLATE}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_choice": "red"}, "guided_choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": [1]}, "guided_json"),
    ({"structured_outputs": "regex"}, "structured_outputs"),
    ({"structured_outputs": {"regexp": PLATE}}, "structured_outputs.regexp"),
    ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"json": SCHEMA, "whitespace_pattern": " ?"}}, "structured_outputs.whitespace_pattern"),
    ({"guided_json": SCHEMA, "guided_whitespace_pattern": " ?"}, "guided_whitespace_pattern"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "   "}}, "structured_outputs.grammar"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    # vLLM's StructuredOutputsParams: an object naming no kind is its "must use one kind" 400; json_object false is a
    # kind there (so beside another it is "only one kind"), which then fails the request
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"disable_any_whitespace": True, "disable_fallback": True}}, "structured_outputs"),
    ({"structured_outputs": {"regex": None}}, "structured_outputs"),
    ({"guided_regex": PLATE, "structured_outputs": {"regex": None}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"json_object": False, "regex": PLATE}}, "structured_outputs.regex"),
    ({"guided_regex": PLATE, "structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
])
@pytest.mark.parametrize("route", ["chat", "legacy"])
def test_malformed_or_conflicting_fields_are_400s_naming_the_field(client, extra, param, route):
    with pytest.raises(openai.BadRequestError) as exc:
        if route == "chat":
            client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=4, extra_body=extra)
        else:
            client.completions.create(model=TINY, prompt="Hi", max_tokens=4, extra_body=extra)
    assert exc.value.status_code == 400 and exc.value.body["param"] == param, exc.value.body


def test_legacy_completions_take_response_format_as_vllm_does(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}
    for seed in SEEDS[:2]:
        text, _ = legacy(client, {"response_format": fmt}, seed)
        assert set(json.loads(text)) == {"color", "ok"}, text


def test_nulls_and_no_op_options_ask_for_nothing(client):
    extra = {"guided_json": None, "guided_decoding_backend": "xgrammar", "structured_outputs": None}
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=3, seed=1, extra_body=extra)
    assert r.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError) as exc:  # (the backend's name is typed all the same)
        client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=3,
                                       extra_body={"guided_decoding_backend": 5})
    assert exc.value.body["param"] == "guided_decoding_backend"


@pytest.mark.parametrize("extra, pattern", [({"guided_regex": PLATE}, PLATE),
                                            ({"structured_outputs": {"choice": CHOICES}}, "|".join(map(re.escape, CHOICES)))])
def test_responses_pass_them_on(client, extra, pattern):
    for seed in SEEDS[:2]:
        r = client.responses.create(model=TINY, input="Answer", max_output_tokens=24, extra_body={**extra, "seed": seed})
        assert re.fullmatch(pattern, r.output_text) and r.status == "completed", (seed, r.output_text)


def test_responses_conflict_names_text_format(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=TINY, input="Hi", max_output_tokens=4, text={"format": {"type": "json_object"}},
                                extra_body={"guided_regex": PLATE})
    assert exc.value.body["param"] == "guided_regex" and "'text.format'" in exc.value.body["message"], exc.value.body
