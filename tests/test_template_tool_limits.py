"""Chat templates that refuse OpenAI-shaped tool histories. Mistral's take only 9-character tool call ids (they raise
on any other); OpenAI's ``call_...`` ids, this server's own among them, are longer, so every turn after a tool call
was a 400 on a Mistral model: the ids the template sees are made 9 letters or digits, each result keeping its call's.
Llama 3.x's take one call per assistant message: a turn of parallel calls reaches them as one call and its result at
a time. A real tokenizer and template engine."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from xllm_jupyter.core.types import ChatMessage
from xllm_jupyter.openai.tool_calling import ToolCalling
from xllm_jupyter.openai.tools import nine_char_ids, one_call_per_turn

#: a minimal template in the Mistral manner: it renders tools, and refuses ids that are not 9 characters long
MISTRAL_LIKE = (
    "{% if tools %}[AVAILABLE_TOOLS]{% for t in tools %}{{ t.function.name }};{% endfor %}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS]{% for c in m.tool_calls %}"
    "{% if c.id|length != 9 %}{{ raise_exception('Tool call ids must be 9 characters') }}{% endif %}"
    "<{{ c.function.name }} {{ c.id }}>{% endfor %}</s>"
    "{% elif m.role == 'tool' %}"
    "{% if m.tool_call_id|length != 9 %}{{ raise_exception('Tool call ids must be 9 characters') }}{% endif %}"
    "[TOOL_RESULTS]{{ m.tool_call_id }}={{ m.content }}[/TOOL_RESULTS]"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}"
)
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]
LONG = "call_0123456789abcdef01234567"  # this server's shape
HISTORY = [
    ChatMessage("user", "Weather in Oslo and Lima?"),
    ChatMessage("assistant", None, tool_calls=[
        {"id": LONG, "type": "function", "function": {"name": "weather", "arguments": "{}"}},
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}},
        {"id": "abcde1234", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]),
    ChatMessage("tool", "-5 C", tool_call_id=LONG),
    ChatMessage("tool", "22 C", tool_call_id="c1"),
    ChatMessage("tool", "9 C", tool_call_id="abcde1234"),
]


@pytest.fixture(scope="module")
def model(tiny_llama_dir, tmp_path_factory):
    from xllm_jupyter.backends.base import BackendOptions, ModelSpec
    from xllm_jupyter.backends.transformers import TransformersBackend

    private = Path(tmp_path_factory.mktemp("mistral-like")) / "t"  # its own copy: the tokenizer of files in use is shared, and its template changes
    shutil.copytree(tiny_llama_dir, private)
    with open(private / "chat_template.jinja", "a", encoding="utf-8") as f:
        f.write("{# this test's own copy #}")
    loaded = TransformersBackend().load(ModelSpec(name="t", path=private, options=BackendOptions(device="cpu")))
    yield loaded
    loaded.unload()


def _render(model, template: str, history: list[ChatMessage], tools: list[dict], choice: str | None = None) -> str:
    """The prompt ``template`` renders of ``history`` with ``tools``, as a chat request's (``tool_choice`` ``choice``)."""
    class Req:
        tool_choice, parallel_tool_calls = choice, None

    Req.tools = tools
    model.tokenizer.chat_template = template
    messages, shown = ToolCalling.from_request(Req, model).prompt(history)
    return model.render_chat(messages, tools=shown)


@pytest.mark.parametrize("choice", [None, "none", "required"])
def test_a_mistral_template_renders_a_history_with_openai_ids(model, choice):
    prompt = _render(model, MISTRAL_LIKE, HISTORY, TOOLS, choice)  # raised "Tool call ids must be 9 characters" (a 400)
    calls = re.findall(r"<weather (\w+)>", prompt)
    results = re.findall(r"\[TOOL_RESULTS\](\w+)=([^\[]+)\[", prompt)
    assert len(set(calls)) == 3 and all(len(c) == 9 for c in calls)
    assert results == [(calls[0], "-5 C"), (calls[1], "22 C"), (calls[2], "9 C")]  # each result keeps its call's id
    assert calls[2] == "abcde1234"  # an id the template takes is kept


