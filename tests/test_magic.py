"""%%xllm through a real IPython InteractiveShell (and a real kernel) against the live server."""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from typing import Any, Callable

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from tests.server_fixtures import TINY
from xllm_jupyter.client import XllmClient
from xllm_jupyter.magics import XllmMagics, interpolate
from xllm_jupyter.magics.render import Reply, extract_code, parse_json
from xllm_jupyter.notebook.safe_markdown import neutral_markdown


@pytest.fixture
def shell(xllm_server, monkeypatch):
    """IPython with `%load_ext xllm_jupyter`, pointed at the live server like a kernel would be."""
    monkeypatch.setenv("XLLM_BASE_URL", xllm_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", xllm_server.api_key)
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "xllm_jupyter")
    magics = XllmMagics(ip)
    ip.register_magics(magics)  # a fresh instance per test: no conversation or defaults carried over
    ip.xllm_magics = magics
    yield ip
    magics.state.close()
    for name in ("topic", "answer", "code", "obj"):
        ip.user_ns.pop(name, None)


def expected(server, prompt: str | list, max_tokens: int, system: str | None = None, **params) -> str:
    """What the server answers (greedy unless told, so the magic must show exactly this)."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + messages
    params.setdefault("temperature", 0)
    with XllmClient(server.base_url, server.api_key) as c:
        return c.chat(messages, TINY, max_tokens=max_tokens, **params)


def final(cap, mime: str = "text/markdown"):
    """The last display (or update) carrying ``mime``."""
    rich = [o for o in cap.outputs if mime in o.data]
    assert rich, f"the magic displayed no {mime}"
    return rich[-1]


def final_markdown(cap) -> str:
    """The text/markdown of the last display update."""
    return final(cap).data["text/markdown"]


#: the tiny random-weight model answers most prompts with blank lines when greedy: a seeded sample has words,
#: so comparing what a cell shows with what the server answers compares content
SAMPLED = "-t 1 --seed 7"


def sampled(server, prompt: str, max_tokens: int, system: str | None = None) -> str:
    """What the server answers ``prompt`` sampled as SAMPLED asks (checked to be more than whitespace)."""
    text = expected(server, prompt, max_tokens, system=system, temperature=1.0, seed=7)
    assert text.strip(), f"the seeded answer to {prompt!r} is blank: pick another seed"
    return text


def test_interpolate_keeps_unknown_names():
    ns = {"topic": "cats", "n": 3}
    assert interpolate("Tell me about {topic} in {n} lines, {unknown}!", ns) == "Tell me about cats in 3 lines, {unknown}!"
    assert interpolate("{missing:>5} {missing.attr} {missing[0]}", {}) == "{missing:>5} {missing.attr} {missing[0]}"
    # not a template (code with braces): sent untouched
    assert interpolate("def f(): return {}", ns) == "def f(): return {}"
    assert interpolate("unbalanced { brace", ns) == "unbalanced { brace"
    assert interpolate("{{literal}} {topic}", ns) == "{literal} cats"


def test_an_unknown_names_conversion_stays_as_written():
    """`{value!r}` of a name the notebook lacks (code quoted in a prompt: `print(f"{value!r}")`) went to the model as
    `{value}`, the code changed; unknown names stay as written, their conversion and format spec included."""
    ns = {"topic": "cats"}
    code = 'Explain print(f"{value!r} {value!s:>8} {value.x!a}") to me, about {topic}'
    assert interpolate(code, ns) == 'Explain print(f"{value!r} {value!s:>8} {value.x!a}") to me, about cats'
    assert interpolate("{topic!r}", ns) == "'cats'"


def test_code_and_json_helpers():
    assert extract_code("Here:\n```py\nx = 1\n```\nDone") == ("py", "x = 1")
    assert extract_code("```\nprint(2)\n") == ("python", "print(2)")  # unclosed while streaming
    assert extract_code("plain = 3") == ("python", "plain = 3")
    assert parse_json('```json\n{"a": 1}\n```') == {"a": 1}
    with pytest.raises(ValueError):
        parse_json('{"a": ')
    r = Reply("code", "```python\nx = '```'\n```")
    assert r._repr_mimebundle_()["text/markdown"].startswith("````python\n")  # fence longer than the body's


def test_cell_streams_markdown_with_interpolation_and_provenance(shell, xllm_server):
    shell.user_ns["topic"] = "dogs"
    with capture_output() as cap:
        result = shell.run_cell_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 24", "Write about {topic} and {nobody}\n")
    assert result is None  # nothing noisy echoed as Out[]
    # the server saw "{topic}" filled and "{nobody}" kept as-is
    assert final_markdown(cap) == neutral_markdown(sampled(xllm_server, "Write about dogs and {nobody}", 24))
    updates = [o for o in cap.outputs if o.update]
    assert cap.outputs[0].update is False and updates, "expected one display, then in-place updates"
    assert cap.stderr == ""
    meta = final(cap).metadata["xllm"]
    digest = xllm_server.engine.catalog.show(TINY).digest
    assert meta["model"] == TINY and meta["digest"] == digest and digest
    assert meta["parameters"] == {"temperature": 1.0, "max_tokens": 24}
    assert isinstance(meta["seed"], int) and meta["finish_reason"] in ("stop", "length")
    assert meta["usage"]["completion_tokens"] > 0
    import xllm_jupyter

    assert meta["server_version"] == xllm_jupyter.__version__ and meta["server"]["source"] == "extension"


def test_default_model_system_prompt_and_out_variable(shell, xllm_server):
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-s 'You are terse.' {SAMPLED} --max-tokens 6 -o answer", "Hello")
    want = sampled(xllm_server, "Hello", 6, system="You are terse.")
    assert final_markdown(cap) == neutral_markdown(want)
    assert shell.user_ns["answer"] == want


def test_seed_reproduces_a_sampled_answer(shell, xllm_server):
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} -t 1.0 --seed 7 --max-tokens 12 --out answer", "Once upon a time")
    assert final(cap).metadata["xllm"]["seed"] == 7
    assert shell.user_ns["answer"] == expected(xllm_server, "Once upon a time", 12, temperature=1.0, seed=7)


def test_the_seed_picked_for_a_cell_leaves_the_notebooks_random_numbers_alone(shell):
    """A cell without --seed drew its seed from Python's global `random`, the one a notebook seeds (`random.seed(42)`)
    for its own draws: asking the model in between shifted every later number (a split, a sample) of the notebook."""
    import random

    random.seed(42)
    want = [random.random() for _ in range(3)]
    random.seed(42)
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} --max-tokens 1", "Hi")
    assert cap.stderr == "" and isinstance(final(cap).metadata["xllm"]["seed"], int)
    assert [random.random() for _ in range(3)] == want


def test_line_magic(shell, xllm_server):
    with capture_output() as cap:
        shell.run_line_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 5 Say hi")
    assert final_markdown(cap) == neutral_markdown(sampled(xllm_server, "Say hi", 5))


def test_no_stream_and_text_format(shell, xllm_server):
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 8 --no-stream -f text", "Say hi")
    assert len(cap.outputs) == 1 and not cap.outputs[0].update  # one display, no streaming updates
    out = cap.outputs[0]
    assert out.data["text/plain"] == sampled(xllm_server, "Say hi", 8) and "text/markdown" not in out.data
    assert out.metadata["xllm"]["finish_reason"] in ("stop", "length")


def test_code_format_renders_a_code_block_and_out_holds_the_code(shell, xllm_server):
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 10 -f code --out code", "Write a loop")
    text = sampled(xllm_server, "Write a loop", 10)
    lang, code = extract_code(text)
    assert final_markdown(cap).startswith("```") and code in final_markdown(cap)
    assert final(cap).data["text/plain"] == code
    assert shell.user_ns["code"] == code and lang == "python"


def _seeds(server, want_stop: bool, max_tokens: int) -> int:
    """A seed whose json_object answer finishes (or is cut off) within ``max_tokens``."""
    with XllmClient(server.base_url, server.api_key) as c:
        for seed in range(40):
            body = c.chat_completion("Give me a JSON object", TINY, max_tokens=max_tokens, temperature=1.0, seed=seed,
                                     response_format={"type": "json_object"})
            if (body["choices"][0]["finish_reason"] == "stop") == want_stop:
                return seed
    pytest.fail("no seed gives the wanted finish")


def test_json_format_is_constrained_parsed_and_stored(shell, xllm_server):
    seed = _seeds(xllm_server, True, 60)
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} -t 1.0 --seed {seed} --max-tokens 60 -f json --out obj", "Give me a JSON object")
    assert cap.stderr == ""
    out = final(cap, "application/json")
    obj = shell.user_ns["obj"]
    assert isinstance(obj, dict) and out.data["application/json"] == obj
    assert json.loads(out.data["text/plain"]) == obj and out.data["text/markdown"].startswith("```json")


def test_json_format_reports_a_cut_off_answer(shell, xllm_server):
    seed = _seeds(xllm_server, False, 6)
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} -t 1.0 --seed {seed} --max-tokens 6 -f json --out obj", "Give me a JSON object")
    assert cap.stderr.startswith("xllm: the model's answer is not valid JSON") and "--max-tokens" in cap.stderr
    assert "obj" not in shell.user_ns
    assert final_markdown(cap).startswith("```json\n{")  # the raw answer stays visible


def test_chat_keeps_the_conversation_and_new_starts_over(shell, xllm_server, received):
    with capture_output():
        shell.run_cell_magic("xllm", f"--new -m {TINY} -t 0 --max-tokens 6 -s 'Be brief.' --out answer", "My name is Ada.")
    first = shell.user_ns["answer"]
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "--chat -t 0 --max-tokens 6 --out answer", "What is my name?")
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is my name?"}]
    # the second cell sent the whole conversation (same model, same system prompt)
    assert received[-1] == [("system", "Be brief."), *((m["role"], m["content"]) for m in history)]
    assert shell.user_ns["answer"] == expected(xllm_server, history, 6, system="Be brief.")
    assert final(cap).metadata["xllm"]["chat_turn"] == 2
    state = shell.xllm_magics.state
    assert state.chat.turns == 2 and state.chat.messages[-1]["content"] == shell.user_ns["answer"]
    # a one-off question in between leaves the conversation alone
    with capture_output():
        shell.run_cell_magic("xllm", f"-m {TINY} -t 0 --max-tokens 3", "Unrelated")
    assert state.chat.turns == 2
    with capture_output():
        shell.run_cell_magic("xllm", f"--new -m {TINY} -t 0 --max-tokens 4 --out answer", "Hi again")
    assert state.chat.turns == 1 and state.chat.system is None
    assert received[-1] == [("user", "Hi again")]  # nothing of the old conversation
    assert shell.user_ns["answer"] == expected(xllm_server, "Hi again", 4)


def test_terminal_ipython_prints_text(shell, xllm_server, capsys):
    # a plain InteractiveShell has no updatable displays: the answer is printed as it streams
    shell.run_cell_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 5", "Say hi")
    assert capsys.readouterr().out == sampled(xllm_server, "Say hi", 5) + "\n"
    # an answer of blank lines says so below them, as in a notebook
    shell.run_cell_magic("xllm", f"-m {TINY} -t 0 --max-tokens 5", "connect the dots")
    assert capsys.readouterr().out == expected(xllm_server, "connect the dots", 5) + "\n(the model returned only whitespace)\n"
    # an error before any text: only the error, no blank line on stdout above it
    shell.run_cell_magic("xllm", "-m no-such-model", "hi")
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("xllm: The model 'no-such-model' does not exist — chat models: ")
    assert out.err.count("\n") == 1


def test_a_line_question_may_end_in_a_question_mark(shell, xllm_server, capsys):
    shell.run_cell(f"%xllm -m {TINY} {SAMPLED} --max-tokens 2 What's the capital of France?")
    out = capsys.readouterr()
    assert out.out == sampled(xllm_server, "What's the capital of France?", 2) + "\n", out
    shell.run_cell(f"%xllm -m {TINY} --max-tokens 2 What's the capital of France?")  # sampled: only that it was asked
    out = capsys.readouterr()
    assert out.out.strip() and "not found" not in out.out and out.err == ""
    # inside a block, with {var} filled as for any line magic
    shell.user_ns["topic"] = "owls"
    shell.run_cell(f"if True:\n    %xllm -m {TINY} {SAMPLED} --max-tokens 2 Do you like {{topic}}?\n")
    assert capsys.readouterr().out == sampled(xllm_server, "Do you like owls?", 2) + "\n"
    # `%xllm?` alone is still IPython's help, and a %%xllm body is never rewritten
    shell.run_cell("%xllm?")
    assert "Ask the model" in capsys.readouterr().out
    body = "%xllm is this a prompt?\n"
    assert shell.transform_cell("%%xllm -m x\n" + body) == f"get_ipython().run_cell_magic('xllm', '-m x', {body!r})\n"


def test_a_question_line_inside_a_string_stays_text(shell):
    """A cell's triple-quoted text with a line `%xllm ...?` in it (a notebook cell written from code, a docstring
    showing the magic) had that line rewritten into `get_ipython().run_line_magic(...)`: the string changed, as
    IPython's own transforms leave `%time x?` in a string alone. Lines outside strings are still questions."""
    for quote in ('"""', "'''", 'f"""', 'rb"""'):
        text = "\n%xllm What is a monad?\n  %xllm Why?\n"
        cell = f"s = {quote}{text}{quote}\n%xllm -m x Is this asked?\n"
        assert shell.transform_cell(cell) == (f"s = {quote}{text}{quote}\n"
                                              "get_ipython().run_line_magic('xllm', '-m x Is this asked?')\n"), quote
    shell.run_cell('s = """\n%xllm What is a monad?\n"""')
    assert shell.user_ns.pop("s") == "\n%xllm What is a monad?\n"


