"""gpt-oss's harmony format (openai/harmony, as vLLM serves gpt-oss): the ``analysis`` channel comes back as
``reasoning_content``, ``final`` as ``content``, ``commentary to=functions.X`` messages as ``tool_calls``, whole and
streamed, with ``<|return|>``/``<|call|>`` ending the reply and the thinking tokens counted. A random tiny Llama with
a real tokenizer, the harmony markers added as special tokens and a compact harmony-like template is made to write a
reply by token id (a Lark ``guided_grammar``); servers grouping every token alone and many into one delta
(``engine.stream_interval_ms`` 0 and 60000). Real server, real openai SDK."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import openai
import pytest

from tests.server_fixtures import make_test_config, running_server
from tests.test_mistral_v11_tools import ASK, TOOLS
from xllm_jupyter.openai.harmony import MARKERS, HarmonyParser, is_harmony

#: a compact template in gpt-oss's manner: the tools in a developer message, a turn's ``thinking`` in an analysis
#: message, its calls as commentary messages to ``functions.NAME``, tool results as messages from the function
HARMONY_LIKE = (
    "{% if tools %}<|start|>developer<|message|># Tools{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "<|end|>{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% if m.thinking %}<|start|>assistant<|channel|>analysis<|message|>{{ m.thinking }}<|end|>{% endif %}"
    "{% for c in m.tool_calls or [] %}<|start|>assistant<|channel|>commentary to=functions.{{ c.function.name }}"
    " <|constrain|>json<|message|>{{ c.function.arguments | tojson }}<|call|>{% endfor %}"
    "{% if m.content %}<|start|>assistant<|channel|>final<|message|>{{ m.content }}<|end|>{% endif %}"
    "{% elif m.role == 'tool' %}<|start|>functions.tool to=assistant<|channel|>commentary<|message|>"
    "{{ m.content }}<|end|>"
    "{% else %}<|start|>{{ m.role }}<|message|>{{ m.content }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)
START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = MARKERS
ARGS = '{"city": "Oslo"}'
#: what gpt-oss writes: thinking, then the answer (or a call), its markers as Lark token references
THINK_ANSWER = ("<|channel|>", '"analysis"', "<|message|>", '"plan it"', "<|end|>", "<|start|>", '"assistant"',
                "<|channel|>", '"final"', "<|message|>", '"The answer."')
THINK_CALL = ("<|channel|>", '"analysis"', "<|message|>", '"need weather"', "<|end|>", "<|start|>", '"assistant"',
              "<|channel|>", '"commentary to=functions.weather "', "<|constrain|>", '"json"', "<|message|>",
              json.dumps(ARGS))


@contextlib.contextmanager
def harmony_client(root, **engine):
    """A client of a server on a tiny harmony model ("oss"; ``engine``: EngineConfig fields), and the markers' ids."""
    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    model = build_tiny_llama(root / "oss", special=MARKERS)
    (model / "chat_template.jinja").write_text(HARMONY_LIKE, encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(model))
    ids = dict(zip(MARKERS, tok.convert_tokens_to_ids(list(MARKERS))))
    for word in ("analysis", "final", "commentary"):  # (each one's first token: logit_bias picks a channel)
        ids[word] = tok.encode(word, add_special_tokens=False)[0]
    store = ModelStore(root / "home")
    store.pull(str(model), "oss")
    config = make_test_config(root / "home")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, **engine))
    with running_server(config, store, "oss") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c, ids


@pytest.fixture(scope="module", params=[0, 60_000], ids=["stepwise", "grouped"])
def served(request, tmp_path_factory):
    """A client of a harmony model's server, each token its own delta or many in one, and the markers' ids."""
    with harmony_client(tmp_path_factory.mktemp("harmony"), stream_interval_ms=request.param) as served:
        yield served


def _grammar(ids, parts):
    return "start: " + " ".join(f"<[{ids[p]}]>" if p in ids else p for p in parts)


def ask(served, parts, **kw):
    client, ids = served
    body = {"guided_grammar": _grammar(ids, parts), **kw.pop("extra_body", {})}
    return client.chat.completions.create(model="oss", messages=kw.pop("messages", ASK), extra_body=body,
                                          **{"max_completion_tokens": 64, "seed": 1, **kw})


