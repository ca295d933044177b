"""OpenAI's ``reasoning_effort`` (chat) and ``reasoning: {"effort": ...}`` (Responses), as vLLM serves them: the
effort goes to the chat template as its ``reasoning_effort`` variable (gpt-oss's reads it), where the template reads
one; a model whose template does not has no effort to set, and that is a 400, never ignored. A random tiny Llama
whose template writes one ``x`` per letter of the effort, so the prompt's size shows what the template was given.
Real server, real openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import templated_client

#: writes a token per letter of the effort it is given (none: nothing), then the messages
EFFORT_TEMPLATE = (
    "{% if reasoning_effort is defined %}{% for _ in range(reasoning_effort | length) %} x{% endfor %}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A client of a server on "effort" (a template reading reasoning_effort) and "plain" (SmolLM2's, which does not)."""
    with templated_client(tmp_path_factory.mktemp("effort"), {"effort": EFFORT_TEMPLATE, "plain": None}, "effort") as c:
        yield c


def _prompt_tokens(client, model="effort", **kw):
    return client.chat.completions.create(model=model, messages=MSG, max_completion_tokens=1, seed=1,
                                          **kw).usage.prompt_tokens


def test_the_effort_reaches_a_template_that_reads_it(client):
    base = _prompt_tokens(client)
    assert [_prompt_tokens(client, reasoning_effort=e) - base for e in ("low", "medium", "high", "minimal")] == [3, 6, 4, 7]
    # the same as chat_template_kwargs gives it (vLLM's way, which stays), and both agreeing is fine
    kwargs = {"chat_template_kwargs": {"reasoning_effort": "high"}}
    assert _prompt_tokens(client, extra_body=kwargs) == _prompt_tokens(client, reasoning_effort="high", extra_body=kwargs)
    assert _prompt_tokens(client, extra_body=kwargs) == base + 4


def test_responses_reasoning_effort_is_the_chat_field(client):
    r = client.responses.create(model="effort", input="Hi", reasoning={"effort": "medium"}, max_output_tokens=1)
    plain = client.responses.create(model="effort", input="Hi", max_output_tokens=1)
    assert r.usage.input_tokens == plain.usage.input_tokens + 6
    assert r.reasoning.effort == "medium" and plain.reasoning is None
    assert client.responses.input_tokens.count(model="effort", input="Hi", reasoning={"effort": "low"}).input_tokens == \
        plain.usage.input_tokens + 3


@pytest.mark.parametrize("kw, param, code", [
    ({"model": "plain", "reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),  # nothing to set
    ({"reasoning_effort": "low", "extra_body": {"chat_template_kwargs": {"reasoning_effort": "high"}}},
     "reasoning_effort", None),  # one of them would be ignored
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "invalid_value"),
    ({"reasoning_effort": 3}, "reasoning_effort", "invalid_type"),
])
def test_an_effort_that_cannot_be_honoured_is_a_400(client, kw, param, code):
    body = {"model": "effort", "messages": MSG, "max_completion_tokens": 1, **kw}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.body["param"] == param
    if code:
        assert caught.value.body["code"] == code
    if body["model"] == "plain":
        assert "has no reasoning effort" in caught.value.body["message"]


@pytest.mark.parametrize("reasoning, param", [
    ({"effort": "low"}, "reasoning.effort"),  # the plain model's template has no effort
    ({"effort": "low", "summary": "auto"}, "reasoning.summary"),  # no summary is made
])
def test_responses_say_which_reasoning_field_cannot_be_honoured(client, reasoning, param):
    model = "plain" if param == "reasoning.effort" else "effort"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=model, input="Hi", reasoning=reasoning, max_output_tokens=1)
    assert caught.value.body["param"] == param and caught.value.body["code"] == "unsupported_parameter"
    assert "reasoning_effort" not in caught.value.body["message"]