def test_an_answer_of_blank_lines_says_so(shell, xllm_server):
    """The tiny model answers "connect the dots" with newlines only: the Markdown showed nothing at all."""
    answer = expected(xllm_server, "connect the dots", 5)
    assert answer and not answer.strip(), repr(answer)  # what this test is about
    with capture_output() as cap:
        shell.run_line_magic("xllm", f"-m {TINY} -t 0 --max-tokens 5 connect the dots")
    assert final_markdown(cap).strip() == "*(the model returned only whitespace)*"
    assert final(cap).metadata["xllm"]["finish_reason"] == "length"


def test_out_needs_a_variable_name(shell):
    for name in ("a.b", "class", "2x"):
        with capture_output() as cap:
            shell.run_cell_magic("xllm", f"-m {TINY} --max-tokens 2 -o {name}", "hi")
        assert cap.stderr == f"xllm: --out needs a variable name, not {name!r}\n" and not cap.outputs
        assert name not in shell.user_ns


def test_errors_are_short_messages(shell):
    with capture_output() as cap:
        result = shell.run_cell_magic("xllm", "-m no-such-model", "hi")
    assert result is None
    assert cap.stderr.startswith("xllm: The model 'no-such-model' does not exist — chat models: ")
    assert cap.stderr.count("\n") == 1
    assert "Traceback" not in cap.stdout + cap.stderr
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} -t 9", "hi")
    assert cap.stderr.startswith("xllm: ") and "temperature" in cap.stderr
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY}", "   \n")
    assert "nothing to ask" in cap.stderr
    for line, words in ((f"-m {TINY} --chat --new", "not both"), ("-f yaml", "invalid choice"), ("--max-tokens lots", "invalid int")):
        with capture_output() as cap:
            shell.run_cell_magic("xllm", line, "hi")
        assert cap.stderr.startswith("xllm: ") and words in cap.stderr and "Traceback" not in cap.stderr, cap.stderr