def test_ids_of_other_templates_are_left_alone():
    assert nine_char_ids(HISTORY)[3].tool_call_id != LONG  # (the function itself always shortens)

    class Req:
        tools, tool_choice, parallel_tool_calls = TOOLS, None, None

    class Qwen:
        @staticmethod
        def chat_template():
            return "{% if tools %}<tools></tools>{% endif %}<tool_call>"

    messages, _ = ToolCalling.from_request(Req, Qwen).prompt(HISTORY)
    assert messages[1].tool_calls[0]["id"] == LONG and messages[2].tool_call_id == LONG


#: a minimal template in the Llama 3.x manner: it renders tools, and refuses a message of more than one call
LLAMA_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}"
    "{% if m.tool_calls %}{% if m.tool_calls|length != 1 %}"
    "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
    "<call>{{ m.tool_calls[0].function.arguments.city }}</call>"
    "{% elif m.role == 'tool' %}<result>{{ m.content }}</result>"
    "{% else %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endif %}{% endfor %}"
)
CITY = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def _calls(*cities: str) -> list[dict]:
    return [{"id": f"call_{c}", "type": "function", "function": {"name": "weather", "arguments": f'{{"city": "{c}"}}'}}
            for c in cities]


#: a turn of two parallel calls and their results
PARALLEL_RESULTS = [ChatMessage("user", "Weather?"), ChatMessage("assistant", None, tool_calls=_calls("Oslo", "Lima")),
                    ChatMessage("tool", "-5 C", tool_call_id="call_Oslo"), ChatMessage("tool", "22 C", tool_call_id="call_Lima")]


@pytest.mark.parametrize("choice", [None, "none", "required"])
def test_a_llama_template_renders_a_turn_of_parallel_calls(model, choice):
    history = [ChatMessage("user", "Weather?"), ChatMessage("assistant", "Checking.", tool_calls=_calls("Oslo", "Lima")),
               ChatMessage("tool", "-5 C", tool_call_id="call_Oslo"), ChatMessage("tool", "22 C", tool_call_id="call_Lima"),
               ChatMessage("assistant", "Cold and warm."), ChatMessage("user", "And Rome?"),
               ChatMessage("assistant", None, tool_calls=_calls("Rome")), ChatMessage("tool", "15 C", tool_call_id="call_Rome")]
    prompt = _render(model, LLAMA_LIKE, history, CITY, choice)  # raised "only supports single tool-calls" (a 400)
    assert ("<user>Weather?</user><call>Oslo</call><result>-5 C</result><call>Lima</call><result>22 C</result>"
            "<assistant>Cold and warm.</assistant><user>And Rome?</user><call>Rome</call><result>15 C</result>") in prompt


def test_one_call_per_turn_keeps_the_text_once_and_every_result():
    turn = [ChatMessage("assistant", "Checking.", tool_calls=_calls("Oslo", "Lima"), reasoning_content="Both."),
            ChatMessage("tool", "22 C", tool_call_id="call_Lima"), ChatMessage("tool", "-5 C", tool_call_id="call_Oslo")]
    split = one_call_per_turn(turn)
    assert [(m.role, m.content, m.tool_call_id or m.tool_calls[0]["id"]) for m in split] == [
        ("assistant", "Checking.", "call_Oslo"), ("tool", "-5 C", "call_Oslo"),
        ("assistant", None, "call_Lima"), ("tool", "22 C", "call_Lima")]
    assert [m.reasoning_content for m in split] == ["Both.", None, None, None]  # the thinking once too


#: a minimal template in the Gemma manner: no system turn, and turns alternating from a user turn
GEMMA_LIKE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
)


