"""A reasoning model whose ``</think>`` is several ordinary tokens counts its thinking tokens up to the marker however
the engine grouped the tokens into deltas.

Within one stream interval (16 ms: ~8 tokens on a GPU) one delta may hold the marker's last tokens and the answer's
first. The tally counted every token of the delta in which the thinking ended, so ``reasoning_tokens`` took the
answer's tokens too (all of them when the whole reply came in one delta) and the whole Response, which cuts its output
text logprobs after that many, had none left. A random tiny model writes the text through a Lark ``guided_grammar``.
"""

from __future__ import annotations

import dataclasses

import openai
import pytest

from tests.server_fixtures import make_test_config, running_server
from tests.test_reasoning import THINK_LIKE

GRAMMAR = 'start: "<think>\\nplan it\\n</think>\\n\\nThe answer."'
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A server of a tiny model with text thinking markers whose engine hands each reply's tokens after the first over
    in one delta (an interval longer than any reply), as a fast engine does within its 16 ms interval."""
    from tests.models import build_tiny_llama
    from xllm_jupyter.store.store import ModelStore

    root = tmp_path_factory.mktemp("text-marker-grouped")
    model = build_tiny_llama(root / "plain")
    (model / "chat_template.jinja").write_text(THINK_LIKE, encoding="utf-8")
    store = ModelStore(root / "home")
    store.pull(str(model), "plain")
    config = make_test_config(root / "home")
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, stream_interval_ms=60_000))
    with running_server(config, store, "plain") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c


def _through_marker(tokens: list[str]) -> int:
    """How many of ``tokens`` it takes to write the thinking and its end marker."""
    text = ""
    for k, token in enumerate(tokens, 1):
        text += token
        if "</think>" in text:
            return k
    raise AssertionError(tokens)


def _usage_and_tokens(client, kw, stream):
    """A chat reply's usage and every token its logprobs name, whole or streamed."""
    if not stream:
        reply = client.chat.completions.create(**kw)
        return reply.usage, [t.token for t in reply.choices[0].logprobs.content]
    usage, tokens = None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            tokens += [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
    return usage, tokens


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_tokens_end_at_a_text_marker_in_a_grouped_delta(grouped, stream):
    kw = dict(model="plain", messages=ASK, max_completion_tokens=48, seed=1, logprobs=True,
              extra_body={"guided_grammar": GRAMMAR})
    usage, tokens = _usage_and_tokens(grouped, kw, stream)
    assert "".join(tokens) == GRAMMAR[8:-1].replace("\\n", "\n")  # (a sampled spelling: counted from its tokens)
    assert usage.completion_tokens_details.reasoning_tokens == _through_marker(tokens) < usage.completion_tokens


def test_a_whole_responses_output_text_logprobs_survive_a_grouped_text_marker(grouped):
    r = grouped.responses.create(model="plain", input="Hi", max_output_tokens=48, include=["message.output_text.logprobs"],
                                 extra_body={"guided_grammar": GRAMMAR, "seed": 1})
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "The answer."
    assert "".join(t.token for t in r.output[1].content[0].logprobs).strip() == "The answer."


def test_the_tally_finds_a_marker_split_over_two_pieces():
    from xllm_jupyter.openai.reasoning import Reasoning, ReasoningTally

    tally = ReasoningTally(Reasoning("<think>", "</think>", end_ids=(5, 6, 7)), 1)
    for text, ids in [("<think>plan", (1, 2, 3)), ("</", (5,)), ("think>The", (6, 7, 9)), (" end", (10,))]:
        tally.count(0, text, ids, False)
    assert tally.tokens == 6  # "<think>plan" 3, "</" 1, "think>" 2; not "The" nor " end"


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_tokens_end_at_a_text_marker_spelled_in_other_tokens(grouped, stream):
    # "</think>" as "<" "/" "think" ">" (its ids alone are "</" "think" ">"; a sampled or constrained reply may spell it
    # so): the tally did not find the marker's ids and counted every token of the delta the thinking ended in, the
    # answer's too (all of them in one delta)
    from tests.models import smollm2_tokenizer

    lt, slash, think, gt = smollm2_tokenizer().convert_tokens_to_ids(["<", "/", "think", ">"])
    grammar = f'start: "<think>\\nplan it\\n" <[{lt}]> <[{slash}]> <[{think}]> <[{gt}]> "\\n\\nThe answer."'
    kw = dict(model="plain", messages=ASK, max_completion_tokens=48, seed=1, logprobs=True,
              extra_body={"guided_grammar": grammar})
    usage, tokens = _usage_and_tokens(grouped, kw, stream)
    assert "".join(tokens).startswith("<think>\nplan it\n</think>") and tokens.count(">") >= 1, tokens
    assert usage.completion_tokens_details.reasoning_tokens == _through_marker(tokens) < usage.completion_tokens
