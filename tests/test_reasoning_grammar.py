"""A reasoning model under a grammar (response_format, forced tool calls) thinks first, freely, and the grammar
applies after its thinking, as vLLM's reasoning parsers start it (openai/reasoning.py, backends/think_grammar.py).

The random tiny model is steered with logit_bias: +100 on the opening marker, the end marker and "ok" makes it
open a block, write "ok"s and close it when the end marker outweighs "ok" (a seeded choice between the two); the
grammar masks all three out of the answer. How many "ok"s it writes is left open: the assertions hold for any.
"""

from __future__ import annotations

import dataclasses
import json
import re

import openai
import pytest

from tests.models import smollm2_tokenizer
from tests.test_reasoning import ASK, MAGISTRAL, SPECIAL, THINK, reasoning_client
from xllm_jupyter.backends.constraints import GrammarCompiler
from xllm_jupyter.core.types import Constraint

SCHEMA = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
TOOL = [{"type": "function", "function": {"name": "pick", "parameters": SCHEMA}}]
MODELS = [("think", *THINK), ("magistral", *MAGISTRAL)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A client of a server with "think" and "magistral", and the tokenizer's ids (test_reasoning.reasoning_home)."""
    with reasoning_client(tmp_path_factory.mktemp("think-grammar")) as client_and_ids:
        yield client_and_ids


def _bias(ids, start, end, think=100):
    return {str(ids[start]): think, str(ids[end]): 100, str(ids["ok"]): 100}


def _answer(content):
    value = json.loads(content)
    assert isinstance(value, dict) and list(value) == ["a"] and isinstance(value["a"], bool)


def _thought(text):
    """The thinking of a steered reply: only "ok"s, and present (the model opened a block)."""
    assert text is not None and re.fullmatch("(ok)*", text), text


def ask(client, model, stream=False, **kw):
    """(reasoning, content, tool calls as (name, arguments), finish_reason, usage) of one reply, whole or streamed."""
    kw = {"model": model, "messages": ASK, "max_completion_tokens": 64, "seed": 3, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or ()]
        return (m.model_extra or {}).get("reasoning_content"), m.content, calls, r.choices[0].finish_reason, r.usage
    thought = content = None
    calls: dict[int, list[str]] = {}
    reason = usage = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            if delta.get("reasoning_content") is not None:
                thought = (thought or "") + delta["reasoning_content"]
            if delta.get("content"):
                content = (content or "") + delta["content"]
            for call in delta.get("tool_calls") or ():
                name, args = calls.setdefault(call["index"], ["", ""])
                calls[call["index"]] = [name + (call["function"].get("name") or ""),
                                        args + (call["function"].get("arguments") or "")]
            reason = choice.finish_reason or reason
    return thought, content, [tuple(calls[i]) for i in sorted(calls)], reason, usage


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "start", "end"), MODELS)
def test_a_json_format_applies_after_the_thinking(served, model, start, end, stream):
    client, ids = served
    thought, content, _, reason, usage = ask(client, model, stream, response_format=FORMAT,
                                             logit_bias=_bias(ids, start, end))
    _thought(thought)
    _answer(content)
    assert reason == "stop" and not any(m in content for m in SPECIAL)
    assert usage.completion_tokens_details.reasoning_tokens == len(thought) // 2 + 2  # its "ok"s and both markers


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_that_opened_the_thinking_thinks_then_answers_in_the_format(served, stream):
    client, ids = served
    thought, content, _, reason, usage = ask(client, "think", stream, response_format=FORMAT,
                                             logit_bias=_bias(ids, *THINK, think=0),
                                             extra_body={"chat_template_kwargs": {"open_think": True}})
    _thought(thought)
    _answer(content)
    assert reason == "stop" and usage.completion_tokens_details.reasoning_tokens == len(thought) // 2 + 1


@pytest.mark.parametrize(("model", "start", "end"), MODELS)
def test_a_model_that_does_not_think_answers_in_the_format_from_its_first_token(served, model, start, end):
    client, ids = served
    thought, content, _, reason, _ = ask(client, model, response_format=FORMAT, logit_bias=_bias(ids, start, end, -100))
    assert thought is None and reason == "stop"
    _answer(content)


@pytest.mark.parametrize("extra", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_format": "none"}])
@pytest.mark.parametrize(("model", "start", "end"), MODELS)
def test_with_thinking_off_the_grammar_applies_from_the_first_token(served, model, start, end, extra):
    client, ids = served
    thought, content, _, _, usage = ask(client, model, response_format=FORMAT, logit_bias=_bias(ids, start, end),
                                        extra_body=extra)
    assert thought is None and usage.completion_tokens_details.reasoning_tokens == 0
    _answer(content)  # the markers were not allowed: no thinking, in content or out of it


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "pick"}}])
@pytest.mark.parametrize(("model", "start", "end"), MODELS)
def test_a_forced_tool_call_comes_after_the_thinking(served, model, start, end, choice, stream):
    client, ids = served
    # (one call: with parallel calls allowed, the random model may write more than one on another machine)
    thought, content, calls, _, _ = ask(client, model, stream, tools=TOOL, tool_choice=choice,
                                        parallel_tool_calls=False, logit_bias=_bias(ids, start, end))
    _thought(thought)
    assert not content and [name for name, _ in calls] == ["pick"]
    _answer(calls[0][1])


