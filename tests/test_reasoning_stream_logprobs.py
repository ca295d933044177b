"""A streamed Response's output text logprobs are the answer's tokens, as the whole Response's are.

The chat stream holds a reasoning model's end marker (and the thinking's trailing whitespace) back and sends their
token logprobs with the answer's first piece; the Responses stream put them in the message's ``output_text``
logprobs, so a streamed reply's began with ``</think>`` where the whole reply's start after it.
"""

from __future__ import annotations

import pytest

from tests.server_fixtures import RANDOM_STEPS_MS, random_steps
from tests.test_reasoning import THINK, _grammar, reasoning_client, served  # noqa: F401  (the module's server)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A reasoning server whose engine hands each reply's tokens after the first over in one delta (a stream interval
    longer than any reply), as a fast engine does within its 16 ms interval."""
    with reasoning_client(tmp_path_factory.mktemp("grouped"), stream_interval_ms=60_000) as client:
        yield client


@pytest.fixture(scope="module")
def stepwise(tmp_path_factory):
    """A reasoning server whose engine hands each token over in a delta of its own (no stream interval), as a slow
    engine does; the thinking's trailing whitespace then comes alone, before the end marker."""
    with reasoning_client(tmp_path_factory.mktemp("stepwise"), stream_interval_ms=0) as client:
        yield client


@pytest.fixture(scope="module")
def random_steps_server(tmp_path_factory):
    """A reasoning server whose engine hands tokens over at seeded random steps (``random_steps``)."""
    with random_steps(seed=4) as chosen:
        with reasoning_client(tmp_path_factory.mktemp("random-steps"), stream_interval_ms=RANDOM_STEPS_MS) as client:
            yield client
    assert True in chosen and False in chosen  # the hook reached the runner: some steps left, some waited


@pytest.mark.parametrize("server", ["served", "grouped", "random_steps_server"])
def test_streamed_output_text_logprobs_leave_out_the_thinkings_end(server, request):
    # grouped: the thinking's end and the answer came in one engine delta, and every token's logprob rode on its
    # thinking piece, so the streamed output text's lost its first tokens ("The"; CI's faster machine)
    client, ids = request.getfixturevalue(server)
    grammar = _grammar(ids, *THINK, "\\nplan it\\n", "\\n\\nThe answer.")
    kw = dict(model="think", input="Hi", max_output_tokens=48, extra_body={"guided_grammar": grammar, "seed": 1},
              include=["message.output_text.logprobs"])
    whole = [t.token for t in client.responses.create(**kw).output[1].content[0].logprobs]
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    tokens = [t.token for t in final.output[1].content[0].logprobs]
    assert [t.token for e in events if e.type == "response.output_text.delta" for t in e.logprobs] == tokens
    # (each request may spell the forced text in other tokens: a random model sampled; the text is the same)
    for scored in (whole, tokens):
        assert THINK[1] not in "".join(scored) and "".join(scored).strip() == final.output_text == "The answer."


def test_an_empty_thinking_blocks_markers_stay_out_of_the_streamed_output_text_logprobs(served):  # noqa: F811
    # "<think>\n</think>" (a reasoning model with nothing to think): no reasoning item opens, and the whole
    # Response's output text logprobs still start after the end marker; the streamed ones began with <think>
    client, ids = served
    grammar = _grammar(ids, *THINK, "\\n", "\\n\\nThe answer.")
    kw = dict(model="think", input="Hi", max_output_tokens=48, extra_body={"guided_grammar": grammar, "seed": 1},
              include=["message.output_text.logprobs"])
    whole = client.responses.create(**kw)
    with client.responses.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert [i.type for i in whole.output] == [i.type for i in final.output] == ["message"]
    tokens = [t.token for t in final.output[0].content[0].logprobs]
    assert [t.token for e in events if e.type == "response.output_text.delta" for t in e.logprobs] == tokens
    for scored in ([t.token for t in whole.output[0].content[0].logprobs], tokens):
        joined = "".join(scored)
        assert THINK[0] not in joined and THINK[1] not in joined and joined.strip() == final.output_text == "The answer."


def _logprobs_by_side(server) -> tuple[list[str], list[str]]:
    """The tokens whose logprobs a streamed chat's thinking chunks carry, and those the other chunks carry."""
    client, ids = server
    grammar = _grammar(ids, *THINK, "\\nplan it\\n", "\\n\\nThe answer.")
    chunks = list(client.chat.completions.create(
        model="think", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=48, seed=1, stream=True,
        logprobs=True, extra_body={"guided_grammar": grammar}))
    thinking, answer = [], []
    for chunk in chunks:
        for choice in chunk.choices:
            tokens = [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
            (thinking if getattr(choice.delta, "reasoning_content", None) else answer).extend(tokens)
    return thinking, answer


def test_a_chat_streams_thinking_pieces_carry_the_thinkings_logprobs_however_the_tokens_were_grouped(
        grouped, stepwise, random_steps_server):
    # grouped: the thinking, its end and the answer in one engine delta, and the reasoning chunk carried every
    # token's logprob. Stepwise, the thinking's trailing newline comes alone and is held back (it may end the
    # thinking): its logprob rode on the answer's first chunk, where grouped it rode on the thinking's
    thinking, answer = _logprobs_by_side(grouped)
    assert "".join(thinking).startswith(THINK[0]) and "".join(thinking)[len(THINK[0]):].strip() == "plan it"
    assert "".join(answer).lstrip().startswith(THINK[1]) and "".join(answer).strip()[len(THINK[1]):].strip() == \
        "The answer."
    assert _logprobs_by_side(stepwise) == (thinking, answer)  # the same model, seed and tokens
    assert _logprobs_by_side(random_steps_server) == (thinking, answer)


def test_thinking_share_counts_the_tokens_before_the_end_marker_however_it_is_spelled():
    from xllm_jupyter.openai.reasoning import thinking_share

    tokens = lambda *t: [{"token": x} for x in t]  # noqa: E731
    assert thinking_share(tokens("plan", "\n", "</think>", "\n\n", "The"), "</think>") == 1  # its end's "\n" too
    assert thinking_share(tokens("plan", " it", "\n"), "</think>") == 2  # may end the thinking: held, as it is alone
    assert thinking_share(tokens("plan", "\n", " it"), "</think>") == 3
    assert thinking_share(tokens("plan", "\n</", "think", ">", "The"), "</think>") == 1  # a marker in pieces
    assert thinking_share(tokens("plan", " it", "</"), "</think>") == 2  # may be the marker's beginning: held
    assert thinking_share(tokens("plan", " it"), "</think>") == 2
    assert thinking_share([], "</think>") == 0
