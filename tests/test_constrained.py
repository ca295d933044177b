"""Constrained decoding (llguidance): JSON schema, JSON object, Lark and regex, backend and server."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llguidance")

from tests.server_fixtures import TINY  # noqa: E402
from xllm_jupyter.backends.base import BackendOptions, ModelSpec  # noqa: E402
from xllm_jupyter.backends.constraints import GrammarCompiler  # noqa: E402
from xllm_jupyter.backends.hf_model import TransformersModel  # noqa: E402
from xllm_jupyter.backends.transformers import TransformersBackend  # noqa: E402
from xllm_jupyter.core.errors import InvalidRequest  # noqa: E402
from xllm_jupyter.core.types import Constraint, FinishReason, SamplingParams, SequenceJob  # noqa: E402
from xllm_jupyter.openai.structured import constraint_from_response_format  # noqa: E402

PROMPT = tuple(range(200, 230))
MSG = [{"role": "user", "content": "Describe a person as JSON."}]
NAME = {"type": "string", "maxLength": 12}

SCHEMAS = [
    {  # nested objects, required fields, integer range
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["person", "ok"],
        "additionalProperties": False,
    },
    {  # enums, arrays with minItems/maxItems
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        },
        "required": ["color", "tags"],
        "additionalProperties": False,
    },
    {  # array of objects, strings with maxLength, negative integer range
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": -5, "maximum": 5}, "label": NAME},
                    "required": ["id", "label"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    },
    {  # optional field, const, top-level array
        "type": "array",
        "minItems": 1,
        "maxItems": 3,
        "items": {
            "type": "object",
            "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0, "maximum": 99}, "note": NAME},
            "required": ["kind", "x"],
            "additionalProperties": False,
        },
    },
]


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> TransformersModel:
    """The tiny Llama loaded once for this module (no server: fast, direct stepping)."""
    m = TransformersBackend().load(ModelSpec(name="tiny", path=Path(tiny_llama_dir), options=BackendOptions(device="cpu")))
    yield m
    m.unload()


_ids = iter(range(1, 1_000_000))


def job(model, constraint=None, *, seed=0, temperature=1.0, max_tokens=200, prompt=PROMPT) -> SequenceJob:
    """A job that stops at the model's EOS tokens."""
    sampling = SamplingParams(temperature=temperature, seed=seed)
    return SequenceJob(next(_ids), tuple(prompt), max_tokens, sampling, model.eos_token_ids, constraint=constraint)


def run(model, jobs) -> dict[int, tuple[str, list[int], FinishReason]]:
    """Step until every job is done: job id -> (text, token ids, finish)."""
    out: dict[int, tuple[list[str], list[int]]] = {j.job_id: ([], []) for j in jobs}
    finish: dict[int, FinishReason] = {}
    for j in jobs:
        model.add(j)
    while model.active_jobs():
        for e in model.step():
            out[e.job_id][0].append(e.text)
            if e.token_id is not None:
                out[e.job_id][1].append(e.token_id)
            if e.finish is not None:
                finish[e.job_id] = e.finish
    return {k: ("".join(t), ids, finish[k]) for k, (t, ids) in out.items()}


def schema_constraint(schema) -> Constraint:
    """The constraint serving makes of a json_schema response_format."""
    return constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


# ----------------------------------------------------------------------- backend
def test_hundred_sampled_generations_all_validate(model):
    jobs = [job(model, schema_constraint(SCHEMAS[i % len(SCHEMAS)]), seed=1000 + i) for i in range(100)]
    results = run(model, jobs)
    lengths = [j.job_id for j in jobs if results[j.job_id][2] is FinishReason.LENGTH]
    assert lengths == [], "bounded schemas must always finish"
    outputs = set()
    for i, j in enumerate(jobs):
        text, _, finish = results[j.job_id]
        assert finish is FinishReason.STOP
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])
        outputs.add(text)
    assert len(outputs) > 50  # sampled, not one fixed answer


def test_greedy_and_seeded_are_deterministic(model):
    c = schema_constraint(SCHEMAS[1])
    greedy = [run(model, [j])[j.job_id] for j in (job(model, c, temperature=0), job(model, c, temperature=0))]
    assert greedy[0] == greedy[1] and greedy[0][2] is FinishReason.STOP
    jsonschema.validate(json.loads(greedy[0][0]), SCHEMAS[1])
    a, b, other = (job(model, c, seed=s) for s in (5, 5, 6))
    res = run(model, [a, b, other])
    assert res[a.job_id] == res[b.job_id]
    assert res[a.job_id][0] != res[other.job_id][0]


