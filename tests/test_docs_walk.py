"""What a new user following the docs verbatim ran into: each test fails on the code before its fix."""

from __future__ import annotations

import re
import shutil

import pytest
from click.testing import CliRunner

from tests.helpers import free_port
from tests.server_fixtures import TINY
from xllm_jupyter.cli.main import main
from xllm_jupyter.store.store import ModelStore


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_llama_dir):
    """A store of this test's own holding the tiny Llama as "tiny"; no server listening."""
    path = tmp_path / "home"
    ModelStore(path).pull(str(tiny_llama_dir), TINY)
    monkeypatch.setenv("XLLM_HOME", str(path))
    monkeypatch.setenv("XLLM_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
    for var in ("XLLM_CONFIG", "XLLM_API_KEY", "XLLM_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    return path


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def test_a_failed_pull_or_create_prints_its_error_line_alone(home):
    """README: errors are "printed as one line". The pull/create progress display left an empty line
    before it off a terminal (rich prints one when it stops, even with nothing shown)."""
    r = invoke("pull", "./not/here")
    assert r.exit_code == 1
    assert r.stderr == "Error: No such local model directory or .gguf file: ./not/here\n"
    r = invoke("create", "x", "-f", "-", input=f"FROM {TINY}\nPARAMETR top_k 3\n")
    assert r.exit_code == 1
    assert r.stderr == "Error: line 2: unknown instruction 'PARAMETR' (did you mean 'PARAMETER'?)\n"
    # a successful create still shows its bar and its result
    r = invoke("create", "x", "-f", "-", input=f"FROM {TINY}\nPARAMETER top_k 3\n")
    assert r.exit_code == 0, r.output
    assert "done" in r.stderr and r.stdout.startswith("Created x ")


def test_from_a_directory_named_like_a_stored_model_says_how_to_go_on(home, tiny_llama_dir, tmp_path):
    """docs/modelfile.md: a FROM path is pulled first, under its directory's name. When the store holds another
    model of that name the error told a `xllm create` user to "pull with --force (force=True)", a flag create
    lacks and one that would replace their model with these files."""
    weights = tmp_path / "project" / TINY
    shutil.copytree(tiny_llama_dir, weights)
    before = ModelStore(home).show(TINY)
    r = invoke("create", "mine", "-f", "-", input=f"FROM {weights}\n")
    assert r.exit_code == 1
    err = r.stderr.strip()
    assert err.startswith(f"Error: FROM '{weights}' would be pulled into the store as '{TINY}'"), err
    assert f"xllm pull {weights} --name NAME" in err and "force" not in err
    assert ModelStore(home).show(TINY).source == before.source
    # the way out it names works
    assert invoke("pull", str(weights), "--name", "tiny-copy").exit_code == 0
    r = invoke("create", "mine", "-f", "-", input="FROM tiny-copy\n")
    assert r.exit_code == 0, r.output


def test_empty_web_search_options_is_rejected(raw):
    """docs/clients.md: web_search_options is a 400. `{}` asks for a search with default settings, and
    was served without one (an empty value counted as unset)."""
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "x"}],
                                               "max_tokens": 1, "web_search_options": {}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "web_search_options" and err["code"] == "unsupported_parameter"
    # empty values of the other fields still mean nothing asked for (as clients send them)
    r = raw.post("/v1/chat/completions", json={"model": TINY, "messages": [{"role": "user", "content": "x"}],
                                               "max_tokens": 1, "functions": []})
    assert r.status_code == 200


def test_until_reads_like_ollama_ps():
    """`xllm ps` has ollama ps's UNTIL column: when keep_alive unloads the model."""
    from xllm_jupyter.cli.render import until

    now = 1_000_000.0
    assert until(None, now) == "forever"
    assert until(now + 4 * 60 + 59, now) == "4 minutes from now"
    assert until(now + 60, now) == "1 minute from now"
    assert until(now + 30, now) == "30 seconds from now"
    assert until(now + 2 * 3600, now) == "2 hours from now"
    assert until(now + 3 * 86400, now) == "3 days from now"
    assert until(now - 5, now) == "now"
    assert until("soon", now) == "-"


def test_ps_shows_until_and_one_line_per_model_in_a_pipe(live, raw):
    """A model loaded with keep_alive shows when it goes; a pipe gets each model on one line
    (the table was cut to 100 columns, and a long name or mode lost its end to an ellipsis)."""
    def loaded() -> dict[str, dict]:
        return {m["id"]: m for m in raw.get("/admin/models").json()["data"]}

    was_kept = loaded()[TINY]["expires_at"] is None
    assert raw.post("/admin/models/load", json={"model": TINY, "keep_alive": "2h"}).status_code == 200
    try:
        r = invoke("ps")
        assert r.exit_code == 0, r.output
        header, *rows = r.stdout.splitlines()
        assert header.split() == ["NAME", "BACKEND", "MEMORY", "RUNNING", "QUEUED", "UNTIL", "MODE"]
        row = next(line for line in rows if line.startswith(TINY + " "))
        assert "1 hour from now" in row and "\u2026" not in r.stdout
        assert {line.split()[0] for line in rows} <= set(loaded())  # no wrapped continuation lines
    finally:  # as it was for the other tests of the session
        raw.post("/admin/models/load", json={"model": TINY, **({"keep_alive": -1} if was_kept else {})})