def test_no_server_is_a_short_message(shell, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("XLLM_BASE_URL", f"http://127.0.0.1:{port}/v1")
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY}", "hi")
    assert cap.stderr.startswith("xllm: no xllm server at")


def _wait_cancelled(engine, before: int) -> None:
    deadline = time.monotonic() + 10
    while engine.stats(TINY).cancelled <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats(TINY).cancelled > before, "the server did not cancel the generation"


def test_interrupt_closes_the_stream_and_the_server_cancels(shell, xllm_server, monkeypatch):
    """Ctrl-C in the middle of a stream: "(interrupted)" shows and the server cancels the job."""
    import signal

    real = XllmClient.stream_chunks

    def interrupted_after_three(self, *args, **kw):
        stream = real(self, *args, **kw)
        try:
            for i, chunk in enumerate(stream):
                if i == 4:
                    signal.raise_signal(signal.SIGINT)  # a real SIGINT, as a kernel interrupt sends
                yield chunk
        finally:
            stream.close()

    monkeypatch.setattr(XllmClient, "stream_chunks", interrupted_after_three)
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    with capture_output() as cap:
        # seeded: with a random seed an end token could come before the interrupt (no end in seed 7's 1,500 tokens)
        shell.run_cell_magic("xllm", f"-m {TINY} --max-tokens 1500 --seed 7 --out answer", "Tell me a long story")
    assert final_markdown(cap).endswith("*(interrupted)*")
    assert final(cap).metadata["xllm"]["finish_reason"] == "interrupted"
    # a few chunks, each up to a stream interval of tokens: far from the 1,500 tokens asked for
    assert 0 < len(shell.user_ns["answer"]) < 1000
    _wait_cancelled(engine, before)


