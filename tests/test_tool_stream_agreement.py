"""Streamed and unstreamed chat replies with tools agree for the same generated text, in every call syntax.

The model's text is scripted and goes through the real ToolCalling that serving.py uses:
``message()`` for the full response, ``streamer().deltas()`` for the stream, cut into pieces
of several sizes and at every length (as max_tokens would cut it).
"""

from __future__ import annotations

import json

import pytest

from xllm_jupyter.openai.tool_calling import ToolCalling
from xllm_jupyter.openai.tools import format_call, parse_tool_config

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}},
]
# chat templates that make ToolCalling expect each family (None: no native tools, our Hermes fallback)
TEMPLATES = {
    "hermes": "{% if tools %}<tool_call>{% endif %}",
    "llama3": "<|python_tag|>{{ tools }}",
    "mistral": "[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]",
    "fallback": None,
}
ADD = '{"a": 1, "b": 2}'
WEATHER = '{"city": "S\\u00e3o Paulo \\ud83d\\ude00", "n": -1.5e+3, "ok": true, "x": null, "l": [false, 0.25, {}]}'
BAD = '{"city": "Paris", "days": }'
ESCAPES = r'{"s": "a\"b\\c\/d\u00E9\n", "e": 1E+2, "z": 0, "neg": -0.5, "t": [true, false, null]}'


def hermes(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def llama(name: str, args: str) -> str:
    return f'{{"name": "{name}", "parameters": {args}}}'


def mistral(*calls: tuple[str, str]) -> str:
    return "[" + ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in calls) + "]"


# (syntax, case) -> the generated text
CASES = {
    ("hermes", "valid"): hermes("add", ADD),
    ("hermes", "malformed"): hermes("get_weather", BAD),
    ("hermes", "unclosed valid"): hermes("add", ADD).removesuffix("\n</tool_call>"),
    ("hermes", "unclosed cut"): hermes("get_weather", WEATHER)[:60],
    ("hermes", "text around"): "Let me check.\n" + hermes("get_weather", WEATHER) + "\nDone, see above.",
    ("hermes", "two calls"): hermes("add", ADD) + "\n" + hermes("get_weather", WEATHER) + "\n",
    ("hermes", "bad then good"): hermes("get_weather", BAD) + "\n" + hermes("add", ADD),
    ("llama3", "valid"): "<|python_tag|>" + llama("get_weather", WEATHER),
    ("llama3", "bare valid"): " " + llama("add", ADD),
    ("llama3", "malformed"): "<|python_tag|>" + llama("get_weather", BAD),
    ("llama3", "unclosed cut"): "<|python_tag|>" + llama("get_weather", WEATHER)[:50],
    ("llama3", "text around"): "Sure, I will: " + llama("add", ADD) + "; then tell you.",
    ("llama3", "escapes"): llama("get_weather", ESCAPES),
    ("llama3", "two calls"): "<|python_tag|>" + llama("add", ADD) + "; " + llama("get_weather", WEATHER),
    ("mistral", "valid"): "[TOOL_CALLS]" + mistral(("add", ADD)),
    ("mistral", "bare valid"): mistral(("get_weather", WEATHER)),
    ("mistral", "malformed"): "[TOOL_CALLS]" + mistral(("get_weather", BAD)),
    ("mistral", "unclosed"): "[TOOL_CALLS]" + mistral(("add", ADD))[:-1],
    ("mistral", "text around"): "Checking [see docs] {now}: " + mistral(("add", ADD)) + "\nok",
    ("mistral", "two calls"): "[TOOL_CALLS]" + mistral(("add", ADD), ("get_weather", WEATHER)),
    ("mistral", "call and other"): "[TOOL_CALLS]" + mistral(("add", ADD), ("nope", ADD)),
}


def calling(template: str | None, choice: object = "auto", parallel: bool | None = None) -> ToolCalling:
    return ToolCalling(parse_tool_config(TOOLS, choice, parallel), template)


def full(tc: ToolCalling, text: str, finish: str) -> tuple[str | None, list[tuple[str, str]], str]:
    message, reason = tc.message(text, finish)
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])]
    return message["content"], calls, reason