@pytest.mark.parametrize(("model", "start", "end"), MODELS)
def test_a_responses_format_applies_after_the_thinking(served, model, start, end):
    client, ids = served
    fmt = {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}
    kw = dict(model=model, input="Hi", max_output_tokens=64, text={"format": fmt},
              extra_body={"seed": 3, "logit_bias": _bias(ids, start, end)})
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        streamed = stream.get_final_response()
    for r in (whole, streamed):
        assert [o.type for o in r.output] == ["reasoning", "message"]
        _thought(r.output[0].content[0].text)
        _answer(r.output_text)
    _thought("".join(deltas))


@pytest.mark.parametrize("special", [True, False], ids=["special markers", "text markers"])
def test_the_thinking_grammar_takes_either_kind_of_marker(special):
    tokenizer = _tokenizer(special)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])

    def takes(constraint, text):
        return _takes(compiler, tokenizer, constraint, text)

    for start, end in (THINK, MAGISTRAL):
        for kind, spec in (("json_schema", json.dumps(SCHEMA)), ("regex", r'\{"a":(true|false)\}')):
            fresh = Constraint(kind, spec, think=(start, end))
            opened = Constraint(kind, spec, think=(start, end), opened=True)
            assert takes(fresh, f'{start}\nplan: a < b {end[:-1]}\n{end}\n\n{{"a":true}}')
            assert takes(fresh, '{"a":true}') and takes(fresh, f'{start}{end}{{"a":false}}')  # the thinking is optional
            assert not takes(fresh, 'plan {"a":true}') and not takes(fresh, f'{start}x{end}\n\n\n{{"a":true}}')
            assert takes(opened, f'plan {start[1:]}\n{end}\n\n{{"a":true}}') and not takes(opened, '{"a":true}')
            # a special end marker spelled as text is neither the end nor thinking (the split would cut there)
            spelled = smollm2_tokenizer().encode(f"x{end}", add_special_tokens=False)
            matcher = compiler.new_matcher(opened)
            assert all(matcher.consume_token(i) for i in spelled) is not special


@pytest.mark.parametrize("special", [True, False], ids=["special markers", "text markers"])
def test_a_line_break_before_the_opening_marker_still_opens_the_thinking(special):
    """A model that writes whitespace before its opening marker is not steered away from thinking (at most two
    characters of it: unbounded whitespace lets a weak model pad until max_tokens); without a marker after it, the
    whitespace is the body's to allow."""
    tokenizer = _tokenizer(special)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for start, end in (THINK, MAGISTRAL):
        for kind, spec in (("json_schema", json.dumps(SCHEMA)), ("regex", r'\s?\{"a":(true|false)\}')):
            fresh = Constraint(kind, spec, think=(start, end))
            for lead in ("\n", "\n\n", " \n"):
                assert _takes(compiler, tokenizer, fresh, f'{lead}{start}plan{end}\n\n{{"a":true}}'), (kind, lead)
            assert not _takes(compiler, tokenizer, fresh, f'\n\n\n{start}plan{end}{{"a":true}}')
            assert _takes(compiler, tokenizer, fresh, '\n{"a":true}') is (kind == "regex")


@pytest.fixture(scope="module", params=[0, 60_000], ids=["ungrouped", "grouped"])
def spaced(tmp_path_factory, request):
    """A client of a server of "spaced": a model that writes a space before its thinking, whatever it is sampled with
    (a fixed chain of tokens: `` <think>plan</think>The``, then its end of turn; test_local_thinking's). Its engine
    hands each token over alone, or all after the first in one delta (``stream_interval_ms``)."""
    from tests.server_fixtures import make_test_config, running_server
    from tests.test_local_thinking import CHAIN, build_chain_model
    from xllm_jupyter.store.store import ModelStore

    root = tmp_path_factory.mktemp("think-spaced")
    store = ModelStore(root / "home")
    store.pull(str(build_chain_model(root / "spaced", (CHAIN[0], "Ġ", *CHAIN[1:]))), "spaced")
    config = make_test_config(root / "home")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=request.param))
    with running_server(config, store, "spaced") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("grammar", [None, {"guided_regex": "The"}, {"guided_grammar": 'start: "The"'}])
def test_a_model_that_writes_a_space_before_its_thinking_thinks_under_a_grammar_too(spaced, grammar, stream):
    # the space before <think> was masked under a grammar: the model could not think (nor write its answer's way)
    thought, content, _, reason, usage = ask(spaced, "spaced", stream, temperature=0, extra_body=grammar)
    assert (thought, content, reason) == ("plan", "The", "stop")
    assert usage.completion_tokens_details.reasoning_tokens == 4  # the space, both markers and "plan"


def _tokenizer(special):
    tokenizer = smollm2_tokenizer()
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL)})
    return tokenizer