class _Pressed(dict):
    """A chunk whose reading is interrupted: the first Ctrl-C lands in the magic, the stream paused at a yield."""

    def get(self, key, default=None):
        if key == "choices":
            signal.raise_signal(signal.SIGINT)
        return super().get(key, default)


def _pressed_twice(real: Any, sent: list[str], close_stream: bool) -> Callable[..., Any]:
    """A ``stream_chunks`` over ``real`` that presses Ctrl-C as its fifth chunk is read and again as the magic closes
    it, before the real stream's own close (which then runs only with ``close_stream``); the text passed on goes into
    ``sent``."""

    def stream_chunks(self, *args, **kw):
        stream = real(self, *args, **kw)
        try:
            for i, chunk in enumerate(stream):
                if i == 4:
                    yield _Pressed(chunk)
                sent.append(((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content") or "")
                yield chunk
        finally:  # the magic closes this stream after the first press
            signal.raise_signal(signal.SIGINT)  # the second press, before this stream's own close could run
            if close_stream:
                stream.close()

    return stream_chunks


def _assert_the_next_cell_works(shell) -> None:
    """A short question after an interrupted one gets its whole answer, without an error."""
    with capture_output() as cap:
        shell.run_line_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 4 Say something")
    assert cap.stderr == "" and final(cap).metadata["xllm"]["finish_reason"] in ("length", "stop")


def test_a_second_interrupt_while_the_stream_closes_keeps_the_answer(shell, xllm_server, monkeypatch):
    """Ctrl-C pressed twice: the second SIGINT came while the stream was being closed after the first, and the cell
    ended in "xllm: interrupted" with the answer so far lost (no "(interrupted)", no provenance, --out unset).
    The answer stays, the server cancels the job, and the next question gets a fresh connection."""

    real = XllmClient.stream_chunks
    sent: list[str] = []
    monkeypatch.setattr(XllmClient, "stream_chunks", _pressed_twice(real, sent, close_stream=True))
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 1500 --out answer", "Tell me a long story")
    assert cap.stderr == "" and "Traceback" not in cap.stdout
    assert final_markdown(cap).endswith("*(interrupted)*")
    assert final(cap).metadata["xllm"]["finish_reason"] == "interrupted"
    assert shell.user_ns["answer"] == "".join(sent) and 0 < len(shell.user_ns["answer"]) < 1000
    _wait_cancelled(engine, before)
    monkeypatch.setattr(XllmClient, "stream_chunks", real)
    _assert_the_next_cell_works(shell)


def test_an_interrupted_json_or_code_answer_stores_what_its_format_promises(shell, xllm_server, monkeypatch):
    """An interrupted ``-f json --out V`` stored the partial text in V (a str where the notebook expects the parsed
    value, as the docs promise) and ``-f code`` the whole text rather than its code."""
    import signal

    real = XllmClient.stream_chunks
    sent: list[str] = []

    def interrupted_after_the_first_text(self, *args, **kw):
        stream = real(self, *args, **kw)
        try:
            for chunk in stream:
                if sent:  # the chunk after the first text, whatever it is (the last one, for a short answer)
                    signal.raise_signal(signal.SIGINT)
                text = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content") or ""
                if text:
                    sent.append(text)
                yield chunk
        finally:
            stream.close()

    monkeypatch.setattr(XllmClient, "stream_chunks", interrupted_after_the_first_text)
    for fmt in ("json", "code"):
        sent.clear()
        shell.user_ns.pop("answer", None)
        with capture_output() as cap:
            shell.run_line_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 400 -f {fmt} --out answer Give data")
        assert cap.stderr == "" and final(cap).metadata["xllm"]["finish_reason"] == "interrupted"
        text = "".join(sent)
        assert text, "nothing arrived before the interrupt"
        if fmt == "code":
            assert shell.user_ns["answer"] == extract_code(text)[1]
            continue
        try:
            want = parse_json(text)
        except ValueError:
            assert "answer" not in shell.user_ns, "a partial JSON answer was stored"
        else:
            assert shell.user_ns["answer"] == want and not isinstance(want, str)


def test_an_interrupt_after_the_answer_keeps_it(shell, xllm_server, monkeypatch):
    """Ctrl-C while the magic fetched the model's digest (after the answer had come): the cell ended in "xllm:
    interrupted", its display never finished (no provenance) and --out was not set."""
    def interrupted(model):
        raise KeyboardInterrupt

    monkeypatch.setattr(shell.xllm_magics.state, "about", interrupted)
    with capture_output() as cap:
        shell.run_line_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 8 --out answer Say something")
    assert cap.stderr == ""
    text = sampled(xllm_server, "Say something", 8)
    assert final_markdown(cap) == neutral_markdown(text) and shell.user_ns["answer"] == text
    meta = final(cap).metadata["xllm"]
    assert meta["model"] == TINY and meta["digest"] is None and meta["server_version"] is None


def test_magics_class_registers(shell):
    assert "xllm" in shell.magics_manager.magics["cell"]
    assert "xllm" in shell.magics_manager.magics["line"]
    assert any(isinstance(m, XllmMagics) for m in shell.magics_manager.registry.values())


# ------------------------------------------------------------------ a real kernel
@pytest.fixture(scope="module")
def kernel(xllm_server):
    """A real ipykernel with the extension's variables in its environment, `%load_ext` done."""
    from jupyter_client.manager import KernelManager

    env = {**os.environ, "XLLM_BASE_URL": xllm_server.base_url, "XLLM_API_KEY": xllm_server.api_key, "OMP_NUM_THREADS": "1"}
    env.pop("XLLM_MODEL", None)
    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        assert run_in(kc, "%load_ext xllm_jupyter")[1]["status"] == "ok"
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run_in(kc, code: str, on_output=None, timeout: float = 120, allow_stdin: bool = True) -> tuple[list[dict], dict]:
    """Execute ``code``; (iopub messages of that cell, execute_reply content)."""
    msg_id = kc.execute(code, allow_stdin=allow_stdin)
    msgs: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no idle from the kernel within {timeout} s")
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if on_output is not None:
            on_output(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return msgs, kc.get_shell_msg(timeout=30)["content"]


def test_in_a_real_kernel(kernel, xllm_server):
    """A real ipykernel: the answer arrives as Markdown display data, updated in place, with provenance."""
    _, kc = kernel
    msgs, reply = run_in(kc, f"topic = 'owls'\n%xllm -m {TINY} {SAMPLED} --max-tokens 16 A poem about {{topic}}")
    assert reply["status"] == "ok"
    outputs = [m for m in msgs if m["msg_type"] in ("display_data", "update_display_data", "stream", "error")]
    assert outputs and outputs[0]["msg_type"] == "display_data", outputs
    assert all(m["msg_type"] in ("display_data", "update_display_data") for m in outputs), outputs
    last = outputs[-1]["content"]
    assert last["data"]["text/markdown"] == neutral_markdown(sampled(xllm_server, "A poem about owls", 16))
    assert last["metadata"]["xllm"]["model"] == TINY


def test_interrupting_the_kernel_cancels_on_the_server(kernel, xllm_server):
    """Interrupt the kernel mid-stream (SIGINT): the cell ends with "(interrupted)", the server cancels."""
    km, kc = kernel
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    sent = []

    def interrupt_once_streaming(msg):
        if msg["msg_type"] in ("display_data", "update_display_data") and not sent:
            sent.append(True)
            km.interrupt_kernel()

    # seeded (7: no end token in 2,000): with the magic's random seed an end token could come before the interrupt
    msgs, reply = run_in(kc, f"%%xllm -m {TINY} --max-tokens 2000 --seed 7 --out answer\nTell me a very long story",
                         interrupt_once_streaming)
    assert sent, "the cell displayed nothing before it ended"
    assert reply["status"] == "ok"  # the magic handled the interrupt: no KeyboardInterrupt traceback
    last = [m for m in msgs if m["msg_type"] in ("display_data", "update_display_data")][-1]["content"]
    assert last["data"]["text/markdown"].endswith("*(interrupted)*")
    assert not [m for m in msgs if m["msg_type"] == "error"]
    _wait_cancelled(engine, before)
    # the kernel still works afterwards, and --out kept the partial answer
    _, reply = run_in(kc, "assert isinstance(answer, str) and answer")
    assert reply["status"] == "ok"


def test_a_failed_pull_in_a_real_kernel_takes_its_bar_away(kernel, tmp_path):
    _, kc = kernel
    msgs, reply = run_in(kc, f"%xllm pull {tmp_path / 'nothing-here'}")
    assert reply["status"] == "ok"
    assert "xllm: " in "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    boxes = [m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_open" and m["content"]["data"]["state"].get("_model_name") == "HBoxModel"]
    closed = {m["content"]["comm_id"] for m in msgs if m["msg_type"] == "comm_close"}
    assert len(boxes) == 1 and boxes[0] in closed  # the bar's view is gone, not left at "starting…"


def test_pull_in_a_real_kernel_shows_a_widget_bar(kernel, tiny_llama_dir):
    """In a kernel with ipywidgets the pull's progress is a widget (pulling what the store has: no change)."""
    _, kc = kernel
    msgs, reply = run_in(kc, f"%xllm pull {tiny_llama_dir} --name {TINY}\nimport sys; print(sys.modules['ipywidgets'].__name__)")
    assert reply["status"] == "ok"
    shown = [m["content"]["data"] for m in msgs if m["msg_type"] == "display_data"]
    assert any("application/vnd.jupyter.widget-view+json" in d for d in shown), shown
    streams = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    assert "ipywidgets" in streams and "xllm:" not in streams
    # the label's last state (sent over the widget comm) is the summary line
    states = [json.dumps(m["content"]) for m in msgs if m["msg_type"] in ("comm_msg", "comm_open")]
    assert any(f"Pulled {TINY} (safetensors" in s for s in states), states[-3:]


def test_connect_asking_for_the_token_where_the_frontend_cannot(kernel, xllm_server):
    """nbconvert and voila run cells without stdin: ``%xllm connect URL --token`` said "unexpected error
    (StdinNotImplementedError): getpass was called..."; it says what to do instead, and the old server stays."""
    _, kc = kernel
    msgs, reply = run_in(kc, f"%xllm connect {xllm_server.base_url} --token", allow_stdin=False)
    assert reply["status"] == "ok"
    text = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream")
    assert text == ("xllm: this frontend cannot ask for the token: call xllm_jupyter.connect(URL, token) with the "
                    "token from a variable, or set XLLM_BASE_URL to the URL and XLLM_API_KEY to the token\n"), text


@pytest.fixture
def received(xllm_server, monkeypatch) -> list[list[tuple[str, str]]]:
    """The (role, content) messages of each chat request the session server's engine encodes, as it got them."""
    engine = xllm_server.engine
    seen: list[list[tuple[str, str]]] = []
    real = engine.encode_chat

    async def encode_chat(name, messages, *args, **kwargs):
        seen.append([(m.role, m.content) for m in messages])
        return await real(name, messages, *args, **kwargs)

    monkeypatch.setattr(engine, "encode_chat", encode_chat)
    return seen


def test_option_values_and_prompts_reach_the_server_as_written(shell, received):
    """A quoted option value was sent with its quotes (``-s "You are a pirate."``, as notebooks/02-magics.ipynb
    writes it), and IPython's own expansion of the line ate a prompt's ``$``: "$20" became "20", "$x" a variable,
    ``-s {persona}`` split into words. Only ``{name}`` is filled now, in the line as in a cell's body."""
    shell.user_ns.update(x=41, persona="You are terse.")
    run_args = f"-m '{TINY}' -s \"You are a pirate.\" -t 0 --max-tokens 2 What is $20 plus {{x}}, and $x^2$ in {{y}}?"
    with capture_output() as cap:
        shell.run_line_magic("xllm", run_args)
    assert cap.stderr == "" and received[-1] == [("system", "You are a pirate."), ("user", "What is $20 plus 41, and $x^2$ in {y}?")]
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "-s {persona} -t 0 --max-tokens 2", "Is $5 for {x} pens a good price?")
    assert cap.stderr == "" and received[-1] == [("system", "You are terse."), ("user", "Is $5 for 41 pens a good price?")]
    with capture_output() as cap:  # in a notebook, as a kernel runs the line
        shell.run_cell("%xllm -t 0 --max-tokens 2 -s 'Be brief.' Why does $HOME end in {x}?")
    assert received[-1] == [("system", "Be brief."), ("user", "Why does $HOME end in 41?")]
    # inside a function {name} is its local, as IPython's own expansion had it
    shell.run_cell("def about(thing):\n    %xllm -t 0 --max-tokens 2 Tell me about {thing} for $3\nabout('owls')")
    assert received[-1] == [("user", "Tell me about owls for $3")]
    # a number from a variable (IPython's expansion gave these; the magic's own must too)
    shell.user_ns.update(n=3, temp=0)
    with capture_output() as cap:
        shell.run_line_magic("xllm", "--max-tokens {n} -t {temp} --seed {n} Count to {n}")
    assert cap.stderr == "" and received[-1] == [("user", "Count to 3")]
    assert final(cap).metadata["xllm"]["parameters"] == {"temperature": 0.0, "max_tokens": 3}
    assert final(cap).metadata["xllm"]["seed"] == 3
    shell.user_ns["chosen"] = TINY  # a command's {name} is filled too
    with capture_output() as cap:
        shell.run_line_magic("xllm", "use {chosen}")
    assert cap.outputs[-1].data["text/plain"] == f"Using {TINY} for %%xllm in this notebook"


class _Record:
    """A notebook object whose property counts its reads, and one whose property raises."""

    def __init__(self) -> None:
        self.reads = 0

    @property
    def title(self) -> str:
        self.reads += 1
        return f"read {self.reads}"

    @property
    def broken(self) -> str:
        raise RuntimeError("the property failed")


def test_a_body_of_indented_code_keeps_its_lines_relative_indentation(shell, received):
    """A body that starts with indented code (a method pasted from a class) lost the first line's indentation alone:
    `x = 1` then `    if x:` reached the model, code that no longer reads as written. The indentation every line
    shares goes, as do blank lines at either end; each line keeps its indentation relative to the others."""
    code = "    x = 1\n    if x:\n        y = 2"
    body = f"\n   \n{code}\nWhat does this do?\n\n"
    for line, cell, sent in (("", body, f"{code}\nWhat does this do?"), ("Explain:", f"{code}\n", f"Explain:\n{code}"),
                             ("", f"\n{code}\n", "x = 1\nif x:\n    y = 2"), ("", "  Hi there  \n", "Hi there")):
        with capture_output() as cap:
            shell.run_cell_magic("xllm", f"-m {TINY} --max-tokens 1 {line}", cell)
        assert cap.stderr == "" and received[-1] == [("user", sent)], received[-1]


def test_a_lines_names_are_filled_once_per_word_and_never_raise(shell, received):
    """The line was filled whole before its shape was judged, then word by word for the question: a property ran
    twice per prompt, one that raised came out of the magic as a traceback, and `config system={persona}` was split
    into words, missed `config`'s shape and went to the model as a prompt."""
    shell.user_ns.update(obj=_Record(), persona="You are a terse pirate.")
    with capture_output() as cap:
        shell.run_line_magic("xllm", "-t 0 --max-tokens 2 Tell me about {obj.title}")
    assert cap.stderr == "" and received[-1] == [("user", "Tell me about read 1")]
    assert shell.user_ns["obj"].reads == 1
    with capture_output() as cap:  # left as written, as a body that is not a template is
        shell.run_line_magic("xllm", "-t 0 --max-tokens 2 What is {obj.broken} worth?")
    assert cap.stderr == "" and received[-1] == [("user", "What is {obj.broken} worth?")]
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "-t 0 --max-tokens 2", "And {obj.broken}?")
    assert cap.stderr == "" and received[-1] == [("user", "And {obj.broken}?")]
    asked = len(received)
    with capture_output() as cap:
        shell.run_line_magic("xllm", "config system={persona} max_tokens=2")
    assert cap.stderr == "" and len(received) == asked  # a command, nothing asked
    assert shell.xllm_magics.state.defaults.system == "You are a terse pirate."


def test_quoted_option_values_of_every_option_lose_their_quotes(shell, received):
    """Only -m, -s and -o lost the quotes IPython keeps: `-f "json"` was an invalid choice, `-t '0.5'` and
    `--max-tokens '3'` not numbers."""
    with capture_output() as cap:
        shell.run_line_magic("xllm", "-f 'text' -t '0' --max-tokens \"3\" --seed '5' Say hi")
    assert cap.stderr == "" and received[-1] == [("user", "Say hi")]
    meta = cap.outputs[-1].metadata["xllm"]
    assert meta["format"] == "text" and meta["parameters"] == {"temperature": 0.0, "max_tokens": 3} and meta["seed"] == 5
    with capture_output() as cap:
        shell.run_line_magic("xllm", "--max-tokens 'three' Say hi")
    assert cap.stderr == "xllm: argument --max-tokens: invalid int value: 'three'\n"


def test_a_third_interrupt_while_the_connections_drop_keeps_the_answer_and_the_next_cell_works(shell, xllm_server,
                                                                                                 monkeypatch):
    """Ctrl-C pressed three times: the third landed in the close of the client's connections (after the second
    cut the stream's close short). The answer was lost to "xllm: interrupted", and the kernel kept the client its
    close had marked closed: every later cell said "unexpected error (RuntimeError): Cannot send a request, as the
    client has been closed"."""
    import signal

    import httpx

    real_stream, real_close = XllmClient.stream_chunks, httpx.HTTPTransport.close
    sent: list[str] = []

    def close_pressed(transport):
        monkeypatch.setattr(httpx.HTTPTransport, "close", real_close)
        signal.raise_signal(signal.SIGINT)  # the third, as the connections drop
        real_close(transport)

    monkeypatch.setattr(XllmClient, "stream_chunks", _pressed_twice(real_stream, sent, close_stream=False))
    monkeypatch.setattr(httpx.HTTPTransport, "close", close_pressed)
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY} {SAMPLED} --max-tokens 1500 --out answer", "Tell me a long story")
    assert cap.stderr == "" and final_markdown(cap).endswith("*(interrupted)*"), cap.stderr
    assert shell.user_ns["answer"] == "".join(sent) and 0 < len(shell.user_ns["answer"]) < 1000
    monkeypatch.setattr(XllmClient, "stream_chunks", real_stream)
    _assert_the_next_cell_works(shell)


