"""Reasoning models' thinking comes back in ``reasoning``/``reasoning_content``, the answer in ``content`` (vLLM's
``--reasoning-parser``, llama.cpp's ``reasoning_format``): ``<think>...</think>`` (Qwen3, DeepSeek-R1, QwQ,
SmolLM3) and Magistral's ``[THINK]...[/THINK]`` special tokens, whole and streamed, with the thinking tokens counted
in usage. A random tiny model whose tokenizer has the markers as special tokens is made to write them by token id
(a Lark ``guided_grammar``) or one token over and over (``logit_bias``). Real server, real openai SDK."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import openai
import pytest

from tests.server_fixtures import make_test_config, running_server
from tests.test_mistral_v11_tools import ASK, TOOLS
from xllm_jupyter.openai.reasoning import MAGISTRAL, THINK, Reasoning, ThinkSplitter, markers_of

#: a template in the Qwen3 / DeepSeek-R1 manner: ``enable_thinking: false`` closes an empty block in the prompt,
#: ``open_think`` opens one there (as DeepSeek-R1's and Qwen3-Thinking's templates always do); a turn's
#: ``reasoning_content`` is shown in a block before its content (as Qwen3's shows a tool-call chain's)
THINK_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content is string %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% elif open_think is defined and open_think %}<think>\n{% endif %}{% endif %}"
)
#: a template in Magistral's manner: its system prompt names the special thinking tokens
MAGISTRAL_LIKE = ("[SYSTEM_PROMPT]Think first, inside [THINK] and [/THINK].[/SYSTEM_PROMPT]"
                  "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
                  "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}")
SPECIAL = (*THINK, *MAGISTRAL)


def reasoning_home(root):
    """A store under ``root / "home"`` with "think" and "magistral" (the same random model, templates of each kind),
    and the tokenizer's ids: each marker's, and the one token "ok"."""
    import shutil

    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    think = build_tiny_llama(root / "think", special=SPECIAL)
    magistral = root / "magistral"
    shutil.copytree(think, magistral)
    (think / "chat_template.jinja").write_text(THINK_LIKE, encoding="utf-8")
    (magistral / "chat_template.jinja").write_text(MAGISTRAL_LIKE, encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(str(think))
    ids = dict(zip(SPECIAL, tok.convert_tokens_to_ids(list(SPECIAL))))
    ok = tok.encode("ok", add_special_tokens=False)
    assert len(ok) == 1
    ids["ok"] = ok[0]
    store = ModelStore(root / "home")
    store.pull(str(think), "think")
    store.pull(str(magistral), "magistral")
    return store, ids


@contextlib.contextmanager
def reasoning_client(root, **engine):
    """A client of a server on ``reasoning_home``'s store (``engine``: EngineConfig fields to change), and its ids."""
    store, ids = reasoning_home(root)
    config = make_test_config(root / "home")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, **engine))
    with running_server(config, store, "think") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c, ids


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A client of a server with "think" and "magistral", and the tokenizer's ids (``reasoning_home``)."""
    with reasoning_client(tmp_path_factory.mktemp("reasoning")) as served:
        yield served


def _grammar(ids, start, end, thought, answer):
    return f'start: <[{ids[start]}]> "{thought}" <[{ids[end]}]> "{answer}"'


def ask(served, model="think", **kw):
    client, _ = served
    return client.chat.completions.create(model=model, messages=ASK, **{"max_completion_tokens": 48, "seed": 1, **kw})