def streamed(tc: ToolCalling, text: str, finish: str, step: int) -> tuple[str, list[tuple[str, str]], str, int]:
    """Content, calls and finish_reason as a client assembles them, and how many argument fragments came."""
    deltas = tc.streamer()
    pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
    out = []
    for k, piece in enumerate(pieces):
        out += deltas.deltas(piece, finish if k == len(pieces) - 1 else None)
    assert all(reason is None for _, reason in out[:-1]) and out[-1][0] == {}
    content, calls, fragments = "", {}, 0
    for delta, _ in out:
        content += delta.get("content") or ""
        for frag in delta.get("tool_calls", []):
            fn = frag["function"]
            if "id" in frag:  # a call's first fragment, and only that one, names it
                assert frag["index"] not in calls and frag["id"].startswith("call_") and frag["type"] == "function"
                calls[frag["index"]] = [fn["name"], fn["arguments"]]
            else:
                assert set(fn) == {"arguments"}
                calls[frag["index"]][1] += fn["arguments"]
                fragments += 1
    assert sorted(calls) == list(range(len(calls)))
    return content, [tuple(calls[i]) for i in sorted(calls)], out[-1][1], fragments


def assert_agree(tc: ToolCalling, text: str, finish: str = "stop", steps: tuple[int, ...] = (1, 3, 7, 10_000)) -> tuple:
    """The stream, cut every way, says what the full response says; announced calls carry valid JSON."""
    content, calls, reason = full(tc, text, finish)
    for step in steps:
        s_content, s_calls, s_reason, _ = streamed(tc, text, finish, step)
        where = f"step {step}: {text!r}"
        assert (s_calls, s_reason) == (calls, reason), where
        for _, args in s_calls:
            assert isinstance(json.loads(args), dict), where
        if calls:  # the full response trims the text around calls; a stream cannot take back what it sent
            assert s_content.strip() == (content or "").strip(), where
        else:
            assert s_content == content == text, where
    return content, calls, reason


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("case", list(CASES), ids=[" ".join(k) for k in CASES])
def test_stream_agrees_with_full_response(case, template):
    text = CASES[case]
    tc = calling(TEMPLATES[template])
    assert_agree(tc, text, "stop")
    assert_agree(tc, text, "length", steps=(1, 10_000))
    assert_agree(calling(TEMPLATES[template], parallel=False), text, "stop", steps=(1, 10_000))


@pytest.mark.parametrize("case", list(CASES), ids=[" ".join(k) for k in CASES])
def test_stream_agrees_wherever_generation_stops(case):
    """Every cut of the text is a possible output (max_tokens): the two paths agree on each one."""
    text = CASES[case]
    tc = calling(TEMPLATES[case[0]])
    for end in range(len(text) + 1):
        assert_agree(tc, text[:end], "length", steps=(1, 10_000))


def test_malformed_arguments_are_content_not_a_call():
    """The audit's case: no call is announced, the text is the answer, and the reply stops normally."""
    text = hermes("get_weather", BAD)
    tc = calling(None)
    assert full(tc, text, "stop") == (text, [], "stop")
    for step in (1, 5, 10_000):
        assert streamed(tc, text, "stop", step) == (text, [], "stop", 0)


@pytest.mark.parametrize(
    ("case", "content", "calls"),
    [
        (("hermes", "text around"), "Let me check.\nDone, see above.", [("get_weather", WEATHER)]),
        (("hermes", "bad then good"), hermes("get_weather", BAD), [("add", ADD)]),
        (("llama3", "text around"), "Sure, I will: then tell you.", [("add", ADD)]),
        (("llama3", "two calls"), None, [("add", ADD), ("get_weather", WEATHER)]),
        (("mistral", "text around"), "Checking [see docs] {now}: ok", [("add", ADD)]),
        (("mistral", "call and other"), CASES["mistral", "call and other"], []),
    ],
)
def test_what_both_paths_say(case, content, calls):
    """The agreed result is the right one: text around calls is kept (commas too), calls keep their arguments."""
    got_content, got_calls, reason = assert_agree(calling(TEMPLATES[case[0]]), CASES[case])
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in got_calls] == [(n, json.loads(a)) for n, a in calls]
    assert reason == ("tool_calls" if calls else "stop")


