"""Newer Mistral models (tokenizer v11+: Mistral Small 3.2, Magistral, Devstral) write each tool call as
``[TOOL_CALLS]name[ARGS]{...}``, not the older ``[TOOL_CALLS][{"name", "arguments"}]`` list; with ``tool_choice: auto``
their calls came back as plain content. The template here is our own in the v11 manner (it renders past calls that
way); the random tiny model is made to write the markup with ``guided_choice``, and the exact text is parsed directly
too. Real server, real openai SDK."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from tests.helpers import assembled
from tests.server_fixtures import TINY, tiny_server_of_its_own
from xllm_jupyter.openai.tool_parser import (MISTRAL, MISTRAL_V11, StreamingToolParser, detect_family,
                                              parse_tool_calls)

#: a minimal template in the v11 manner: tools listed, each past call as ``[TOOL_CALLS]name[ARGS]{json}``
V11_LIKE = (
    "{% if tools %}[AVAILABLE_TOOLS]{% for t in tools %}{{ t.function.name }} {% endfor %}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}{% for c in m.tool_calls %}"
    "[TOOL_CALLS]{{ c.function.name }}[ARGS]{{ c.function.arguments | tojson }}{% endfor %}</s>"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {"city": {
    "type": "string"}}}}} for n in ("weather", "time")]
NAMES = ("weather", "time")
#: what such a model writes: some text, then two calls in a row
REPLY = 'Let me look.[TOOL_CALLS]weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]time[ARGS]{"city": "Lima"}'
ASK = [{"role": "user", "content": "Weather in Oslo, time in Lima?"}]


def test_the_family_is_detected_from_the_template():
    assert detect_family(V11_LIKE) == MISTRAL_V11
    assert detect_family("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]{{ calls | tojson }}") == MISTRAL  # the older list


@pytest.mark.parametrize(("text", "content", "calls"), [
    (REPLY, "Let me look.", [("weather", '{"city": "Oslo"}'), ("time", '{"city": "Lima"}')]),
    ('[TOOL_CALLS]weather[ARGS] {"city": "Oslo"}\n', None, [("weather", '{"city": "Oslo"}')]),
    ('[TOOL_CALLS]time[CALL_ID]a1b2c3d4e[ARGS]{"city": "Rome"}', None, [("time", '{"city": "Rome"}')]),  # v13's id
    ('[TOOL_CALLS]other[ARGS]{"city": "Oslo"}', '[TOOL_CALLS]other[ARGS]{"city": "Oslo"}', []),  # not a request tool
    ('[TOOL_CALLS]weather[ARGS]{"city": ', '[TOOL_CALLS]weather[ARGS]{"city": ', []),  # cut short
    ('[TOOL_CALLS]weather[ARGS][1]', '[TOOL_CALLS]weather[ARGS][1]', []),  # arguments not an object
])
def test_calls_are_parsed_whole_and_streamed(text, content, calls):
    parsed = parse_tool_calls(text, NAMES, MISTRAL_V11)
    assert parsed.content == (content if calls else text)
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    for size in range(1, 8):  # the stream splits it the same, whatever the pieces
        parser = StreamingToolParser(NAMES, MISTRAL_V11)
        events = [e for i in range(0, len(text), size) for e in parser.feed(text[i:i + size])] + parser.finish()
        streamed = "".join(e.content for e in events if e.content is not None)
        assert streamed == text if not calls else (streamed.strip() or None) == content
        assert [(e.name, "".join(a.arguments or "" for a in events if a.index == e.index and a.id is None))
                for e in events if e.id is not None] == calls


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_llama_dir):
    private = tmp_path_factory.mktemp("v11-template") / "t"  # its own copy: the template differs
    shutil.copytree(tiny_llama_dir, private)
    (private / "chat_template.jinja").write_text(V11_LIKE, encoding="utf-8")
    with tiny_server_of_its_own(tmp_path_factory, private, "mistral_v11") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c


def ask(client, **kw):
    """A reply the model must write as REPLY (``guided_choice``), tools offered with ``tool_choice: auto``."""
    return client.chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, max_completion_tokens=96, seed=1,
                                          extra_body={"guided_choice": [REPLY]}, **kw)


def test_the_server_returns_the_calls(client):
    r = ask(client, n=2)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
            ("weather", {"city": "Oslo"}), ("time", {"city": "Lima"})]
    one = ask(client, parallel_tool_calls=False).choices[0].message.tool_calls
    assert [c.function.name for c in one] == ["weather"]


def test_the_stream_sends_the_calls(client):
    choice = assembled(ask(client, stream=True))["choices"][0]
    assert choice["message"]["content"] == "Let me look." and choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]] == [
        ("weather", {"city": "Oslo"}), ("time", {"city": "Lima"})]


def test_forced_calls_and_the_next_turn(client):
    r = client.chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_completion_tokens=64, seed=1)
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name in NAMES for c in calls)
    history = ASK + [r.choices[0].message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "9 C"} for c in calls]
    named = client.chat.completions.create(model=TINY, messages=history, tools=TOOLS, max_completion_tokens=64, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "time"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["time"]


# ------------------------------------------- the markup as special tokens, as in Mistral's own tokenizers
MARKUP = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")


def test_decoding_keeps_the_markup_asked_for_and_skips_every_other_special_token():
    from tests.models import smollm2_tokenizer
    from xllm_jupyter.backends.detokenize import IncrementalDetokenizer
    from xllm_jupyter.backends.hf_tokenizer import ChatTokenizer

    tokenizer = smollm2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKUP)})
    chat = ChatTokenizer(tokenizer, "m")
    text = '<|im_start|>Hi[TOOL_CALLS]weather[CALL_ID]a1[ARGS]{"city": "Oslo"}<|im_end|><|endoftext|>'
    ids = chat.tokenize(text, add_special_tokens=False)
    assert chat.keeping(("<none>", "Hi")) is None  # no special token of this vocabulary: decoded as always
    for kept, out in ((chat.keeping(MARKUP), 'Hi[TOOL_CALLS]weather[CALL_ID]a1[ARGS]{"city": "Oslo"}'),
                      (chat.keeping(("[TOOL_CALLS]",)), 'Hi[TOOL_CALLS]weathera1{"city": "Oslo"}')):
        detok = IncrementalDetokenizer(kept.decode, chat.tokenize("<|im_start|>user", add_special_tokens=False))
        assert "".join(detok.push(i) for i in ids) + detok.flush() == out
    assert chat.keeping(MARKUP).token_bytes(ids[ids.index(tokenizer.convert_tokens_to_ids("[ARGS]"))]) == b"[ARGS]"


@pytest.fixture(scope="module")
def special(tmp_path_factory):
    """A server of a tiny model whose tokenizer has Mistral's markup as special tokens (decoding skipped them, so the
    calls came back as text), and the Lark grammar that makes it write two calls with those very tokens."""
    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("v11-special") / "m", special=MARKUP)
    (model / "chat_template.jinja").write_text(V11_LIKE, encoding="utf-8")
    calls, args, call_id = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids(list(MARKUP))
    # the markup by token id (llguidance's <[id]>): the same text spelled by ordinary tokens would decode anyway
    grammar = (f'start: "Let me look." <[{calls}]> "weather" <[{args}]> "{{\\"city\\": \\"Oslo\\"}}" '
               f'<[{calls}]> "time" <[{call_id}]> "a1b2c3d4e" <[{args}]> "{{\\"city\\": \\"Lima\\"}}"')
    with tiny_server_of_its_own(tmp_path_factory, model, "mistral_v11_special") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c, grammar, calls


def special_ask(special, grammar=None, **kw):
    client, v11, _ = special
    return client.chat.completions.create(model=TINY, messages=ASK, max_completion_tokens=96, seed=1,
                                          extra_body={"guided_grammar": grammar or v11}, **kw)


CALLS = [("weather", {"city": "Oslo"}), ("time", {"city": "Lima"})]


def test_calls_written_in_special_tokens_reach_the_parser(special):
    r = special_ask(special, tools=TOOLS, logprobs=True)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == CALLS
    tokens = [t.token for t in choice.logprobs.content]  # the markup's tokens are named by their text
    assert tokens.count("[TOOL_CALLS]") == 2 and tokens.count("[ARGS]") == 2 and "[CALL_ID]" in tokens


def streamed(chunks):
    """What a client assembles from a stream: content, [(name, arguments)], the last finish_reason."""
    content, calls, reasons = "", {}, []
    for chunk in chunks:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for frag in delta.tool_calls or ():
            call = calls.setdefault(frag.index, {"name": frag.function.name, "arguments": ""})
            call["arguments"] += frag.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    return content, [(c["name"], json.loads(c["arguments"])) for c in calls.values()], reasons[-1]


def test_calls_written_in_special_tokens_are_streamed(special):
    assert streamed(special_ask(special, tools=TOOLS, stream=True)) == ("Let me look.", CALLS, "tool_calls")


def test_the_older_list_form_after_a_special_marker_is_parsed_too(special):
    # Mistral v0.3's "[TOOL_CALLS] [{...}]": its list was read with the marker dropped, and is now with the marker
    args = '[{\\"name\\": \\"weather\\", \\"arguments\\": {\\"city\\": \\"Oslo\\"}}]'
    grammar = f'start: "Sure." <[{special[2]}]> " {args}"'
    message = special_ask(special, grammar, tools=TOOLS).choices[0].message
    assert message.content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == CALLS[:1]
    assert streamed(special_ask(special, grammar, tools=TOOLS, stream=True)) == ("Sure.", CALLS[:1], "tool_calls")


@pytest.mark.parametrize("tools", [{}, {"tools": TOOLS, "tool_choice": "none"}])
def test_special_markup_stays_out_of_text_where_calls_are_not_parsed(special, tools):
    r = special_ask(special, **tools)
    assert r.choices[0].message.content == 'Let me look.weather{"city": "Oslo"}timea1b2c3d4e{"city": "Lima"}'
    assert not r.choices[0].message.tool_calls