def test_create_warns_about_settings_it_only_records(home):
    """docs/modelfile.md: TEMPLATE and parameters such as mirostat are recorded only. An Ollama user expects
    them to apply; like an unusable ADAPTER, create now says so instead of taking them in silence."""
    import os
    import subprocess
    import sys

    def create(name: str, text: str) -> subprocess.CompletedProcess:
        # a real process: the warning reaches the terminal through logging, as a user sees it
        return subprocess.run([sys.executable, "-m", "xllm_jupyter.cli", "create", name, "-f", "-"], input=text,
                              capture_output=True, text=True, timeout=120, env=dict(os.environ))

    r = create("t", f'FROM {TINY}\nTEMPLATE """{{{{ .Prompt }}}}"""\nPARAMETER mirostat 2\nPARAMETER typical_p 0.5\n'
                    "PARAMETER temperature 0\n")
    assert r.returncode == 0, r.stderr
    assert "PARAMETER mirostat, typical_p are recorded but not applied" in r.stderr
    assert "TEMPLATE is recorded but not applied" in r.stderr
    assert "temperature" not in r.stderr
    r = create("u", f"FROM {TINY}\nPARAMETER top_k 3\nPARAMETER num_ctx 64\n")
    assert r.returncode == 0 and "not applied" not in r.stderr, r.stderr
    r = create("v", "FROM t\nPARAMETER mirostat 2\nPARAMETER num_gpu 1\n")  # mirostat 2 is t's own already
    assert r.returncode == 0 and "PARAMETER num_gpu is recorded" in r.stderr and "mirostat" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "xllm_jupyter.cli", "cp", "t", "t2"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))  # restates t's settings: warned about when t was made
    assert r.returncode == 0 and "not applied" not in r.stderr, r.stderr


def test_recorded_only_and_applied_parameters_cover_ollamas_list():
    """Every Modelfile parameter is either applied to requests (or the context) or listed as recorded only."""
    from xllm_jupyter.openai.model_defaults import _FIELDS
    from xllm_jupyter.store.modelfile import PARAMETERS, RECORDED_ONLY

    applied = set(_FIELDS) | {"num_predict", "num_ctx"}
    assert applied.isdisjoint(RECORDED_ONLY)
    assert applied | RECORDED_ONLY == set(PARAMETERS)


def test_help_texts_have_no_rst_markup():
    """`xllm show --help` read "as ``ollama show`` does" and `xllm cp --help` "(as ``xllm create`` replaces it)":
    the docstrings' reST quoting is printed as typed in a terminal."""
    commands = sorted(main.commands)
    assert {"show", "cp", "serve", "pull", "run", "list", "rm", "ps", "stop", "create"} <= set(commands)
    for name in [None, *commands]:
        r = invoke(*([name] if name else []), "--help")
        assert r.exit_code == 0, (name, r.output)
        assert "``" not in r.output, (name, r.output)


def test_pull_progress_off_a_terminal_keeps_each_file_on_one_line(home, tiny_llama_dir, tmp_path, monkeypatch):
    """Binder's build log (postBuild runs `xllm pull smollm2`) and CI read the final bars off a terminal, where rich
    assumed 80 columns: each file's size folded onto a line of its own ("90.9/90.9" above "MB")."""
    monkeypatch.delenv("COLUMNS", raising=False)
    source = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, source)
    # a file name as long as all-minilm's config_sentence_transformers.json, sized in kB
    (source / "config_sentence_transformers.json").write_text('{"pad": "' + "x" * 39000 + '"}')
    r = invoke("pull", str(source), "--name", "again")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) >= 3, r.stderr  # the files and "done"
    for line in lines:
        assert line.split()[0] in {"copy", "download", "verify", "convert", "done"} and "━" in line, r.stderr
        assert re.search(r"\d/[\d.]+ ?(bytes|kB|MB|GB)\b", line), r.stderr


def test_pull_progress_names_each_file_by_its_path_in_the_model(home, tiny_llama_dir, tmp_path):
    """`xllm pull all-minilm` showed two lines reading "config.json": its 1_Pooling/config.json was cut to its name."""
    source = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, source)
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8}')
    r = invoke("pull", str(source), "--name", "pooled")
    assert r.exit_code == 0, r.output
    labels = [line.split()[1] for line in r.stderr.splitlines() if line.split()[:1] == ["copy"]]  # (a local source)
    assert "1_Pooling/config.json" in labels and "config.json" in labels, r.stderr
    assert len(labels) == len(set(labels)), r.stderr


def test_the_command_list_cuts_no_summary_short():
    """`xllm --help` listed "hub-service  Run the JupyterHub service (same as `python -m..." and "rm  Remove a model
    from the store (a running server unloads it...": click cut the first line of their help."""
    out = invoke("--help").output
    commands = out.split("Commands:", 1)[1].splitlines()
    assert len([line for line in commands if line.strip()]) == len(main.commands), out
    assert not [line for line in commands if line.rstrip().endswith("...")], out


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ("/v1/completions", {"prompt": "x"}),
])
def test_five_stop_strings_are_refused_in_openais_words(raw, route, body):
    """docs/http-api.md: request checks use api.openai.com's words and codes. Five `stop` strings read
    "'stop' accepts at most 4 sequences" with the generic code `invalid_value`."""
    r = raw.post(route, json={"model": TINY, "max_tokens": 1, "stop": ["a", "b", "c", "d", "e"], **body})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with "
                   "length 5 instead.",
        "type": "invalid_request_error", "param": "stop", "code": "array_above_max_length"}