def test_lark_grammar_constrains_output(model):
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no" | "maybe"'
    res = run(model, [job(model, Constraint("lark", lark), seed=s) for s in range(4)])
    for text, _, finish in res.values():
        assert re.fullmatch(r"The answer is (yes|no|maybe)\.", text) and finish is FinishReason.STOP


def test_lark_with_embedded_json_schema(model):
    # the shape tool calling sends: literal framing around a %json{...} schema
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": False},
              "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "days"], "additionalProperties": False}
    lark = f'start: "<call>" args "</call>"\nargs: %json{json.dumps(schema)}'
    for text, _, finish in run(model, [job(model, Constraint("lark", lark), seed=s) for s in range(4)]).values():
        assert finish is FinishReason.STOP
        m = re.fullmatch(r"<call>(.*)</call>", text)
        assert m, text
        args = json.loads(m.group(1))
        assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 9


def test_regex_constrains_output(model):
    res = run(model, [job(model, Constraint("regex", r"[0-9]{3}-[a-z]{2,4}"), seed=s) for s in range(4)])
    for text, _, finish in res.values():
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text), text
        assert finish is FinishReason.STOP


def test_json_object_gives_an_object(model):
    # any object: the random model often rambles inside a string, so count the ones that finish
    res = run(model, [job(model, Constraint("json_object"), seed=s, max_tokens=60) for s in range(8)])
    finished = [text for text, _, finish in res.values() if finish is FinishReason.STOP]
    assert finished
    for text in finished:
        assert isinstance(json.loads(text), dict)
    for text, _, finish in res.values():
        assert text.startswith("{")


def test_unconstrained_jobs_in_the_same_batch_are_unaffected(model):
    plain = [job(model, None, temperature=0, max_tokens=24), job(model, None, seed=3, max_tokens=24)]
    alone = [run(model, [j])[j.job_id] for j in plain]
    again = [job(model, None, temperature=0, max_tokens=24), job(model, None, seed=3, max_tokens=24)]
    crowd = [job(model, schema_constraint(SCHEMAS[0]), seed=s) for s in range(3)]
    mixed = run(model, [crowd[0], again[0], crowd[1], again[1], crowd[2]])
    assert [mixed[j.job_id] for j in again] == alone
    for j in crowd:
        jsonschema.validate(json.loads(mixed[j.job_id][0]), SCHEMAS[0])


def test_max_tokens_cuts_a_constrained_output_with_length(model):
    res = run(model, [j := job(model, schema_constraint(SCHEMAS[2]), seed=1, max_tokens=3)])
    text, ids, finish = res[j.job_id]
    assert finish is FinishReason.LENGTH and len(ids) == 3 and text.startswith("{")


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint("json_schema", '{"type": "nonsense"}'),
        Constraint("json_schema", '{"type": "string", "pattern": "[a-"}'),
        Constraint("json_schema", "{not json"),
        Constraint("json_schema", "[1, 2]"),
        Constraint("regex", "[a-"),
        Constraint("lark", "start: undefined_rule"),
        Constraint("ebnf", "x"),
    ],
)
def test_bad_constraints_are_400s_before_and_at_add(model, constraint):
    with pytest.raises(InvalidRequest) as info:
        model.check_constraint(constraint)
    assert info.value.status == 400 and info.value.param == "response_format"
    with pytest.raises(InvalidRequest):
        model.add(job(model, constraint))
    assert model.active_jobs() == 0


def test_grammar_cache_is_bounded_lru(model):
    compiler = GrammarCompiler(model.tokenizer, model.vocab_size, model.eos_token_ids, cache_size=2)
    a, b, c = (Constraint("regex", p) for p in ("a+", "b+", "c+"))
    first = compiler.compile(a)
    assert compiler.compile(a) is first  # cached
    compiler.compile(b)
    compiler.compile(a)  # a is now the most recent
    compiler.compile(c)  # evicts b
    assert compiler.cached() == 2 and compiler.compile(a) is first
    fresh = compiler.new_matcher(a)
    assert fresh is not first and fresh.consume_token(compiler.tokenizer.tokenize_str("a")[0])
    assert not first.is_error()  # the cached matcher never advances


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "pattern": "^(a{700}){700}$"},  # valid, but ~0.5 s of lexer work a step at llguidance's defaults
        {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a{1000}){1000}$"}}, "required": ["x"]},
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}},  # a 12k-item parser row
    ],
)
def test_grammar_past_the_lexer_limits_is_refused_at_compile_every_time(model, schema):
    """Refused before a job is queued (its masks would stall the step thread for every batched request), and a
    repeat is refused from the cache at once (it used to compile from the cache and answer '' unconstrained)."""
    compiler = GrammarCompiler(model.tokenizer, model.vocab_size, model.eos_token_ids)
    for _ in range(2):
        with pytest.raises(InvalidRequest) as info:
            compiler.compile(schema_constraint(schema), param="tools")
        assert info.value.code == "constraint_failed" and info.value.param == "tools"
        assert "too complex" in info.value.message and "<" not in info.value.message
    assert compiler.compile(schema_constraint(SCHEMAS[0])) is not None  # real schemas still compile


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, "json_object"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}}, "json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": False}}, "json_schema"),
        ({"type": "json_schema", "name": "n", "schema": {"type": "object"}}, "json_schema"),  # Responses API shape
    ],
)
def test_response_format_shapes(value, kind):
    c = constraint_from_response_format(value)
    assert (c.kind if c else None) == kind