def test_a_chat_turn_interrupted_before_any_text_is_not_sent_again(shell, xllm_server, received, monkeypatch):
    """Ctrl-C before the first word of a ``--chat`` answer (queued, its model loading, in its prefill) kept the question
    and an empty assistant message in the conversation, sent with every later turn; `xllm run`, ChatWidget and the
    JupyterLab panel drop such a turn. A turn interrupted after some text keeps it (as they do)."""
    real_stream, real_whole = XllmClient.stream_chunks, XllmClient.chat_completion

    def interrupted_at_once(self, *args, **kw):
        stream = real_stream(self, *args, **kw)
        try:
            next(stream)  # the request is sent and its first chunk (the role, no text) came
            signal.raise_signal(signal.SIGINT)
            yield from stream
        finally:
            stream.close()

    def interrupted_whole(self, *args, **kw):
        signal.raise_signal(signal.SIGINT)
        return real_whole(self, *args, **kw)

    with capture_output():
        shell.run_cell_magic("xllm", f"--new -m {TINY} {SAMPLED} --max-tokens 4 --out answer", "My name is Ada.")
    first = shell.user_ns["answer"]
    assert first, "the seeded first answer is empty: pick another seed"
    monkeypatch.setattr(XllmClient, "stream_chunks", interrupted_at_once)
    monkeypatch.setattr(XllmClient, "chat_completion", interrupted_whole)
    for options in ("", "--no-stream"):
        with capture_output() as cap:
            shell.run_cell_magic("xllm", f"--chat {SAMPLED} --max-tokens 4 {options}", "Tell me a long story")
        assert cap.stderr == "" and final_markdown(cap).endswith("*(interrupted)*"), cap.stderr
    monkeypatch.setattr(XllmClient, "stream_chunks", real_stream)
    monkeypatch.setattr(XllmClient, "chat_completion", real_whole)
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"--chat {SAMPLED} --max-tokens 4", "What is my name?")
    assert cap.stderr == ""
    assert received[-1] == [("user", "My name is Ada."), ("assistant", first), ("user", "What is my name?")]
    assert shell.xllm_magics.state.chat.turns == 2 and final(cap).metadata["xllm"]["chat_turn"] == 2
