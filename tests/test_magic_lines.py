"""How a ``%xllm`` line reaches the model: its split (quotes, apostrophes), its braces, as a notebook user types it.

A real IPython InteractiveShell against the session's live server; the engine records what it was asked.
"""

from __future__ import annotations

from IPython.utils.capture import capture_output

from tests import test_magic
from xllm_jupyter.magics.line import words

shell = test_magic.shell  # fixture: IPython with the extension, pointed at the live server
received = test_magic.received  # fixture: what the engine was asked

ASK = "-t 0 --max-tokens 2"  # greedy and short: only what reaches the engine matters here


def cell(ip, code: str):
    """Run ``code`` as a notebook cell (IPython's own transforms included), its output captured."""
    with capture_output() as cap:
        ip.run_cell(code)
    return cap


def test_the_split_keeps_quotes_only_where_they_close():
    assert [(str(w), w.raw) for w in words("-s \"say \\\"hi\\\"\" 'tis  Bob's")] == [
        ("-s", "-s"), ('say "hi"', '"say \\"hi\\""'), ("'tis", "'tis"), ("Bob's", "Bob's")]
    assert [str(w) for w in words("--system='a b' \"C:\\temp\" 'x'y")] == ["--system=a b", "C:\\temp", "'x'y"]


def test_an_apostrophe_and_escaped_quotes_reach_the_model_as_typed(shell, received):
    """IPython's splitter took ``'tis a fine day`` for an unclosed quote ("xllm: No closing quotation", nothing
    asked) and cut ``-s "say \\"hi\\""`` into a system prompt ``say \\`` and a prompt ``hi\\"" ...``."""
    cap = cell(shell, f"%xllm {ASK} 'tis a fine day, isn't it?")
    assert cap.stderr == "" and received[-1] == [("user", "'tis a fine day, isn't it?")]
    cap = cell(shell, f'%xllm {ASK} -s "Say \\"hi\\" first." Greet  me, "friend"')
    assert cap.stderr == "" and received[-1] == [("system", 'Say "hi" first.'), ("user", 'Greet  me, "friend"')]
    with capture_output() as cap:  # the first line of a cell too
        shell.run_cell_magic("xllm", f"{ASK} -s 'Bob\\'s bot' --system-free 'tis", "the body")
    assert "unrecognized arguments" in cap.stderr  # an unknown option is still refused, in one line
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"{ASK} -s 'Bob\\'s bot' 'tis", "the body")
    assert cap.stderr == "" and received[-1] == [("system", "Bob's bot"), ("user", "'tis\nthe body")]
    cap = cell(shell, f"%xllm {ASK} -s -x")  # a value that starts with `-` is still the value
    assert cap.stderr == "xllm: nothing to ask — write the prompt in the cell body\n"
    cap = cell(shell, f"%xllm {ASK} hello -s")
    assert cap.stderr == "xllm: argument -s/--system: expected one argument\n"


def test_double_braces_are_one_brace_on_the_line_as_in_the_body(shell, received):
    """A line was filled word by word and a word without ``{`` was left alone: ``{{"a": 1}}`` reached the model as
    ``{"a": 1}}`` from a line but ``{"a": 1}`` from a cell's body, and ``}}`` alone stayed two braces."""
    shell.user_ns["topic"] = "owls"
    text = 'Return {{"a": 1}} about {topic}, then close with }}'
    want = [("user", 'Return {"a": 1} about owls, then close with }')]
    cap = cell(shell, f"%xllm {ASK} {text}")
    assert cap.stderr == "" and received[-1] == want
    with capture_output() as cap:
        shell.run_cell_magic("xllm", ASK, text)
    assert cap.stderr == "" and received[-1] == want
    for typed in ("Close it with }}", "Open {{ and close }}"):  # the same from a line and from a body
        cell(shell, f"%xllm {ASK} {typed}")
        from_line = received[-1]
        with capture_output():
            shell.run_cell_magic("xllm", ASK, typed)
        assert received[-1] == from_line == [("user", typed.replace("{{", "{").replace("}}", "}"))]
    # a text that is not a template (a lone brace) goes as written, its `{{` too, from a line as from a body
    cell(shell, f"%xllm {ASK} " + "Is {{x}} a set or } a typo?")
    assert received[-1] == [("user", "Is {{x}} a set or } a typo?")]
    with capture_output():
        shell.run_cell_magic("xllm", ASK, "Is {{x}} a set or } a typo?")
    assert received[-1] == [("user", "Is {{x}} a set or } a typo?")]
    # an option's value is filled on its own: `-s {{json}}` is one brace pair
    cell(shell, f"%xllm {ASK} " + "-s 'Answer in {{json}}.' Hi")
    assert received[-1] == [("system", "Answer in {json}."), ("user", "Hi")]


def test_odd_lines_a_notebook_user_types(shell, received, monkeypatch, xllm_server):
    """A prompt opening with a quote that never closes is a prompt (the split's first version took
    ``'tis a fine day`` alone for a command line); ``-m ''`` took the prompt's first word for the model; ``-h``
    was "unrecognized arguments"; ``-o __builtins__`` replaced the notebook's builtins with the answer's text; a
    wrong key's line did not say where the kernel's key came from."""
    for typed in ("'tis a fine day", "\"unclosed and 'mixed"):
        cap = cell(shell, f"%xllm {typed}")
        assert cap.stderr == "" and received[-1] == [("user", typed)]
    cap = cell(shell, f"%xllm -m '' -s '' {ASK} hi there")
    assert cap.stderr == "" and received[-1] == [("user", "hi there")]
    for line in ("-h", "--help"):
        cap = cell(shell, f"%xllm {line}")
        assert cap.stderr == "" and cap.outputs[-1].data["text/plain"].startswith("%%xllm [-m MODEL]")
    asked = len(received)
    cap = cell(shell, f"%xllm {ASK} -o __builtins__ hi")
    assert cap.stderr == "xllm: --out needs a variable name, not '__builtins__'\n" and len(received) == asked
    assert cell(shell, "print(len('ok'))").stdout == "2\n"
    monkeypatch.setenv("XLLM_API_KEY", "not-the-key")
    cap = cell(shell, f"%xllm {ASK} hi")
    assert cap.stderr.startswith("xllm: Incorrect or missing API key") and len(received) == asked
    assert cap.stderr.endswith(" (the key came from XLLM_API_KEY; `%xllm connect URL --token` asks for another)\n")
    cap = cell(shell, f"%xllm connect {xllm_server.base_url} --token nope")  # connect's own line says whose token
    assert cap.stderr.startswith("xllm: the xllm server at ") and "came from" not in cap.stderr