@pytest.mark.parametrize(
    ("value", "param"),
    [
        ({"type": "grammar"}, "response_format.type"),
        ({}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": "x"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": "yes"}},
         "response_format.json_schema.strict"),
        ({"type": "json_schema", "name": "n", "schema": "x"}, "response_format.schema"),  # the flat (Responses) shape
    ],
)
def test_bad_response_format_shapes(value, param):
    """Each names the field at fault, as api.openai.com does; all were ``response_format``."""
    with pytest.raises(InvalidRequest) as info:
        constraint_from_response_format(value)
    assert info.value.param == param


# ------------------------------------------------------------------------ server

def json_schema_format(schema, strict=True) -> dict:
    """A Chat Completions ``response_format`` for ``schema``."""
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


@pytest.mark.parametrize("strict", [True, False])
def test_server_json_schema_non_streaming(client, strict):
    for seed in range(3):
        r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=200, temperature=1.0, seed=seed,
                                           response_format=json_schema_format(SCHEMAS[0], strict))
        choice = r.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[0])


def test_server_json_schema_streaming(client):
    stream = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=200, temperature=1.0, seed=11,
                                            stream=True, response_format=json_schema_format(SCHEMAS[2]))
    parts, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(parts)), SCHEMAS[2])


def test_server_json_object_with_n(client):
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=40, temperature=0.7, seed=2, n=3,
                                       response_format={"type": "json_object"})
    for choice in r.choices:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize(
    "response_format",
    [
        json_schema_format({"type": "nonsense"}),
        json_schema_format({"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}),
        {"type": "json_schema", "json_schema": {"name": "x"}},
        {"type": "grammar"},
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_server_bad_schema_is_a_fast_400_and_serving_goes_on(client, response_format, stream):
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=20, stream=stream,
                                       response_format=response_format)
    assert time.monotonic() - started < 1.0
    # a schema that does not compile is the format's fault as a whole; a shape error names its field
    assert info.value.status_code == 400 and info.value.param.startswith("response_format")
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_server_text_format_is_unconstrained(xllm_server):
    body = {"model": TINY, "messages": MSG, "max_tokens": 6, "temperature": 0, "response_format": {"type": "text"}}
    headers = {"Authorization": f"Bearer {xllm_server.api_key}"}
    with httpx.Client(base_url=xllm_server.root, headers=headers, timeout=60) as raw:
        a = raw.post("/v1/chat/completions", json=body).json()
        b = raw.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "response_format"}).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


def test_a_schema_past_the_grammar_engines_limits_is_a_400_not_a_500(client):
    """It compiles (lazily) but the lexer gives up on the first steps: the request's fault, so a 400 the SDK
    does not retry, and the batch goes on."""
    bomb = json_schema_format({"type": "string", "pattern": "^(a{1000}){1000}$"})
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=8, response_format=bomb)
    assert info.value.code == "constraint_failed" and info.value.param == "response_format"
    assert "simplify" in info.value.message
    r = client.chat.completions.create(model=TINY, messages=MSG, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as again:  # the same grammar again: refused again, not a 200 with ''
        client.chat.completions.create(model=TINY, messages=MSG, max_tokens=8, response_format=bomb)
    assert again.value.code == "constraint_failed"


def test_a_grammar_failing_past_the_dry_run_is_refused_on_a_repeat_not_answered_empty(client):
    """80 forced digits take the dry run's steps, so the lexer limit is hit mid-generation (a 400). Copies share
    the lexer: a repeat used to stop at once and answer 200 with '' (not JSON, yet finish_reason 'stop')."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[0-9]{80}$"},
                                               "b": {"type": "string", "pattern": "^(a{700}){700}$"}},
              "required": ["a", "b"], "additionalProperties": False}
    for _ in range(2):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=TINY, messages=MSG, max_tokens=150, response_format=json_schema_format(schema))
        assert info.value.code == "constraint_failed" and info.value.param == "response_format"