def streamed(served, parts, **kw):
    """(reasoning, content, tool calls by index, finish_reason, usage, every delta's dict) of a streamed reply."""
    thought = content = ""
    calls: dict[int, dict] = {}
    reason, usage, deltas = None, None, []
    for chunk in ask(served, parts, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            deltas.append(delta)
            assert delta.get("reasoning") == delta.get("reasoning_content")
            thought += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            for frag in delta.get("tool_calls") or ():
                call = calls.setdefault(frag["index"], {"id": frag["id"], "name": frag["function"]["name"], "arguments": ""})
                call["arguments"] += frag["function"]["arguments"] or ""
            reason = choice.finish_reason or reason
    return thought, content, calls, reason, usage, deltas


def _no_markup(deltas):
    for delta in deltas:
        for key in ("content", "reasoning_content"):
            assert "<|" not in (delta.get(key) or ""), delta
        for frag in delta.get("tool_calls") or ():
            assert "<|" not in (frag["function"].get("arguments") or ""), delta


def _thinking_tokens(logprobs):
    """The thinking's tokens: its analysis message's, up to its ``<|end|>``."""
    return [t.token for t in logprobs.content].index(END) + 1


def test_a_harmony_template_is_told_from_others():
    assert is_harmony(HARMONY_LIKE)
    assert not is_harmony("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    assert not is_harmony(None)


REPLY = ("<|channel|>analysis<|message|>plan it<|end|><|start|>assistant<|channel|>commentary<|message|>Looking."
         "<|end|><|start|>assistant<|channel|>commentary to=functions.weather <|constrain|>json<|message|>"
         + ARGS + "<|call|>")


def _read(parser, pieces):
    out: dict[str, str] = {}
    for i, piece in enumerate(pieces):
        for kind, text in parser.feed(piece, final=i == len(pieces) - 1):
            out[kind] = out.get(kind, "") + text
    return out


def test_the_parser_reads_the_same_however_the_text_is_split():
    whole = _read(HarmonyParser({"weather"}), [REPLY])
    assert whole == {"reasoning": "plan it", "content": "Looking.", "call": "weather", "arguments": ARGS}
    for i in range(len(REPLY)):  # every split in two, and one character at a time
        assert _read(HarmonyParser({"weather"}), [REPLY[:i], REPLY[i:]]) == whole, i
    assert _read(HarmonyParser({"weather"}), list(REPLY)) == whole
    # a header closed without a body says nothing; the message after it is read as usual
    stray = "<|channel|>analysis<|end|><|start|>assistant<|channel|>final<|message|>Hi<|return|>"
    for i in range(len(stray)):
        assert _read(HarmonyParser(), [stray[:i], stray[i:]]) == {"content": "Hi"}, i


def test_text_out_of_the_format_and_calls_the_request_cannot_take_are_content():
    assert _read(HarmonyParser(), ["Just text."]) == {"content": "Just text."}
    assert _read(HarmonyParser(), [REPLY]) == {"reasoning": "plan it", "content": "Looking." + ARGS}
    # a second call with parallel_tool_calls false is dropped, as the other formats drop it
    two = REPLY + "<|start|>assistant to=functions.weather<|channel|>commentary json<|message|>{}<|call|>"
    assert _read(HarmonyParser({"weather"}, parallel=False), [two])["arguments"] == ARGS


def test_thinking_and_answer_are_split_whole_and_streamed(served):
    r = ask(served, THINK_ANSWER, logprobs=True)
    message = r.choices[0].message
    assert (message.model_extra["reasoning_content"], message.model_extra["reasoning"]) == ("plan it", "plan it")
    assert (message.content, message.tool_calls, r.choices[0].finish_reason) == ("The answer.", None, "stop")
    assert r.usage.completion_tokens_details.reasoning_tokens == _thinking_tokens(r.choices[0].logprobs)
    thought, content, calls, reason, usage, deltas = streamed(served, THINK_ANSWER)
    assert (thought, content, calls, reason) == ("plan it", "The answer.", {}, "stop")
    assert usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens
    _no_markup(deltas)


def test_streamed_logprobs_ride_on_their_own_pieces_however_grouped(served):
    whole = [t.token for t in ask(served, THINK_ANSWER, logprobs=True).choices[0].logprobs.content]
    thinking, answer = [], []
    for chunk in ask(served, THINK_ANSWER, logprobs=True, stream=True):
        for choice in chunk.choices:
            tokens = [t.token for t in (choice.logprobs.content if choice.logprobs else None) or ()]
            (thinking if choice.delta.model_extra.get("reasoning_content") else answer).extend(tokens)
    # the thinking's chunks carry its tokens up to <|end|>; the answer's the rest, the markers before it too
    assert thinking == whole[:whole.index(END)]
    assert answer == whole[whole.index(END):]


def test_a_commentary_call_is_a_tool_call_whole_and_streamed(served):
    r = ask(served, THINK_CALL, tools=TOOLS, logprobs=True)
    message, choice = r.choices[0].message, r.choices[0]
    assert message.model_extra["reasoning_content"] == "need weather"
    assert (message.content, choice.finish_reason) == (None, "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in message.tool_calls] == [("weather", ARGS)]
    assert r.usage.completion_tokens_details.reasoning_tokens == _thinking_tokens(choice.logprobs)
    thought, content, calls, reason, usage, deltas = streamed(served, THINK_CALL, tools=TOOLS)
    assert (thought, content, reason) == ("need weather", "", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("weather", ARGS)]
    assert calls[0]["id"]
    assert usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens_details.reasoning_tokens
    _no_markup(deltas)


def test_return_and_call_end_the_reply_and_end_does_not(served):
    client, ids = served
    for stop in (RETURN, CALL):
        r = client.chat.completions.create(model="oss", messages=ASK, max_completion_tokens=8,
                                           logit_bias={str(ids[stop]): 100})
        assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 1)
    # <|end|> closes one message (the thinking's) of several: the reply goes on
    r = client.chat.completions.create(model="oss", messages=ASK, max_completion_tokens=3,
                                       logit_bias={str(ids[END]): 100})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 3)


def test_history_with_thinking_and_calls_is_taken_back(served):
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ARGS}}
    turn = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    plain = ask(served, THINK_ANSWER, tools=TOOLS, messages=[*ASK, turn, result])
    thought = ask(served, THINK_ANSWER, tools=TOOLS, messages=[*ASK, {**turn, "reasoning_content": "need weather"}, result])
    assert thought.choices[0].message.content == "The answer."
    # the thinking sent back is shown to the model: its analysis message adds its header, markers and text
    assert thought.usage.prompt_tokens > plain.usage.prompt_tokens + 4


