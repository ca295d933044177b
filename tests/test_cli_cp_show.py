"""``xllm cp`` and ``xllm show``'s one-part flags (``--parameters``, ``--system``, ``--template``, ``--license``), as in Ollama."""

from __future__ import annotations

import pytest

from tests.server_fixtures import TINY
from tests.test_cli_ux import home, invoke, one_error_line  # noqa: F401 - ``home`` is a fixture
from xllm_jupyter.store.modelfile import Modelfile, parse_modelfile, render_modelfile
from xllm_jupyter.store.store import ModelStore

MODELFILE = """FROM tiny
PARAMETER temperature 0.3
PARAMETER stop "<end>"
PARAMETER stop "###"
SYSTEM You are terse.
LICENSE MIT-ish
"""


@pytest.fixture
def terse(home, tmp_path):  # noqa: F811 - the fixture imported above
    path = tmp_path / "Modelfile"
    path.write_text(MODELFILE)
    assert invoke("create", "terse", "-f", str(path)).exit_code == 0
    return home


def test_cp_copies_the_model_and_its_settings_sharing_the_weights(terse):
    result = invoke("cp", "terse", "terse2")
    assert result.exit_code == 0 and "Copied terse to terse2" in result.output
    store = ModelStore(terse)
    a, b = store.show("terse"), store.show("terse2")
    assert a.digest == b.digest
    assert invoke("show", "terse2", "--parameters").output.splitlines() == [
        "temperature         0.3", 'stop                "<end>"', 'stop                "###"']
    # hard links where the file system allows: the copy takes no second set of weights
    weights = [f for f in a.files if f.path.endswith(".safetensors")][0].path
    assert (a.path / weights).stat().st_ino == (b.path / weights).stat().st_ino


def test_cp_refuses_what_it_cannot_do(terse):
    assert "does not exist" in one_error_line(invoke("cp", "nope", "x"))
    assert invoke("cp", "terse", "TERSE").exit_code == 2  # the same model (names are case-insensitive)
    assert "Invalid model name" in one_error_line(invoke("cp", "terse", "../evil"))
    assert [m.name for m in ModelStore(terse).list()] == ["terse", TINY]


def test_show_prints_one_part_alone(terse):
    assert invoke("show", "terse", "--system").output == "You are terse.\n"
    assert invoke("show", "terse", "--license").output == "MIT-ish\n"
    template = invoke("show", "terse", "--template").output
    assert "<|im_start|>" in template and "…" not in template  # the whole template, not the excerpt
    assert invoke("show", TINY, "--system").output == ""  # none: nothing printed
    result = invoke("show", "terse", "--system", "--license")
    assert result.exit_code == 2 and "--system, --license" in result.output


def test_show_parameters_prints_a_stop_string_as_written(home, tmp_path):  # noqa: F811 - the fixture imported above
    """A stop string that is not ASCII came out as JSON escapes (``stop "\\u3002"``), which no Modelfile reads back."""
    path = tmp_path / "Modelfile"
    path.write_text('FROM tiny\nPARAMETER stop "。"\nPARAMETER stop "a\\tb"\n', encoding="utf-8")
    assert invoke("create", "cjk", "-f", str(path)).exit_code == 0
    assert invoke("show", "cjk", "--parameters").output.splitlines() == ['stop                "。"',
                                                                          'stop                "a\\tb"']


def test_show_output_with_control_characters_reads_back(home, tmp_path):  # noqa: F811 - the fixture imported above
    """A stop string holding a control character (an escape sequence, U+0001) came out of ``show --parameters`` as JSON's
    ``"\\u0001"``, which the Modelfile parser read as the six characters; and ``show --modelfile`` wrote a "\\r" raw,
    which ends the line when the file is read back. Both now write ``\\uXXXX``, which the parser reads."""
    path = tmp_path / "Modelfile"
    path.write_text('FROM tiny\nPARAMETER stop "\x1b[0m"\nPARAMETER stop "a\x01b"\n', encoding="utf-8")
    assert invoke("create", "ctl", "-f", str(path)).exit_code == 0
    stops = ["\x1b[0m", "a\x01b"]
    store = ModelStore(home)
    assert store.resolve("ctl").defaults.parameters["stop"] == stops
    lines = invoke("show", "ctl", "--parameters").output.splitlines()
    assert lines == ['stop                "\\u001b[0m"', 'stop                "a\\u0001b"']
    path.write_text("FROM tiny\n" + "".join(f"PARAMETER {line}\n" for line in lines), encoding="utf-8")
    assert invoke("create", "again", "-f", str(path)).exit_code == 0
    assert store.resolve("again").defaults.parameters["stop"] == stops
    # a carriage return, as a Modelfile rendered from settings holds it, reads back too
    m = Modelfile(from_="tiny", parameters={"stop": ["\r", "a\rb", "\x7f", "\\u0041"]}, system="one\rtwo")
    text = render_modelfile(m)
    assert "\r" not in text and parse_modelfile(text) == m


def test_a_bad_server_url_leaves_a_store_command_to_do_its_work(home, tmp_path, tiny_llama_dir):  # noqa: F811
    """With an unusable --url/XLLM_BASE_URL, create and cp (and a pull replacing a model) added the model, then failed as
    a usage error asking the server to unload it (exit 2: a script took it for not added), and rm removed nothing.
    They need no server: each does its work and notes once that no server was asked."""
    path = tmp_path / "Modelfile"
    path.write_text("FROM tiny\nSYSTEM Be brief.\n")
    bad = {"XLLM_BASE_URL": "ftp://x"}
    for args, names in ((["create", "new", "-f", str(path)], ["new", TINY]), (["cp", TINY, "new2"], ["new", "new2", TINY]),
                        (["pull", str(tiny_llama_dir), "--name", "new2", "--force"], ["new", "new2", TINY]),
                        (["rm", "-y", "new2"], ["new", TINY]), (["rm", "-y", "new", "--url", "http://[::1"], [TINY])):
        result = invoke(*args, env=bad)
        assert result.exit_code == 0, (args, result.output)
        assert result.stderr.count("Note: no server was asked to unload") == 1, (args, result.stderr)
        assert [m.name for m in ModelStore(home).list()] == names, args