def streamed(served, **kw):
    """(reasoning, content, finish_reason, usage, every delta's dict) of a streamed reply."""
    thought = content = ""
    reason, usage, deltas = None, None, []
    for chunk in ask(served, stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            deltas.append(delta)
            assert delta.get("reasoning") == delta.get("reasoning_content")  # vLLM's name and DeepSeek's
            thought += delta.get("reasoning_content") or ""
            content += delta.get("content") or ""
            reason = choice.finish_reason or reason
    return thought, content, reason, usage, deltas


def _fields(message):
    extra = message.model_extra or {}
    assert extra.get("reasoning") == extra.get("reasoning_content")
    return extra.get("reasoning_content"), message.content


@pytest.mark.parametrize(("model", "start", "end"), [("think", *THINK), ("magistral", *MAGISTRAL)])
def test_thinking_is_split_from_the_answer(served, model, start, end):
    grammar = _grammar(served[1], start, end, "\\nplan it\\n", "\\n\\nThe answer.")
    r = ask(served, model=model, logprobs=True, extra_body={"guided_grammar": grammar})
    assert _fields(r.choices[0].message) == ("plan it", "The answer.")
    tokens = [t.token for t in r.choices[0].logprobs.content]
    assert r.usage.completion_tokens_details.reasoning_tokens == tokens.index(end) + 1  # the markers' tokens too
    thought, content, reason, usage, deltas = streamed(served, model=model, extra_body={"guided_grammar": grammar})
    assert (thought, content, reason) == ("plan it", "The answer.", "stop")
    assert usage.completion_tokens_details.reasoning_tokens == tokens.index(end) + 1
    assert not any(m in json.dumps(deltas) for m in SPECIAL)  # no marker text in either part


@pytest.mark.parametrize(("model", "start", "end"), [("think", *THINK), ("magistral", *MAGISTRAL)])
def test_an_empty_thinking_block_is_no_thinking_whole_as_streamed(served, model, start, end):
    # "<think>\n</think>" (Qwen3 writes it with nothing to think, and now often before a format's JSON): the stream
    # sends no reasoning_content, so the whole reply has none either (it had ""), as the Responses API opens no
    # reasoning item for it; its markers are still thinking tokens
    kw = {"model": model, "extra_body": {"guided_grammar": _grammar(served[1], start, end, "\\n", "\\n\\nThe answer.")}}
    r = ask(served, **kw)
    assert _fields(r.choices[0].message) == (None, "The answer.")
    thought, content, _, usage, deltas = streamed(served, **kw)
    assert (thought, content) == ("", "The answer.") and not any(d.get("reasoning_content") is not None for d in deltas)
    assert r.usage.completion_tokens_details.reasoning_tokens == usage.completion_tokens_details.reasoning_tokens >= 2


def test_a_prompt_that_opens_the_thinking_starts_the_reply_inside_it(served):
    _, ids = served
    kw = dict(max_completion_tokens=3, temperature=0, logit_bias={str(ids["ok"]): 100})
    opened = {"chat_template_kwargs": {"open_think": True}}
    r = ask(served, extra_body=opened, **kw)
    assert _fields(r.choices[0].message) == ("okokok", None) and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    thought, content, reason, usage, _ = streamed(served, extra_body=opened, **kw)
    assert (thought, content, reason, usage.completion_tokens_details.reasoning_tokens) == ("okokok", "", "length", 3)


@pytest.mark.parametrize("extra", [{"chat_template_kwargs": {"enable_thinking": False}}, {}])
def test_a_reply_without_markers_is_untouched(served, extra):
    _, ids = served
    r = ask(served, max_completion_tokens=3, temperature=0, logit_bias={str(ids["ok"]): 100}, extra_body=extra)
    assert _fields(r.choices[0].message) == (None, "okokok")
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize(("model", "start", "end"), [("think", *THINK), ("magistral", *MAGISTRAL)])
def test_reasoning_format_none_leaves_the_reply_whole(served, model, start, end):
    # the markers are special tokens here (Magistral's are): they stay in content as text, as llama.cpp's "none"
    # leaves <think>, else the thinking ran into the answer unmarked
    grammar = _grammar(served[1], start, end, "plan it", "The answer.")
    kw = {"model": model, "extra_body": {"guided_grammar": grammar, "reasoning_format": "none"}}
    assert _fields(ask(served, **kw).choices[0].message) == (None, f"{start}plan it{end}The answer.")
    thought, content, reason, usage, _ = streamed(served, **kw)
    assert (thought, content, reason) == ("", f"{start}plan it{end}The answer.", "stop")
    assert usage.completion_tokens_details.reasoning_tokens == 0
    with pytest.raises(openai.BadRequestError, match="reasoning_format"):
        ask(served, extra_body={"reasoning_format": "maybe"})


def test_tool_calls_are_read_from_the_answer_only(served):
    ids = served[1]
    call = '<tool_call>\\n{\\"name\\": \\"weather\\", \\"arguments\\": {\\"city\\": \\"Oslo\\"}}\\n</tool_call>'
    grammar = _grammar(ids, *THINK, "Oslo weather.", call)
    message = ask(served, tools=TOOLS, extra_body={"guided_grammar": grammar}).choices[0].message
    assert _fields(message) == ("Oslo weather.", None)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("weather", {"city": "Oslo"})]


def test_the_markers_are_read_from_the_template():
    assert markers_of("{{ messages }}") is None and markers_of(None) is None
    assert markers_of(THINK_LIKE) == THINK and markers_of(MAGISTRAL_LIKE) == MAGISTRAL


