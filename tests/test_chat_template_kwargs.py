"""vLLM's ``chat_template_kwargs`` reach the chat template (chat completions and Responses), through the openai SDK's
``extra_body`` as clients ported from vLLM send Qwen3's ``{"enable_thinking": false}``. They were dropped as an unknown
field, so the template rendered its default. The tiny model here has a template of its own that shows the variables in
the prompt, so the prompt's token count tells whether they arrived. Keys the server sets are 400s naming the key."""

from __future__ import annotations

import shutil

import openai
import pytest

from tests.server_fixtures import TINY, tiny_server_of_its_own

#: Qwen3's switch, a free variable, and one the template can only add to text
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    "{% if greeting is defined %}{{ greeting }}{% endif %}"
    "{% if suffix is defined %}{{ 'x' + suffix }}{% endif %}"
    "{% if messages[0].content == 'boom' %}{{ 'x' + 1 }}{% endif %}"  # fails these messages whatever the variables
)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_llama_dir):
    private = tmp_path_factory.mktemp("kwargs-template") / "t"  # its own copy: the template differs
    shutil.copytree(tiny_llama_dir, private)
    (private / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    with tiny_server_of_its_own(tmp_path_factory, private, "chat_template_kwargs") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c


def prompt_tokens(client, kwargs=None):
    extra = {} if kwargs is None else {"chat_template_kwargs": kwargs}
    r = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, seed=1, extra_body=extra)
    return r.usage.prompt_tokens


def test_kwargs_reach_the_template(client):
    plain = prompt_tokens(client)
    assert prompt_tokens(client, {"enable_thinking": False}) > plain
    assert prompt_tokens(client, {"enable_thinking": True}) == plain
    assert prompt_tokens(client, {"greeting": "Hello there, friend"}) > plain
    assert prompt_tokens(client, {}) == prompt_tokens(client, None) == plain
    # a stream renders the same prompt
    stream = client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, seed=1, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    usage = [c.usage for c in stream if c.usage]
    assert usage[-1].prompt_tokens == prompt_tokens(client, {"enable_thinking": False})


def test_responses_pass_them_on(client):
    plain = client.responses.create(model=TINY, input="Hi", max_output_tokens=16).usage.input_tokens
    off = client.responses.create(model=TINY, input="Hi", max_output_tokens=16,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.input_tokens
    assert off > plain


@pytest.mark.parametrize("kwargs, param", [
    ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
    ({"messages": []}, "chat_template_kwargs.messages"),
    ({"tools": [{"x": 1}]}, "chat_template_kwargs.tools"),
    ({"tokenize": True}, "chat_template_kwargs.tokenize"),
    ({"chat_template": "{{ 1 }}"}, "chat_template_kwargs.chat_template"),
    ({"raise_exception": "no"}, "chat_template_kwargs.raise_exception"),
    (["enable_thinking"], "chat_template_kwargs"),
    ("enable_thinking=false", "chat_template_kwargs"),
    ({"suffix": 5}, "chat_template_kwargs"),  # the template fails on it (a TypeError): the client's value at fault
])
def test_reserved_keys_and_bad_values_are_400s(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1,
                                       extra_body={"chat_template_kwargs": kwargs})
    assert exc.value.status_code == 400 and exc.value.body["param"] == param, exc.value.body


def test_a_template_failing_the_messages_anyway_does_not_blame_the_kwargs(client):
    """A TypeError the template raises without the variables too is the server's 500, as it is with none given; it
    was a 400 telling the client its chat_template_kwargs were at fault."""
    boom = [{"role": "user", "content": "boom"}]
    for extra in ({}, {"chat_template_kwargs": {"greeting": "Hello"}}):
        with pytest.raises(openai.InternalServerError) as exc:
            client.chat.completions.create(model=TINY, messages=boom, max_completion_tokens=1, extra_body=extra)
        assert exc.value.status_code == 500 and "chat_template_kwargs" not in str(exc.value.body), exc.value.body
    assert client.chat.completions.create(model=TINY, messages=HI, max_completion_tokens=1, seed=1).choices
