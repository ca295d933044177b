"""Hermes/Qwen tool calls ``<tool_call>{json}</tool_call>`` whose markers the tokenizer has as special tokens (as some
models' do: vLLM's Hermes parser turns ``skip_special_tokens`` off for them): decoding skipped the markers, so the
calls came back as plain JSON content. Qwen's own tokenizers have them as ordinary added tokens, which decoded
anyway. A random tiny model is made to write the markers by token id (a Lark ``guided_grammar``). Real server, real
openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY, tiny_server_of_its_own
from tests.test_mistral_v11_tools import ASK, TOOLS

MARKUP = ("<tool_call>", "</tool_call>")
#: the calls the grammar below writes, their arguments as written
VERBATIM = [("weather", '{"city":"Oslo"}'), ("time", '{"city":"Lima"}')]
#: a minimal template in the Qwen/Hermes manner: tools listed, each past call as a ``<tool_call>`` block
HERMES_LIKE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments }}}\n</tool_call>"
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def special(tmp_path_factory):
    """A server of a tiny model whose tokenizer has ``<tool_call>``/``</tool_call>`` as special tokens, the Lark
    grammar that makes it write two calls with those very tokens, and the opening marker's id."""
    from transformers import AutoTokenizer

    from tests.models import build_tiny_llama

    model = build_tiny_llama(tmp_path_factory.mktemp("hermes-special") / "m", special=MARKUP)
    (model / "chat_template.jinja").write_text(HERMES_LIKE, encoding="utf-8")
    start, end = AutoTokenizer.from_pretrained(str(model)).convert_tokens_to_ids(list(MARKUP))
    # the markers by token id (llguidance's <[id]>): the same text spelled by ordinary tokens would decode anyway
    # (arguments as the model spaced them: a call read from its block keeps them verbatim, bare JSON re-spaced them)
    call = '"\\n{{\\"name\\": \\"{}\\", \\"arguments\\": {{\\"city\\":\\"{}\\"}}}}\\n"'
    grammar = (f'start: "Let me look.\\n" <[{start}]> {call.format("weather", "Oslo")} <[{end}]> "\\n" '
               f'<[{start}]> {call.format("time", "Lima")} <[{end}]>')
    with tiny_server_of_its_own(tmp_path_factory, model, "hermes_special") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=120) as c:
            yield c, grammar, (start, end)


def ask(special, **kw):
    client, grammar, _ = special
    return client.chat.completions.create(model=TINY, messages=ASK, max_completion_tokens=96, seed=1,
                                          extra_body={"guided_grammar": grammar}, **kw)


def test_calls_written_in_special_tokens_reach_the_parser(special):
    choice = ask(special, tools=TOOLS, logprobs=True).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == VERBATIM
    tokens = [t.token for t in choice.logprobs.content]  # the markers' tokens are named by their text
    assert tokens.count("<tool_call>") == 2 and tokens.count("</tool_call>") == 2


def test_calls_written_in_special_tokens_are_streamed(special):
    content, calls, reasons = "", {}, []
    for chunk in ask(special, tools=TOOLS, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for frag in delta.tool_calls or ():
            call = calls.setdefault(frag.index, [frag.function.name, ""])
            call[1] += frag.function.arguments or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert (content.strip(), [tuple(c) for c in calls.values()], reasons[-1]) == ("Let me look.", VERBATIM,
                                                                                   "tool_calls")


@pytest.mark.parametrize("tools", [{}, {"tools": TOOLS, "tool_choice": "none"}])
def test_special_markers_stay_out_of_text_where_calls_are_not_parsed(special, tools):
    r = ask(special, **tools)
    assert r.choices[0].message.content == ('Let me look.\n\n{"name": "weather", "arguments": {"city":"Oslo"}}\n\n'
                                            '\n{"name": "time", "arguments": {"city":"Lima"}}\n')
    assert not r.choices[0].message.tool_calls


@pytest.mark.parametrize("stream", [False, True])
def test_forced_calls_with_special_markers(special, stream):
    # the tool grammar's <tool_call> text tokenized into the special token, which no text literal of it matched: a 400
    r = special[0].chat.completions.create(model=TINY, messages=ASK, tools=TOOLS, max_completion_tokens=64, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "time"}},
                                           stream=stream)
    if stream:
        chunks = list(r)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        names = [f.function.name for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or ()
                 if f.function and f.function.name]
    else:
        content = r.choices[0].message.content
        names = [c.function.name for c in r.choices[0].message.tool_calls or ()]
    assert names == ["time"] and not content


@pytest.mark.parametrize("special", [False, True])
def test_a_forced_tool_grammar_compiles_where_the_markers_are_added_tokens(special):
    """Qwen's tokenizers have ``<tool_call>``/``</tool_call>`` as added tokens (not special): llguidance still takes them
    for special ones, so the forced grammar's ``<tool_call>`` text failed at once (a 400 on every forced call)."""
    import numpy as np
    from transformers import AddedToken

    from tests.models import smollm2_tokenizer
    from xllm_jupyter.backends.constraints import GrammarCompiler
    from xllm_jupyter.openai.legacy_functions import request_tool_config
    from xllm_jupyter.openai.tools import tool_constraint

    tokenizer = smollm2_tokenizer()
    tokenizer.add_tokens([AddedToken(m, special=special, normalized=False) for m in MARKUP], special_tokens=special)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    cfg, _ = request_tool_config(TOOLS, {"type": "function", "function": {"name": "time"}}, None, {})
    matcher = compiler.new_matcher(tool_constraint(cfg), param="tool_choice")
    opening = tokenizer.convert_tokens_to_ids("<tool_call>")
    mask = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    assert mask[opening] and matcher.consume_token(opening) and not matcher.is_error()
    assert f"<[{opening}]>" in compiler.text_for(tool_constraint(cfg))  # what exllamav3's own filter compiles