@pytest.mark.parametrize(("text", "opened", "thought", "answer"), [
    ("<think>\nplan it\n</think>\n\nThe answer.", False, "plan it", "The answer."),
    ("  <think>a < b </thin k</think>ok", False, "a < b </thin k", "ok"),
    ("\n\n<think>\nplan it</think>ok", False, "plan it", "ok"),  # a line break before the marker (as llama.cpp's)
    ("plan it\n</think>\n\nThe answer.", True, "plan it", "The answer."),
    ("still thinking", True, "still thinking", ""),
    ("The answer: <think> is a tag.", False, None, "The answer: <think> is a tag."),  # not at the start: untouched
    ("  <thin", False, None, "  <thin"),
    ("\n", False, None, "\n"),
])
def test_the_split_is_the_same_whatever_the_pieces(text, opened, thought, answer):
    assert Reasoning(*THINK, opened=opened).split(text) == (thought, answer)
    for size in range(1, 9):
        splitter = ThinkSplitter(*THINK, opened)
        parts = [splitter.feed(text[i:i + size]) for i in range(0, len(text), size)] + [splitter.feed("", True)]
        assert ("".join(p[0] for p in parts) if splitter.began else None, "".join(p[1] for p in parts)) == (thought, answer)
        assert not any(m in p[0] for p in parts for m in THINK if thought and m not in thought)


def _prompt_tokens(served, turn, model="think"):
    """The prompt tokens of a history whose assistant turn is ``turn`` (and a user turn after it)."""
    client, _ = served
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", **turn}, {"role": "user", "content": "And?"}]
    return client.chat.completions.create(model=model, messages=messages, max_completion_tokens=1, seed=1).usage.prompt_tokens


def test_thinking_sent_back_reaches_a_template_that_shows_it(served):
    inline = _prompt_tokens(served, {"content": "<think>plan it</think>Cold."})  # the same text, rendered by hand
    assert _prompt_tokens(served, {"content": "Cold.", "reasoning_content": "plan it"}) == inline
    assert _prompt_tokens(served, {"content": "Cold.", "reasoning": "plan it"}) == inline  # vLLM's name
    # a reply cut while it thought (content null) sent back as it came is taken, its thinking shown
    assert _prompt_tokens(served, {"content": None, "reasoning_content": "plan it"}) == \
        _prompt_tokens(served, {"content": "<think>plan it</think>"})
    plain = _prompt_tokens(served, {"content": "Cold."})
    assert plain < inline and _prompt_tokens(served, {"content": "Cold.", "reasoning_content": None}) == plain
    # a template that does not read it renders the history as before
    assert _prompt_tokens(served, {"content": "Cold.", "reasoning_content": "plan it"}, "magistral") == \
        _prompt_tokens(served, {"content": "Cold."}, "magistral")
    for key, value in (("reasoning_content", 5), ("reasoning", ["plan it"])):
        with pytest.raises(openai.BadRequestError) as exc:
            _prompt_tokens(served, {"content": "Cold.", key: value})
        assert exc.value.body["param"] == f"messages[1].{key}" and exc.value.body["code"] == "invalid_type"


