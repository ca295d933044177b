"""How a ``%xllm`` line reaches the model: its split (quotes, apostrophes), its braces, as a notebook user types it.

A real IPython InteractiveShell against the session's live server; the engine records what it was asked.
"""

from __future__ import annotations

from IPython.utils.capture import capture_output

from tests import test_magic
from xllm_jupyter.magics.line import command_words, join, words

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
    # a command's words: a backslash outside quotes is a character (`pull C:\models\x`), and they join back as typed
    typed = 'pull C:\\models\\x "C:\\my dir\\" --name="a \\"b\\"" system=\'x y\' it\'s'
    split = ["pull", "C:\\models\\x", "C:\\my dir\\", '--name=a "b"', "system=x y", "it's"]
    assert command_words(typed) == split and command_words(join(split)) == split


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
    assert cap.stderr == "xllm: nothing to ask — write the prompt after the options: %xllm [options] PROMPT\n"
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
    cap = cell(shell, f"%xllm connect the dots {ASK}")  # a prompt that starts with the verb gets the hint too
    assert cap.stderr.endswith(" (the key came from XLLM_API_KEY; `%xllm connect URL --token` asks for another)\n")
    cap = cell(shell, f"%xllm connect {xllm_server.base_url} --token nope")  # connect's own line says whose token
    assert cap.stderr.startswith("xllm: the xllm server at ") and "came from" not in cap.stderr


def test_short_option_values_windows_folders_and_unclosed_quotes(shell, received):
    """The split's first version sent ``-s"Be brief."`` with its quotes (``-f"json"`` was an invalid choice), left
    ``-s{persona}`` unfilled, kept the quotes of ``-s "C:\\data\\"`` (its ``\\"`` read as an escaped quote) and took
    ``-s "You are terse. Say hi`` for a system prompt ``"You`` and a prompt of the rest; IPython's splitter had said
    that quote did not close, and so does the magic now, asking nothing."""
    shell.user_ns.update(persona="You are terse.", n=0)
    cap = cell(shell, f'%xllm {ASK} -s"Be brief." -f"text" Hi')
    assert cap.stderr == "" and received[-1] == [("system", "Be brief."), ("user", "Hi")]
    assert cap.outputs[-1].metadata["xllm"]["format"] == "text"
    cap = cell(shell, "%xllm -t{n} --max-tokens 2 -s{persona} Hi {persona}")
    assert cap.stderr == "" and received[-1] == [("system", "You are terse."), ("user", "Hi You are terse.")]
    assert cap.outputs[-1].metadata["xllm"]["parameters"]["temperature"] == 0
    cap = cell(shell, f'%xllm {ASK} -s "Files are in C:\\data\\" List C:\\data\\ "as typed"')
    assert cap.stderr == "" and received[-1] == [("system", "Files are in C:\\data\\"), ("user", 'List C:\\data\\ "as typed"')]
    asked = len(received)
    for typed, option in (('-s "You are terse. Say hi', "-s"), ("--system='Be brief. Hi", "--system"), ('-m"tiny hi', "-m")):
        cap = cell(shell, f"%xllm {ASK} {typed}")
        assert cap.stderr.startswith(f"xllm: the quote that opens the value of {option} (") and cap.stderr.endswith(
            "…) never closes\n"), cap.stderr
    assert len(received) == asked


def test_a_prompt_that_starts_with_a_verb_fills_each_name_once(shell, received):
    """``%xllm help me with {task.next}`` read the line as a command first, filling it, then asked it as a prompt,
    filling it again: a property with side effects ran twice (a counter, a queue's pop)."""
    class Tasks:
        calls = 0

        @property
        def next(self):
            Tasks.calls += 1
            return f"task {Tasks.calls}"

    shell.user_ns["tasks"] = Tasks()
    cap = cell(shell, f"%xllm {ASK} help me with {{tasks.next}}, not {{tasks.next}}")
    assert cap.stderr == "" and received[-1] == [("user", "help me with task 1, not task 1")] and Tasks.calls == 1
    with capture_output():
        shell.run_cell_magic("xllm", f"{ASK} -s {{tasks.next}} use {{tasks.next}}", "then {tasks.next}")
    assert received[-1] == [("system", "task 2"), ("user", "use task 2\nthen task 2")] and Tasks.calls == 2


def test_empty_operands_and_max_tokens_below_one_are_refused_on_the_spot(shell, received):
    """``%xllm use ''`` and ``%xllm connect ''`` were sent to the model as prompts ("use ''"), and
    ``--max-tokens 0`` went to the server, where ``%xllm config max_tokens=0`` is refused at once."""
    asked = len(received)
    for line, usage in (("use ''", "%xllm use: MODEL is empty (usage: %xllm use [model])"),
                        ('connect ""', "%xllm connect: URL is empty (usage: %xllm connect [--token [TOKEN]] [url])"),
                        ("load ''", "%xllm load: MODEL is empty (usage: %xllm load model)")):
        cap = cell(shell, f"%xllm {line}")
        assert cap.stderr == f"xllm: {usage}\n" and not cap.outputs
    for value in ("0", "-1", "'0'"):
        cap = cell(shell, f"%xllm -t 0 --max-tokens {value} Hi")
        assert cap.stderr == f"xllm: argument --max-tokens: expected at least 1, got '{value.strip(chr(39))}'\n"
    assert cell(shell, "%xllm config max_tokens=0").stderr == "xllm: bad value for max_tokens: '0'\n"
    assert len(received) == asked
    cap = cell(shell, "%xllm use")  # the bare verb still shows the default
    assert cap.stderr == "" and "No default model set" in cap.outputs[-1].data["text/plain"]