def test_prose_with_brackets_still_streams():
    """Text that only looks like the start of a call goes out once it cannot be one, not at the end."""
    tc = calling(None)
    deltas = tc.streamer()
    head = 'Use {x}, [a link](u), f(a[0]) and {"k": v} here.'
    sent = "".join(d.get("content", "") for ch in head for d, _ in deltas.deltas(ch, None))
    assert sent == head


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_calls_still_stream_arguments_as_generated(choice):
    """Grammar-forced output is valid as generated: its arguments keep arriving in many fragments."""
    tc = calling(None, choice)
    args = json.loads(WEATHER)
    text = format_call("get_weather", args) + ("\n" + format_call("add", {"a": 3}) if choice == "required" else "")
    content, calls, reason = assert_agree(tc, text)
    named = choice != "required"  # (a call forced by name finishes "stop", as api.openai.com finishes it)
    assert content is None and reason == ("stop" if named else "tool_calls")
    assert [n for n, _ in calls] == ["get_weather", "add"][:len(calls)]
    _, s_calls, _, fragments = streamed(tc, text, "stop", 1)
    assert fragments > 10 and json.loads(s_calls[0][1]) == args


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_a_repeated_call_is_sent_once(choice):
    """Small models forced to call a tool write the same call again and again (the grammar allows up to 8):
    a client would run it each time, so a call equal to an earlier one (whatever its spacing and key order)
    is dropped from the stream and the full response alike; a call with other arguments stays."""
    tc = calling(None, choice)
    again = hermes("add", '{"b":2,  "a":1}')
    other = hermes("add", '{"a": 5}')
    text = "\n".join([hermes("add", ADD), again, other, hermes("add", ADD), again]) + "\n"
    content, calls, reason = assert_agree(tc, text)
    assert content is None and reason == "tool_calls"
    # forced output that repeats a call is looping: it ends there (serving stops generating at that point)
    expected = [("add", {"a": 1, "b": 2})] + ([("add", {"a": 5})] if choice == "auto" else [])
    assert [(n, json.loads(a)) for n, a in calls] == expected


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_by_max_tokens_reads_the_same_in_both(choice):
    """The stream sends a forced call's arguments as generated, so where max_tokens cuts it the full reply
    keeps the same partial call (finish length), as OpenAI's does, instead of showing the raw markup."""
    tc = calling(None, choice)
    text = format_call("get_weather", json.loads(WEATHER))
    for end in range(len(text) + 1):
        content, calls, reason = full(tc, text[:end], "length")
        for step in (1, 7, 10_000):
            s_content, s_calls, s_reason, _ = streamed(tc, text[:end], "length", step)
            assert (s_calls, s_reason) == (calls, reason) and s_content.strip() == (content or "").strip(), end
    cut = full(tc, text[:60], "length")
    assert cut[1] and cut[1][0][0] == "get_weather" and cut[2] == "length" and cut[0] is None


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_later_forced_call_cut_by_max_tokens_is_never_content(choice):
    """max_tokens cutting the second of two forced calls: the reply is still calls only (the cut one as far as it
    got once its name is known), never its raw ``<tool_call>`` markup as ``content``, streamed or not."""
    tc = calling(None, choice, parallel=True)
    first = format_call("add", {"a": 1})
    text = first + "\n" + format_call("add", {"a": 2})
    for end in range(len(first) + 1, len(text) + 1):
        content, calls, reason = full(tc, text[:end], "length")
        assert content is None and reason == "length" and json.loads(calls[0][1]) == {"a": 1}, (end, content)
        assert len(calls) in (1, 2) and all(name == "add" for name, _ in calls)
        for step in (1, 7, 10_000):
            s_content, s_calls, s_reason, _ = streamed(tc, text[:end], "length", step)
            assert "<tool_call>" not in s_content and not s_content.strip(), (end, step, s_content)
            assert (s_calls, s_reason) == (calls, reason), (end, step)
