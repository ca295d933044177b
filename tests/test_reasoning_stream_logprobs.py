"""A streamed Response's output text logprobs are the answer's tokens, as the whole Response's are.

The chat stream holds a reasoning model's end marker (and the thinking's trailing whitespace) back and sends their
token logprobs with the answer's first piece; the Responses stream put them in the message's ``output_text``
logprobs, so a streamed reply's began with ``</think>`` where the whole reply's start after it.
"""

from __future__ import annotations

from tests.test_reasoning import THINK, _grammar, served  # noqa: F401  (the module's server, a reasoning template)


def test_streamed_output_text_logprobs_leave_out_the_thinkings_end(served):  # noqa: F811
    client, ids = served
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