#: tools without arguments: a forced call's JSON is "{}" at once (a random model's string could run to max_tokens)
BARE = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {}}}}
        for n in ("now", "today")]


@pytest.mark.parametrize(("choice", "names", "finish"), [
    ("required", {"now", "today"}, "tool_calls"),
    ({"type": "function", "function": {"name": "today"}}, {"today"}, "stop"),  # (named: "stop", as OpenAI ends it)
])
def test_a_forced_call_is_a_commentary_message_whole_and_streamed(served, choice, names, finish):
    client, ids = served
    # made to end any thinking at once (a random model's thought could run to max_tokens)
    kw = dict(model="oss", messages=ASK, tools=BARE, tool_choice=choice, max_completion_tokens=48, seed=1,
              logit_bias={str(ids[END]): 100})
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert len(message.tool_calls) == 1 and message.tool_calls[0].function.name in names
    assert (json.loads(message.tool_calls[0].function.arguments), message.content) == ({}, None)
    assert r.choices[0].finish_reason == finish
    calls, reason = {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            for frag in c.delta.tool_calls or ():
                calls.setdefault(frag.index, [frag.function.name, ""])[1] += frag.function.arguments or ""
            reason = c.finish_reason or reason
    assert (list(calls.values()), reason) == ([[message.tool_calls[0].function.name, "{}"]], finish)


def test_a_call_comes_back_as_a_legacy_function_call_for_functions(served):
    client, ids = served
    forced = client.chat.completions.create(model="oss", messages=ASK, functions=[t["function"] for t in BARE],
                                            function_call={"name": "now"}, max_completion_tokens=48, seed=1,
                                            logit_bias={str(ids[END]): 100})
    assert (forced.choices[0].message.function_call.name, forced.choices[0].finish_reason) == ("now", "stop")
    functions = [t["function"] for t in TOOLS]
    r = ask(served, THINK_CALL, functions=functions)
    message = r.choices[0].message
    assert (message.function_call.name, message.function_call.arguments, message.tool_calls) == ("weather", ARGS, None)
    assert (message.model_extra["reasoning_content"], r.choices[0].finish_reason) == ("need weather", "function_call")
    name, arguments, reason = None, "", None
    for chunk in ask(served, THINK_CALL, functions=functions, stream=True):
        for choice in chunk.choices:
            assert not choice.delta.tool_calls
            if choice.delta.function_call:
                name = choice.delta.function_call.name or name
                arguments += choice.delta.function_call.arguments or ""
            reason = choice.finish_reason or reason
    assert (name, arguments, reason) == ("weather", ARGS, "function_call")


def test_a_harmony_vocabulary_ends_turns_at_return_and_call_not_end(tmp_path):
    from tests.models import smollm2_tokenizer
    from xllm_jupyter.backends.hf_tokenizer import ChatTokenizer

    for name, special in (("oss", MARKERS), ("phi", (END,))):
        tokenizer = smollm2_tokenizer()
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
        tokenizer.save_pretrained(str(tmp_path / name))
        chat = ChatTokenizer.from_directory(str(tmp_path / name), name)
        ids = dict(zip(special, chat.tokenizer.convert_tokens_to_ids(list(special))))
        eos = chat.eos_ids(ids[END])  # (a config naming <|end|>)
        if name == "oss":
            assert {ids[RETURN], ids[CALL]} <= eos and ids[END] not in eos
        else:  # Phi-3's <|end|> still ends its turn
            assert ids[END] in eos


def test_responses_give_the_thinking_as_a_reasoning_item_and_calls_as_function_calls(served):
    client, ids = served
    kw = dict(model="oss", input="Hi", max_output_tokens=64, extra_body={"guided_grammar": _grammar(ids, THINK_ANSWER), "seed": 1})
    r = client.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "The answer."
    assert [(c.type, c.text) for c in r.output[0].content] == [("reasoning_text", "plan it")]
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "plan it"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "The answer."
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "The answer."
    called = client.responses.create(**{**kw, "extra_body": {"guided_grammar": _grammar(ids, THINK_CALL)}},
                                     tools=[{"type": "function", **t["function"]} for t in TOOLS])
    assert [o.type for o in called.output] == ["reasoning", "function_call"]
    assert (called.output[1].name, called.output[1].arguments) == ("weather", ARGS)



SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


def test_a_format_shapes_the_final_channel_after_any_thinking(served):
    client, ids = served
    kw = dict(model="oss", messages=ASK, response_format=FORMAT, max_completion_tokens=64, seed=1,
              logit_bias={str(ids["analysis"]): 100, str(ids[END]): 100})  # made to think (empty: <|end|> at once)
    r = client.chat.completions.create(**kw, logprobs=True)
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert tokens[:4] == [CHANNEL, "analysis", MESSAGE, END]  # the thinking first, then the JSON in a final message
    assert json.loads(r.choices[0].message.content).keys() == {"ok"}
    assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].finish_reason) == (None, "stop")
    chunks = client.chat.completions.create(**kw, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


@pytest.mark.parametrize("channel", ["commentary", "final"])
def test_tools_beside_a_format_may_be_called_or_the_format_answered(served, channel):
    client, ids = served
    kw = dict(model="oss", messages=ASK, tools=BARE, response_format=FORMAT, max_completion_tokens=48, seed=1,
              logit_bias={str(ids[channel]): 100})  # (the channel the reply takes, its first token's)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    if channel == "commentary":  # a call, as to a model without a format
        assert [(c.function.name in ("now", "today"), c.function.arguments) for c in choice.message.tool_calls] == [
            (True, "{}")]
        assert (choice.message.content, choice.finish_reason) == (None, "tool_calls")
    else:  # the answer in the format
        assert (json.loads(choice.message.content).keys(), choice.message.tool_calls) == ({"ok"}, None)
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == (choice.message.content or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [choice.finish_reason]


#: a reply a wired model writes whatever it is asked: thinking, then (text after a closed message) the answer
CHAIN = ("<|channel|>", "analysis", "<|message|>", "plan", "<|end|>", "The", "<|return|>")


def test_the_in_process_chat_splits_a_harmony_reply_as_the_server_does(tmp_path, monkeypatch):
    """``xllm run --local`` / ``%%xllm`` without a server: the same thinking and answer as from a server, no markers
    (special tokens skipped in decoding made "analysisplanThe" of it)."""
    from tests.test_local_thinking import build_chain_model
    from xllm_jupyter.client import XllmClient
    from xllm_jupyter.client.local import LocalChat
    from xllm_jupyter.client.thinking import Thinking
    from xllm_jupyter.store.store import ModelStore

    store = ModelStore(tmp_path / "home")
    # (the prompt's last token, "istant" of the generation prompt's "assistant", starts the chain)
    store.pull(str(build_chain_model(tmp_path / "chain", ("istant", *CHAIN), MARKERS, HARMONY_LIKE)), "chain")
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XLLM_ENGINE_TORCH_THREADS", "1")
    monkeypatch.delenv("XLLM_CONFIG", raising=False)

    def parts(backend):
        pieces = list(backend.stream_chat([{"role": "user", "content": "Hi"}], "chain", thinking=True, temperature=1))
        return ("".join(p for p in pieces if isinstance(p, Thinking)),
                "".join(p for p in pieces if not isinstance(p, Thinking)))

    with running_server(make_test_config(tmp_path / "home"), store, "chain") as info:
        with XllmClient(info.base_url, info.api_key) as client:
            served = parts(client)
    with LocalChat() as local:
        local_parts = parts(local)
    assert served == ("plan", "The"), served
    assert local_parts == served


#: thinking, a commentary preamble to the user, then the answer
THINK_SAY_ANSWER = THINK_ANSWER[:7] + ("<|channel|>", '"commentary"', "<|message|>", '"Looking. "', "<|end|>", "<|start|>",
                                       '"assistant"') + THINK_ANSWER[7:]


@pytest.mark.parametrize("parts, cut", [(THINK_ANSWER, None), (THINK_SAY_ANSWER, None), (THINK_ANSWER, 10),
                                       ("BUILT_IN", None)], ids=["answer", "preamble", "cut-in-header", "built-in"])
def test_responses_output_text_logprobs_are_the_texts_own_tokens(served, parts, cut):
    """A Response's output_text logprobs are its text's tokens, whole and streamed: the markers and headers before a
    message's body (``<|end|><|start|>assistant<|channel|>final<|message|>``) ride on its first chat piece and were
    the message's too; a reply cut inside a header (10 tokens: ``...<|start|>assistant<|channel|>``) has no message."""
    client, ids = served
    parts = BUILT_IN if parts == "BUILT_IN" else parts  # (a dropped message's body is no text's either)
    kw = dict(model="oss", input="Hi", max_output_tokens=cut or 64, include=["message.output_text.logprobs"],
              extra_body={"guided_grammar": _grammar(ids, parts), "seed": 1})
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    pieces = [t.token for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert events[-1].type == ("response.incomplete" if cut else "response.completed")
    for r in (whole, events[-1].response):
        messages = [o for o in r.output if o.type == "message"]
        if cut:
            assert [o.type for o in r.output] == ["reasoning"]
            continue
        tokens = [t.token for m in messages for c in m.content for t in c.logprobs]
        assert "".join(tokens) == r.output_text and r.output_text.endswith("The answer.")
        assert tokens == pieces


def _stopped(stops, pieces):
    from xllm_jupyter.core.types import GenerationParams
    from xllm_jupyter.engine.stops import stop_matcher
    from xllm_jupyter.openai.harmony import stop_exempt

    m = stop_matcher(GenerationParams(stop=stops, keep_special=MARKERS, stop_exempt=stop_exempt(MARKERS)))
    out = ""
    for piece in pieces:
        text, hit = m.feed(piece)
        out += text
        if hit:
            return out, hit
    return out + m.flush(), None


WHOLE = "<|channel|>analysis<|message|>plan it<|end|><|start|>assistant<|channel|>final<|message|>The answer."


@pytest.mark.parametrize("stop, kept, hit", [
    ("final", WHOLE, None),  # a channel's name in a header is no text
    ("assistant", WHOLE, None),
    ("|>", WHOLE, None),  # nor are the markers
    ("itThe", WHOLE, None),  # nor a match across them (the markers are not the text's: nothing joins the bodies)
    ("it<|end|>", WHOLE, None),
    ("answer", WHOLE[:WHOLE.index("answer")], "answer"),  # a body's text is
    ("it", WHOLE[:WHOLE.index("it<")], "it"),  # the thinking's too, as vLLM matches its whole output text
])
def test_stop_strings_match_a_harmony_replys_bodies_only(stop, kept, hit):
    tokens = [p for p in __import__("re").split(r"(<\|[a-z]+\|>|\s)", WHOLE) if p]  # a piece per marker and word
    for pieces in ([WHOLE], tokens, ["".join(tokens[:i]) for i in (5,)] + ["".join(tokens[5:])]):
        assert _stopped((stop,), pieces) == (kept, hit), pieces


@pytest.mark.parametrize("stop, thought, content", [("final", "plan it", "The answer."), ("answer", "plan it", "The "),
                                                    ("it", "plan ", None)])
def test_a_stop_string_applies_to_the_replys_text_not_its_headers(served, stop, thought, content):
    r = ask(served, THINK_ANSWER, stop=[stop])
    message = r.choices[0].message
    assert (message.reasoning_content, message.content, r.choices[0].finish_reason) == (
        thought, content, "stop" if stop != "final" else r.choices[0].finish_reason)
    s_thought, s_content, _, reason, _, deltas = streamed(served, THINK_ANSWER, stop=[stop])
    assert (s_thought, s_content or None, reason) == (thought, content, r.choices[0].finish_reason)
    _no_markup(deltas)


def test_a_message_to_a_built_in_tool_is_dropped():
    """A message to a built-in tool (gpt-oss's browser and python: none runs here) is neither thinking, content nor a
    call, as vLLM's chat drops it; a call to a function the request lacks stays content, as in other formats."""
    browse = "<|start|>assistant<|channel|>analysis to=browser.search code<|message|>{\"query\": \"oslo\"}<|call|>"
    assert _read(HarmonyParser({"weather"}), [REPLY.replace("to=functions.weather", "to=python")]) == {
        "reasoning": "plan it", "content": "Looking."}
    assert _read(HarmonyParser({"weather"}), ["<|channel|>analysis<|message|>plan it<|end|>" + browse]) == {
        "reasoning": "plan it"}


BUILT_IN = THINK_ANSWER[:7] + ("<|channel|>", '"commentary to=python "', "<|message|>", '"print(1)"', "<|end|>",
                               "<|start|>", '"assistant"') + THINK_ANSWER[7:]


def test_a_built_in_tools_message_is_dropped_whole_and_streamed(served):
    r = ask(served, BUILT_IN, tools=TOOLS)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content, message.tool_calls) == ("plan it", "The answer.", None)
    thought, content, calls, _, _, deltas = streamed(served, BUILT_IN, tools=TOOLS)
    assert (thought, content, calls) == ("plan it", "The answer.", {})
    _no_markup(deltas)


def test_output_text_logprobs_keep_the_shown_bodies_tokens_however_split():
    """ResponseEventStream._text_tokens over a reply's token logprobs, whole and cut in two at every token: the
    final and commentary bodies' tokens only (a header closed without a body, a built-in tool's message and the
    thinking dropped)."""
    from types import SimpleNamespace

    from xllm_jupyter.openai.response_stream import ResponseEventStream

    tokens = ["<|channel|>", "analysis", "<|end|>", "<|start|>", "assistant", "<|channel|>", "commentary to=python",
              "<|message|>", "print(1)", "<|end|>", "<|start|>", "assistant", "<|channel|>", "analysis", "<|message|>",
              "hm", "<|end|>", "<|start|>", "assistant", "<|channel|>", "commentary", "<|message|>", "Looking.",
              "<|end|>", "<|start|>", "assistant", "<|channel|>", "final", "<|message|>", "The", " answer."]
    entries = [{"token": t} for t in tokens]
    for cut in range(len(entries) + 1):
        state = SimpleNamespace(_header=None, _hidden=False)
        kept = [ResponseEventStream._text_tokens(state, part) for part in (entries[:cut], entries[cut:])]
        assert [e["token"] for part in kept for e in part] == ["Looking.", "The", " answer."], cut