def test_responses_give_the_thinking_as_a_reasoning_item(served):
    client, ids = served
    grammar = _grammar(ids, *THINK, "\\nplan it\\n", "\\n\\nThe answer.")
    kw = dict(model="think", input="Hi", max_output_tokens=48, extra_body={"guided_grammar": grammar, "seed": 1})
    chat = ask(served, extra_body={"guided_grammar": grammar})
    r = client.responses.create(**kw)
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "The answer."
    assert [(c.type, c.text) for c in r.output[0].content] == [("reasoning_text", "plan it")] and r.output[0].summary == []
    assert r.usage.output_tokens_details.reasoning_tokens == chat.usage.completion_tokens_details.reasoning_tokens
    scored = client.responses.create(**kw, include=["message.output_text.logprobs"]).output[1].content[0].logprobs
    assert "".join(t.token for t in scored).strip() == "The answer."  # the output text's tokens, not the thinking's
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    done = types.index("response.reasoning_text.done")
    assert types[done:done + 4] == ["response.reasoning_text.done", "response.content_part.done",
                                    "response.output_item.done", "response.output_item.added"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "plan it"
    assert [o.type for o in final.output] == ["reasoning", "message"] and final.output_text == "The answer."
    assert final.output[0].content[0].text == "plan it" and [o.id for o in final.output] == [
        e.item.id for e in events if e.type == "response.output_item.done"]
    # the output sent back as input (as clients keep a conversation) is taken; the thinking is not shown again
    again = client.responses.create(model="think", input=[*(o.model_dump(exclude_none=True) for o in r.output),
                                                          {"role": "user", "content": "And?"}], max_output_tokens=2)
    assert again.status in ("completed", "incomplete")
    assert [i.type for i in client.responses.input_items.list(again.id, order="asc").data] == ["reasoning", "message", "message"]
    with pytest.raises(openai.BadRequestError, match=r"input\[0\]\.summary"):
        client.responses.create(model="think", input=[{"type": "reasoning", "summary": "no"}], max_output_tokens=2)


def test_responses_give_a_reasoning_item_to_the_assistant_turn_after_it(served):
    client, _ = served
    thought = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "plan it"}]}
    summary = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "plan it"}]}
    call = [{"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Cold."}]

    def said(text):
        return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}

    def input_tokens(*items):
        given = [{"role": "user", "content": "Weather?"}, *items, {"role": "user", "content": "And?"}]
        return client.responses.create(model="think", input=given, max_output_tokens=2).usage.input_tokens

    inline = input_tokens(said("<think>plan it</think>Cold."))  # the same text, rendered by hand
    assert input_tokens(thought, said("Cold.")) == input_tokens(summary, said("Cold.")) == inline
    assert input_tokens(said("Cold.")) < inline
    assert input_tokens(thought, *call) == input_tokens(summary, *call) > input_tokens(*call)
    assert input_tokens(thought) == input_tokens()  # before a user turn: no assistant turn to give it to
    # a stored reply with its thinking, continued with previous_response_id, is shown to the model the same way
    first = client.responses.create(model="think", input=[{"role": "user", "content": "Weather?"}, thought, said("Cold.")],
                                    max_output_tokens=2, extra_body={"seed": 1})
    follow = client.responses.create(model="think", input="And?", previous_response_id=first.id, max_output_tokens=2)
    output = [o.model_dump(exclude_none=True) for o in first.output]
    assert follow.usage.input_tokens == input_tokens(thought, said("Cold."), *output) > input_tokens(said("Cold."), *output)


def test_a_stored_stream_keeps_its_thinking_and_time_to_first_token_counts_it(served):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    client, ids = served
    metrics = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"

    def first_tokens() -> float:
        text = httpx.get(metrics, headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "xllm_time_to_first_token_seconds_count" and s.labels.get("endpoint") == "/v1/chat/completions")

    before = first_tokens()
    kw = dict(max_completion_tokens=3, temperature=0, logit_bias={str(ids["ok"]): 100})
    thought, *_ = streamed(served, store=True, extra_body={"chat_template_kwargs": {"open_think": True}}, **kw)
    assert thought == "okokok" and first_tokens() - before == 1  # a reply all thinking had no first token
    stored = client.chat.completions.list(model="think").data[0]
    assert _fields(stored.choices[0].message) == ("okokok", "")


def test_reasoning_items_and_events_validate_as_the_sdk_types(served):
    import httpx
    from openai.types.responses import Response, ResponseItem
    from pydantic import TypeAdapter

    from tests.test_responses_sdk_types import _EVENT_TYPES, _sse

    client, ids = served
    body = {"model": "think", "input": "Hi", "max_output_tokens": 48, "seed": 1,
            "guided_grammar": _grammar(ids, *THINK, "plan it", "The answer.")}
    with httpx.Client(base_url=str(client.base_url), headers={"Authorization": f"Bearer {client.api_key}"},
                      timeout=120) as raw:
        resp = raw.post("responses", json=body).json()
        assert [o["type"] for o in resp["output"]] == ["reasoning", "message"]
        TypeAdapter(Response).validate_python(resp)
        again = raw.post("responses", json={"model": "think", "max_output_tokens": 2,
                                            "input": [resp["output"][0], {"role": "user", "content": "And?"}]}).json()
        for rid in (resp["id"], again["id"]):
            for item in raw.get(f"responses/{rid}/input_items").json()["data"]:
                TypeAdapter(ResponseItem).validate_python(item)
        events = _sse(raw.post("responses", json={**body, "stream": True}).text)
    assert "response.reasoning_text.delta" in [e["type"] for e in events]
    for event in events:
        TypeAdapter(_EVENT_TYPES[event["type"]]).validate_python(event)
