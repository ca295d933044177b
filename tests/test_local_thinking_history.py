"""The in-process chat gives an assistant turn's thinking sent back to the chat template, as the server does."""

from xllm_jupyter.client.local import to_chat_messages


def test_assistant_thinking_sent_back_reaches_the_template_dict():
    messages = to_chat_messages([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "assistant", "content": "Again", "reasoning": "vLLM's name"},
        {"role": "user", "content": "Bye", "reasoning_content": "not an assistant's"},
    ])
    dicts = [m.to_template_dict() for m in messages]
    assert dicts[1]["reasoning_content"] == "greet back" and dicts[1]["reasoning"] == "greet back"
    assert dicts[2]["reasoning_content"] == "vLLM's name"
    assert "reasoning_content" not in dicts[0] and "reasoning_content" not in dicts[3]


def test_reasoning_content_wins_over_reasoning_and_non_strings_are_ignored():
    both, odd = to_chat_messages([
        {"role": "assistant", "content": "x", "reasoning_content": "first", "reasoning": "second"},
        {"role": "assistant", "content": "y", "reasoning_content": None, "reasoning": 5},
    ])
    assert both.reasoning_content == "first"
    assert odd.reasoning_content is None
