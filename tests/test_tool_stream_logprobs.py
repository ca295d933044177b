"""A streamed reply's text before and after a tool call carries its own tokens' logprobs, however the engine grouped
the tokens into deltas.

Within one stream interval (16 ms: ~8 tokens on a GPU) one engine delta may hold the end of the text, a whole call and
the text after it. The chat stream gave every held token's logprob to the delta's first piece: the text before a call
took the call's tokens (a streamed Response's ``output_text`` logprobs had ``<tool_call>`` and the call's JSON) and
the text after it took none. A random tiny model writes the text and the call through a Lark ``guided_grammar``, its
markers by special token id (so no token spans the text and a marker).
"""

from __future__ import annotations

import dataclasses

import openai
import pytest

from tests.server_fixtures import RANDOM_STEPS_MS, TINY, make_test_config, random_steps, running_server
from tests.test_hermes_special_markup import HERMES_LIKE, MARKUP, special  # noqa: F401  (the stepwise server)
from tests.test_mistral_v11_tools import ASK, TOOLS

CALL = '"\\n{\\"name\\": \\"weather\\", \\"arguments\\": {\\"city\\":\\"Oslo\\"}}\\n"'


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """``special``'s model on a server whose engine hands each reply's tokens after the first over in one delta (an
    interval longer than any reply), as a fast engine does within its 16 ms interval."""
    yield from _markup_server(tmp_path_factory, 60_000)


@pytest.fixture(scope="module")
def random_steps_server(tmp_path_factory):
    """``special``'s model on a server whose engine hands tokens over at seeded random steps (``random_steps``)."""
    with random_steps(seed=4) as chosen:  # (a seed whose grouping caught a call taking the blank after it)
        yield from _markup_server(tmp_path_factory, RANDOM_STEPS_MS)
    assert True in chosen and False in chosen  # the hook reached the runner: some steps left, some waited


def _markup_server(tmp_path_factory, interval_ms):
    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    home = tmp_path_factory.mktemp("tool-logprobs-grouped")
    model = build_tiny_llama(home / "m", special=MARKUP)
    (model / "chat_template.jinja").write_text(HERMES_LIKE, encoding="utf-8")
    ids = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids(list(MARKUP))
    store = ModelStore(home / "home")
    store.pull(str(model), TINY)
    config = make_test_config(home / "home")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=interval_ms))
    with running_server(config, store, TINY) as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c, None, ids


def _grammar(server, after: str) -> str:
    start, end = server[2]
    return f'start: "Let me look.\\n" <[{start}]> {CALL} <[{end}]> "{after}"'