def _takes(compiler, tokenizer, constraint, text):
    matcher = compiler.new_matcher(constraint)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return all(matcher.consume_token(i) for i in ids) and matcher.is_accepting()


def test_a_grammar_that_writes_the_markers_itself_is_applied_from_the_first_token(served):
    client, ids = served
    grammar = f'start: <[{ids["<think>"]}]> "plan it" <[{ids["</think>"]}]> "The answer."'
    thought, content, _, _, _ = ask(client, "think", extra_body={"guided_grammar": grammar},
                                    logit_bias=_bias(ids, *THINK))
    assert (thought, content) == ("plan it", "The answer.")  # not thinking twice: once free, then the grammar's
    with pytest.raises(openai.BadRequestError):
        ask(client, "think", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 5}})



@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A client of a server of a tiny model whose ``<think>``/``</think>`` are ordinary text (several tokens each)."""
    from tests.server_fixtures import templated_client
    from tests.test_reasoning import THINK_LIKE

    with templated_client(tmp_path_factory.mktemp("think-text-grammar"), {"plain": THINK_LIKE}, "plain") as c:
        yield c


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("regex", [r"[<]think>plan it</think>The answer\.", r"\x3cthink>plan it</think>The answer\."])
def test_a_regex_that_spells_the_marker_otherwise_is_applied_from_the_first_token(plain, regex, stream):
    """A regex whose source spells ``<think>`` otherwise than as the literal still writes it: it shapes the thinking
    too, so the model does not write free thinking before it (the thinking was the model's, not "plan it")."""
    thought, content, _, reason, _ = ask(plain, "plain", stream, extra_body={"guided_regex": regex})
    assert (thought, content, reason) == ("plan it", "The answer.", "stop")


def test_a_grammar_is_read_for_the_marker_off_the_event_loop(plain, monkeypatch):
    """can_begin compiles the client's grammar (tens of milliseconds for a big one, a fresh one each request where the
    grammar differs): it ran on the IOLoop, stalling every stream, where the engine compiles grammars on a thread."""
    import asyncio

    from xllm_jupyter.backends import grammar_prefix

    real, on_loop = grammar_prefix._begins, []

    def spy(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop runs in this thread: a worker's
            on_loop.append(False)
        return real(*args)

    monkeypatch.setattr(grammar_prefix, "_begins", spy)
    thought, content, _, reason, _ = ask(plain, "plain", extra_body={"guided_regex": r"[<]think>plan it</think>ok"})
    assert (thought, content, reason) == ("plan it", "ok", "stop")
    assert on_loop and not any(on_loop)


@pytest.mark.parametrize(("model", "start", "end"), MODELS)
def test_a_grammar_that_takes_any_text_leaves_a_special_marker_free_to_open_the_thinking(served, model, start, end):
    """``(.|\\n)*`` takes the marker's text, but it does not write the marker: a special-token marker is no text it
    takes, so applied from the first token it kept the model from thinking; it applies after the thinking."""
    client, ids = served
    bias = {str(ids[start]): 100, str(ids["ok"]): 90, str(ids[end]): -100}  # open a block, then "ok" until the end
    thought, content, _, reason, _ = ask(client, model, extra_body={"guided_regex": r"(.|\n)*"}, logit_bias=bias,
                                         max_completion_tokens=12)
    assert (thought, content, reason) == ("ok" * 11, None, "length")


@pytest.mark.parametrize(("kind", "spec", "marker", "begins"), [
    ("regex", r"\[THINK\].*\[/THINK\]ok", "[THINK]", True),  # what re.escape makes of Magistral's marker
    ("regex", r"[<]think>.*</think>ok", "<think>", True),
    ("regex", r"\n\[THINK\]x", "[THINK]", True),  # after a line break, which the thinking grammar allows before it
    ("regex", r"(\[THINK\]x)?ok", "[THINK]", True),
    ("regex", r"ok\[THINK\]", "[THINK]", False),  # not at the start: the model may think first, then it writes it
    ("regex", r"\[THINKING\]", "[THINK]", False),
    ("lark", r'start: /\[THINK\]/ "x"', "[THINK]", True),
    ("grammar", r'root ::= [\[] "THINK]x"', "[THINK]", True),
    ("regex", r"(a{700}){700}", "[THINK]", False),  # past the lexer's fuel: refused by its own check, not here
    # any text is not the marker: such a grammar applies after the thinking (a special marker is no text it takes)
    ("regex", r".*", "[THINK]", False),
    ("regex", r"(.|\n)*", "<think>", False),
    ("regex", r"[^{]+", "<think>", False),
    ("regex", r"\[[A-Z]+\]x", "[THINK]", False),
    ("lark", r'start: "{" /[a-z]+/ "}" | /(.|\n)+/', "<think>", False),
    ("json_schema", "{}", "[THINK]", False),
])
def test_a_grammar_is_read_for_the_marker_it_begins_with(kind, spec, marker, begins):
    from xllm_jupyter.backends.grammar_prefix import can_begin

    assert can_begin(Constraint(kind, spec), marker) is begins