def test_an_open_quote_is_a_commands_error_only_where_the_verb_takes_a_word(shell, received):
    """``%xllm list 'em all`` and ``%xllm help me with 'quotes`` were "cannot parse the command" errors (list takes
    no word, help not three), while ``%xllm config system='You are terse`` went to the model as a prompt."""
    for typed in ("list 'em all", "help me with 'quotes"):
        cap = cell(shell, f"%xllm {typed} {ASK}")  # the verb first: options may follow the prompt
        assert cap.stderr == "" and received[-1] == [("user", typed)]
    asked = len(received)
    for typed, opener in (("config system='You are terse", "system='You"), ("pull 'my dir", "'my"),
                          ("pull x --name='my dir", "--name='my")):
        cap = cell(shell, f"%xllm {typed}")
        assert cap.stderr == f"xllm: cannot parse the command: the quote that opens {opener}… never closes\n", cap.stderr
    assert len(received) == asked and shell.xllm_magics.state.defaults.system is None


def test_a_quoted_word_that_looks_like_an_option_is_the_prompts(shell, received):
    """The split's first version took a quoted ``'-s'`` for the option: ``%xllm what does '-s' mean`` asked "what
    does" with the system prompt "mean" (IPython's splitter kept the quotes, so argparse saw a prompt word)."""
    cap = cell(shell, f"%xllm {ASK} what does '-s' mean, and \"--max-tokens\"?")
    assert cap.stderr == "" and received[-1] == [("user", "what does '-s' mean, and \"--max-tokens\"?")]


def test_typographic_quotes_group_an_option_value(shell, received):
    """``-s “Be brief.” Hi``, as a line pasted from a document has it, was a system prompt ``“Be`` and a prompt
    ``brief.” Hi`` (IPython's splitter did the same); a prompt's own curly quotes stay as typed."""
    cap = cell(shell, f"%xllm {ASK} -s “Be brief.” Say ‘hi’ to “Bob”")
    assert cap.stderr == "" and received[-1] == [("system", "Be brief."), ("user", "Say ‘hi’ to “Bob”")]
    cap = cell(shell, f"%xllm {ASK} --system=‘You are terse.’ it’s fine")
    assert cap.stderr == "" and received[-1] == [("system", "You are terse."), ("user", "it’s fine")]


def test_an_unclosed_typographic_quote_is_refused_as_a_straight_one_is(shell, received):
    """``-s “Be brief. Hi`` went to the model as a system prompt ``“Be`` and ``%xllm pull “my dir`` as a prompt,
    where the same lines with a straight quote were usage errors; a prompt may still open with either."""
    asked = len(received)
    for typed, option in (("-s “Be brief. Hi", "-s"), ("--system=‘Be brief. Hi", "--system"), ("-s“terse hi", "-s")):
        cap = cell(shell, f"%xllm {ASK} {typed}")
        assert cap.stderr.startswith(f"xllm: the quote that opens the value of {option} (") and cap.stderr.endswith(
            "…) never closes\n"), cap.stderr
    for typed, opener in (("pull “my dir", "“my"), ("config system=‘You are terse", "system=‘You"),
                          ("pull x --name=“my dir", "--name=“my")):
        cap = cell(shell, f"%xllm {typed}")
        assert cap.stderr == f"xllm: cannot parse the command: the quote that opens {opener}… never closes\n", cap.stderr
    assert len(received) == asked and shell.xllm_magics.state.defaults.system is None
    for typed in ("“unclosed, and a prompt", "‘tis a fine day"):
        cap = cell(shell, f"%xllm {ASK} {typed}")
        assert cap.stderr == "" and received[-1] == [("user", typed)]


def test_undecodable_text_is_one_clear_line(shell, received):
    """A ``{name}`` holding a lone surrogate (bytes decoded with errors='surrogateescape') failed as "unexpected
    error (UnicodeEncodeError)", in a prompt, an option value, a cell's body and a command's operand alike."""
    shell.user_ns["raw"] = b"caf\xe9".decode("utf-8", "surrogateescape")
    asked = len(received)
    for line in (f"%xllm {ASK} about {{raw}}", f"%xllm {ASK} -s {{raw}} hi", f"%%xllm {ASK}\nabout {{raw}}"):
        cap = cell(shell, line)
        assert cap.stderr.startswith("xllm: messages[") and "is not valid Unicode text: '\\udce9' at position" in cap.stderr, cap.stderr
        assert cap.stderr.count("\n") == 1 and not cap.outputs
    for line in ("%xllm pull {raw}", "%xllm pull ./models/{raw} --name x"):
        cap = cell(shell, line)
        assert cap.stderr == ("xllm: the line has text that is not valid Unicode ('\\udce9', an undecodable byte kept by "
                              "errors='surrogateescape'?): decode it as UTF-8 first\n"), cap.stderr
    assert len(received) == asked


def test_a_filled_setting_that_opens_with_a_quote_stays_the_setting(shell, received):
    """``config system={persona}`` with a persona in quotes (``“Be terse.”``, pasted from a document) became the
    word ``"system=“Be terse.”"``: the joined line's ``"`` was taken for part of the key (a setting ``"system``)
    or the quote after ``=`` for one that never closes, where the shell split before 44eb7fb read it back."""
    asked = len(received)
    for persona in ("“Be terse.”", "'Be terse.'", "‘Be terse", '"Be terse."', "=“x"):
        shell.user_ns["persona"] = persona
        cap = cell(shell, "%xllm config system={persona}")
        assert cap.stderr == "" and shell.xllm_magics.state.defaults.system == persona, (persona, cap.stderr)
        assert command_words(join(["config", f"system={persona}"])) == ["config", f"system={persona}"]
    assert len(received) == asked
    cell(shell, "%xllm config system=")