@pytest.mark.parametrize("server", ["special", "grouped", "random_steps_server"])
def test_streamed_text_around_a_call_carries_its_own_tokens_logprobs(server, request):
    served = request.getfixturevalue(server)
    client = served[0]
    kw = dict(model=TINY, messages=ASK, tools=TOOLS, max_completion_tokens=64, seed=1, logprobs=True,
              extra_body={"guided_grammar": _grammar(served, "\\nDone.")})
    whole = [t.token for t in client.chat.completions.create(**kw).choices[0].logprobs.content]
    streamed, texts, calls = [], [], 0
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            tokens = [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
            streamed += tokens
            calls += len(choice.delta.tool_calls or ())
            if choice.delta.content:  # (a call's chunk takes its tokens; blanks after it ride on the text)
                texts.append((choice.delta.content, "".join(tokens)))
    assert calls and "".join(whole) == "".join(streamed)  # every token's logprob, once (a sampled spelling each)
    assert texts and all(own.strip() == text.strip() for text, own in texts), texts
    assert "".join(text for text, _ in texts).split() == ["Let", "me", "look.", "Done."]


@pytest.mark.parametrize("server", ["special", "grouped", "random_steps_server"])
def test_text_after_a_call_that_is_in_the_calls_json_too_carries_its_own_tokens_logprobs(server, request):
    # "}" is in the call's JSON too: looked for from the call's start, it was found there, so the call kept only its
    # first tokens and the text after it took the call's last ones (its JSON's end and the end marker)
    served = request.getfixturevalue(server)
    kw = dict(model=TINY, messages=ASK, tools=TOOLS, max_completion_tokens=64, seed=1, logprobs=True,
              extra_body={"guided_grammar": _grammar(served, "}")})
    whole = [t.token for t in served[0].chat.completions.create(**kw).choices[0].logprobs.content]
    streamed, texts = [], []
    for chunk in served[0].chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            tokens = [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
            streamed += tokens
            if choice.delta.content:
                texts.append((choice.delta.content, "".join(tokens)))
    assert "".join(whole) == "".join(streamed)
    assert texts and all(own.strip() == text.strip() for text, own in texts), texts
    assert "".join(text for text, _ in texts) == "Let me look.\n}"


@pytest.mark.parametrize("server", ["special", "grouped", "random_steps_server"])
def test_streamed_text_around_a_legacy_function_call_carries_its_own_tokens_logprobs(server, request):
    # the deprecated ``functions`` stream ``function_call`` pieces, which were not taken for a call's: the call's first
    # piece took every held token (the text after it none) when one engine delta held the call and that text
    served = request.getfixturevalue(server)
    kw = dict(model=TINY, messages=ASK, functions=[t["function"] for t in TOOLS], max_completion_tokens=64, seed=1,
              logprobs=True, extra_body={"guided_grammar": _grammar(served, "\\nDone.")})
    whole = [t.token for t in served[0].chat.completions.create(**kw).choices[0].logprobs.content]
    streamed, texts, calls = [], [], 0
    for chunk in served[0].chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            tokens = [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
            streamed += tokens
            calls += bool(choice.delta.function_call and choice.delta.function_call.name)
            if choice.delta.content:
                texts.append((choice.delta.content, "".join(tokens)))
    assert calls == 1 and "".join(whole) == "".join(streamed)
    assert texts and all(own.strip() == text.strip() for text, own in texts), texts
    assert "".join(text for text, _ in texts).split() == ["Let", "me", "look.", "Done."]


@pytest.mark.parametrize("server", ["special", "grouped", "random_steps_server"])
def test_a_streamed_responses_output_text_logprobs_leave_out_the_calls_tokens(server, request):
    served = request.getfixturevalue(server)
    client = served[0]
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    kw = dict(model=TINY, input="Weather in Oslo?", tools=tools, max_output_tokens=64,
              extra_body={"guided_grammar": _grammar(served, ""), "seed": 1}, include=["message.output_text.logprobs"])
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["message", "function_call"]
    tokens = [t.token for t in final.output[0].content[0].logprobs]
    assert [t.token for e in events if e.type == "response.output_text.delta" for t in e.logprobs] == tokens
    assert "".join(tokens).strip() == final.output_text.strip() == "Let me look.", tokens


def test_a_whole_responses_output_text_logprobs_leave_out_the_calls_tokens(special):  # noqa: F811
    # the streamed Response's are the text's alone; the whole one's had the call's tokens too
    whole = _whole_response_with_a_call(special, "")
    assert [o.type for o in whole.output] == ["message", "function_call"]
    tokens = [t.token for t in whole.output[0].content[0].logprobs]
    assert "".join(tokens) == whole.output_text == "Let me look.\n", tokens


@pytest.mark.parametrize("after", ["\\nDone.", "}"])
@pytest.mark.parametrize("server", ["special", "grouped", "random_steps_server"])
def test_a_whole_response_has_the_streamed_ones_items_and_logprobs(server, after, request):
    # text before and after a call: the stream opens a message for each run of text (OpenAI's output is its items in
    # the order they were generated); the whole Response joined them into one message before its calls, with one
    # list of logprobs (found by text: a "}" after the call was found in the call's JSON, which took its tokens)
    served = request.getfixturevalue(server)
    whole = _whole_response_with_a_call(served, after)
    with served[0].responses.stream(**_response_request(served, after)) as stream:
        final = stream.get_final_response()

    def shape(response):
        return [(o.type, o.content[0].text, [t.token for t in o.content[0].logprobs]) if o.type == "message"
                else (o.type, o.name, o.arguments) for o in response.output]

    assert shape(whole) == shape(final) and whole.output_text == final.output_text, (shape(whole), shape(final))
    assert [o.type for o in whole.output] == ["message", "function_call", "message"]
    texts = [(o.content[0].text, "".join(t.token for t in o.content[0].logprobs)) for o in whole.output[::2]]
    assert texts[0] == ("Let me look.\n", "Let me look.\n")  # (the blank after the call rides on the text after it)
    assert texts[1][0].strip() == texts[1][1].strip() == after.replace("\\n", "").strip()
    assert whole.output[0].id != whole.output[2].id


def _response_request(served, after):
    """A Responses request forced to write "Let me look.", a call, then ``after``, with its output text's logprobs."""
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    return dict(model=TINY, input="Weather in Oslo?", tools=tools, max_output_tokens=64,
                extra_body={"guided_grammar": _grammar(served, after), "seed": 1},
                include=["message.output_text.logprobs"])


def _whole_response_with_a_call(served, after):
    """The whole Response to ``_response_request``."""
    return served[0].responses.create(**_response_request(served, after))


def test_piece_shares_give_each_piece_its_own_tokens():
    from xllm_jupyter.openai.piece_logprobs import piece_shares

    def tokens(*texts):
        return [{"token": t} for t in texts]

    call = {"tool_calls": [{"index": 0}]}
    held = tokens("Let", " me", ".", "\n", "<tool_call>", "{}", "</tool_call>", "\n", "Done", ".")
    assert piece_shares(held, [({"content": "Let me.\n"}, None), (call, None), ({"content": "Done."}, None)],
                        None) == [4, 3, 3]  # the blank after the call rides on the text after it
    # a call with no text after it in this delta takes its own tokens: the blank after it waits for the text after it,
    # as one by one (it took every held token, so that blank rode on the call or on the text after it by the grouping)
    held = tokens("Let", " me", ".", "\n", "<tool_call>", '{"name": "f", "arguments": {}}', "</tool_call>", "\n")
    assert piece_shares(held, [({"content": "Let me.\n"}, None), (call, None), (call, None)], None) == [4, 3, 0]
    assert piece_shares(held[4:6] + tokens("</tool_call>\n"), [(call, None)], None) == [3]  # the token it ends in
    assert piece_shares(tokens("<tool_call>", '{"name": "f", "arguments": {"a"'), [(call, None)], None) == [2]  # a
    # forced call still being written: all
    assert piece_shares(tokens("Hi", " ", "<"), [({"content": "Hi "}, None)], None) == [2]  # "<" held: a call's?
    assert piece_shares(tokens("Hi", " ", "<"), [({"content": "Hi "}, "stop")], None) == [3]  # the last takes all
    assert piece_shares(tokens("plan", "</think>", "\n\n", "The"), [({"reasoning_content": "plan"}, None),
                                                                   ({"content": "The"}, None)], "</think>") == [1, 3]
    assert piece_shares(tokens("bytes:\\xe2", "x"), [({"content": "\u2019x"}, None)], None) == [2]  # not found: all
    assert piece_shares([], [({"content": "x"}, None)], None) == [0]
    # text after a call that is in the call's JSON too ("}"): found after the call's tokens, not in them
    held = tokens("Hi", "\n", "<tool_call>", '{"name": "f", "arguments": {"a": "}"}}', "</tool_call>", "\n", "}")
    assert piece_shares(held, [({"content": "Hi\n"}, None), (call, None), ({"content": "}"}, None)], None) == [2, 3, 2]
    held = tokens("[TOOL_CALLS]", '[{"name": "f", "arguments": {}}]', ";", '{"name": "g", "arguments": {}}', " }")
    assert piece_shares(held, [(call, None), (call, None), ({"content": " }"}, None)], None) == [4, 0, 1]
    held = tokens('"}}', "\n", "</tool_call>", "}")  # a call begun in an earlier delta: after its end tag
    assert piece_shares(held, [(call, None), ({"content": "}"}, None)], None) == [3, 1]
    legacy = {"function_call": {"name": "f", "arguments": ""}}  # the deprecated ``functions``' pieces are calls too
    held = tokens("Hi", "\n", "<tool_call>", "{}", "</tool_call>", "\n", "Done")
    assert piece_shares(held, [({"content": "Hi\n"}, None), (legacy, None), ({"content": "Done"}, None)], None) == [2, 3, 2]


def test_a_character_split_over_tokens_keeps_the_text_and_the_call_apart():
    # an emoji or a CJK character a byte-level vocabulary spells in two tokens: each token's string is written
    # "\xf0\x9f" (no whole character alone), so the text was not found among the tokens' strings and took every held
    # token, the call's too, where one by one it takes its own (found by the tokens' bytes)
    from xllm_jupyter.core.types import TokenLogprob
    from xllm_jupyter.backends.detokenize import token_text
    from xllm_jupyter.openai.logprob_wire import chat_logprob_entries
    from xllm_jupyter.openai.piece_logprobs import piece_shares

    raws = [b"Hi ", "\U0001f600".encode()[:2], "\U0001f600".encode()[2:], b"\n", b"<tool_call>", b"{}", b"</tool_call>",
            b"\n", b"Done", b"."]
    held = chat_logprob_entries([TokenLogprob(token_text(r), -0.5, (), r, ()) for r in raws])
    call = {"tool_calls": [{"index": 0}]}
    assert piece_shares(held, [({"content": "Hi \U0001f600"}, None), (call, None), ({"content": "Done."}, None)],
                        None) == [3, 4, 3]
    # text not there: the call takes its own tokens, the text what follows them
    assert piece_shares(held[4:], [(call, None), ({"content": "\u00e9"}, None)], None) == [3, 3]