@pytest.mark.parametrize(("messages", "shown"), [
    ([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], "<user>Be brief.\n\nHi</user>"),
    ([ChatMessage("developer", "Be brief."), ChatMessage("system", "Be kind."), ChatMessage("user", "Hi"),
      ChatMessage("assistant", "Yo"), ChatMessage("user", "Bye")],
     "<user>Be brief.\n\nBe kind.\n\nHi</user><assistant>Yo</assistant><user>Bye</user>"),
    ([ChatMessage("system", "Be brief.")], "<user>Be brief.</user>"),
    ([ChatMessage("user", "Hi")], "<user>Hi</user>"),
], ids=["system", "developer and system", "system alone", "no system"])
def test_a_gemma_template_takes_a_system_message(model, messages, shown):
    model.tokenizer.chat_template = GEMMA_LIKE
    assert model.render_chat(messages) == shown  # raised "System role not supported" (a 400)


#: Mistral 7B v0.1/v0.2's and Mixtral's first template (still in many GGUF copies): turns alternating from a user
#: turn and no system role, refused by the alternation check ("Conversation roles must alternate") before its own
MISTRAL_V01_LIKE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] + '</s>' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)


def test_a_template_refusing_a_system_turn_its_own_way_takes_one(model):
    """A system message (and every request with tools, described in one) was a 400 on Mistral's first templates,
    in words that did not name it: "Conversation roles must alternate". Its text heads the first user turn, as for
    Gemma's; what the template refuses for another reason keeps its own 400."""
    from xllm_jupyter.core.errors import InvalidRequest

    model.tokenizer.chat_template = MISTRAL_V01_LIKE
    history = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("assistant", "Yo"),
               ChatMessage("user", "Bye")]
    assert model.render_chat(history) == "[INST] Be brief.\n\nHi [/INST]Yo</s>[INST] Bye [/INST]"
    prompt = _render(model, MISTRAL_V01_LIKE, [ChatMessage("user", "Weather?")], CITY)
    assert prompt.startswith("[INST] # Tools") and prompt.endswith("Weather? [/INST]") and '"weather"' in prompt
    for refused in ([ChatMessage("user", "Hi"), ChatMessage("user", "again")],
                    [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"), ChatMessage("user", "again")]):
        with pytest.raises(InvalidRequest, match="Conversation roles must alternate") as info:
            model.render_chat(refused)
        assert info.value.param == "messages"


def test_tools_without_a_native_template_reach_gemma(model):
    """The fallback prompt describes the tools in a system message: every request with tools was a 400 on Gemma."""
    prompt = _render(model, GEMMA_LIKE, [ChatMessage("user", "Weather?")], CITY)
    assert prompt.startswith("<user># Tools") and prompt.endswith("Weather?</user>") and '"weather"' in prompt


def test_a_turn_of_tool_results_is_one_user_turn_without_a_native_template(model):
    """Gemma's template wants turns to alternate: the fallback's results of parallel calls were two user turns."""
    prompt = _render(model, GEMMA_LIKE, PARALLEL_RESULTS, CITY)  # raised "Conversation roles must alternate" (a 400)
    assert prompt.endswith("<user><tool_response>\n-5 C\n</tool_response>\n<tool_response>\n22 C\n</tool_response></user>")


#: a minimal template in the DeepSeek manner: it joins a call's arguments to text, so it takes them as a string
DEEPSEEK_LIKE = (
    "{% if tools %}<tools>{% endif %}{% for m in messages %}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}{{ '<call>' + c.function.name + ':' + c.function.arguments + '</call>' }}"
    "{% endfor %}{% else %}<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}"
)


def test_a_template_that_takes_arguments_as_text_renders_a_tool_history(model):
    prompt = _render(model, DEEPSEEK_LIKE, PARALLEL_RESULTS, CITY)  # a TypeError (str + dict): a 500
    assert '<call>weather:{"city": "Oslo"}</call><call>weather:{"city": "Lima"}</call><tool>-5 C<tool>22 C' in prompt
