"""``%xllm`` line commands (list, ps, load, unload/stop, show, pull, rm, use, status, connect, config, help)
through a real IPython shell against a real server with its own store."""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import io
import os
import threading
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from IPython.utils.capture import capture_output

from tests.magic_shell import magic_shell, run, shown
from tests.server_fixtures import TINY, make_test_config, running_server
from xllm_jupyter.client import discovery
from xllm_jupyter.core.config import AuthConfig
from xllm_jupyter.server.pull import PullCancelled, pull_events
from xllm_jupyter.store.progress import PullProgress

COPY = "tiny-copy"


@pytest.fixture
def shell(own_tiny_server, monkeypatch):
    """IPython with a fresh %xllm pointed at ``own_tiny_server`` (as the extension's variables would)."""
    monkeypatch.setenv("XLLM_BASE_URL", own_tiny_server.base_url)
    monkeypatch.setenv("XLLM_API_KEY", own_tiny_server.api_key)
    monkeypatch.delenv("XLLM_MODEL", raising=False)
    with magic_shell() as ip:
        yield ip


def test_list_and_ps_render_tables(shell):
    cap = run(shell, "list")
    assert cap.stderr == ""
    html = shown(cap, "text/html")
    assert "<table>" in html and f"<td style='text-align:left'>{TINY}</td>" in html
    assert f"| {TINY} | yes | transformers |" in shown(cap, "text/markdown")
    assert shown(cap).splitlines()[0].split() == ["MODEL", "LOADED", "BACKEND", "CONTEXT", "TASK"]
    cap = run(shell, "ps")
    text = shown(cap)
    assert text.splitlines()[0].split()[:3] == ["MODEL", "BACKEND", "MEMORY"]
    assert text.splitlines()[1].startswith(TINY) and "loaded" in text


def test_pull_load_use_unload(shell, own_tiny_server, tiny_llama_dir):
    cap = run(shell, f"pull {tiny_llama_dir} --name {COPY}")
    assert cap.stderr == ""
    lines = [o.data["text/plain"] for o in cap.outputs]
    assert lines[-1].startswith(f"Pulled {COPY} (safetensors, ")  # the progress line ends as the summary
    assert any(line.startswith(f"pull {tiny_llama_dir}: ") for line in lines), lines  # progress was shown
    assert cap.outputs[-1].update  # updated in place, not a wall of lines
    assert own_tiny_server.engine.catalog.show(COPY).digest  # in the server's store now
    assert COPY in shown(run(shell, "list"))

    assert shown(run(shell, f"load {COPY}")).startswith(f"Loaded {COPY} (transformers")
    assert COPY in shown(run(shell, "ps"))
    assert shown(run(shell, f"use {COPY}")) == f"Using {COPY} for %%xllm in this notebook"
    with capture_output() as cap:
        shell.run_cell_magic("xllm", "-t 0 --max-tokens 3", "Hi")
    assert cap.outputs[-1].metadata["xllm"]["model"] == COPY  # no -m: the `use` choice
    assert shown(run(shell, "use")) == f"Default model: {COPY}"
    # spelt as a request may spell it (show, load and -m took these; use wanted the listing's exact id)
    for spelling in (COPY.upper(), f"{COPY}:latest"):
        assert shown(run(shell, f"use {spelling}")) == f"Using {COPY} for %%xllm in this notebook", spelling

    assert shown(run(shell, f"unload {COPY}")) == f"Unloaded {COPY}"
    assert shown(run(shell, f"unload {COPY}")) == f"{COPY} was not loaded"
    assert COPY not in shown(run(shell, "ps"))


def test_an_answers_digest_is_the_models_now_after_it_is_pulled_again(shell, own_tiny_server, tiny_llama_dir, tmp_path):
    """The digest in an answer's metadata is the model's that answered: the kernel kept the first digest it read for
    a name, so answers after `%xllm pull NAME --force` (or `xllm pull` anywhere) recorded the replaced model's."""
    import json
    import shutil

    name = "tiny-redone"
    store = own_tiny_server.engine.catalog

    def digest_recorded() -> str:
        with capture_output() as cap:
            shell.run_cell_magic("xllm", f"-m {name} -t 0 --max-tokens 2", "Hi")
        assert cap.stderr == "", cap.stderr
        return cap.outputs[-1].metadata["xllm"]["digest"]

    assert run(shell, f"pull {tiny_llama_dir} --name {name}").stderr == ""
    first = store.show(name).digest
    assert digest_recorded() == first
    changed = shutil.copytree(tiny_llama_dir, tmp_path / "changed")
    config = json.loads((changed / "generation_config.json").read_text())
    (changed / "generation_config.json").write_text(json.dumps({**config, "top_p": 0.5}))
    assert run(shell, f"pull {changed} --name {name} --force").stderr == ""
    second = store.show(name).digest
    assert second != first
    assert digest_recorded() == second, "the answer recorded the digest of the model the pull replaced"


def test_rm_removes_from_the_servers_store(shell, own_tiny_server, tiny_llama_dir):
    doomed = "tiny-doomed"
    store = own_tiny_server.engine.catalog
    store.pull(str(tiny_llama_dir), doomed)
    assert shown(run(shell, f"use {doomed}")) == f"Using {doomed} for %%xllm in this notebook"
    assert shown(run(shell, f"load {doomed}")).startswith(f"Loaded {doomed}")
    cap = run(shell, "rm Tiny-Doomed")  # names are case-insensitive
    assert cap.stderr == ""
    assert shown(cap).splitlines() == [f"Removed {doomed} from the server's store",
                                       "It is this notebook's default model: choose another with `%xllm use MODEL`"]
    assert not store.exists(doomed) and not own_tiny_server.engine.is_loaded(doomed)
    assert doomed not in shown(run(shell, "list"))
    cap = run(shell, f"rm {doomed}")
    assert cap.stderr == f"xllm: The model '{doomed}' does not exist\n", cap.stderr
    cap = run(shell, "rm")
    assert cap.stderr.startswith("xllm: %xllm rm: the following arguments are required: model")
    assert "%xllm rm MODEL..." in shown(run(shell, "help"))


def test_rm_takes_several_models_and_stops_at_the_first_that_fails(shell, own_tiny_server, tiny_llama_dir):
    """``%xllm rm A B C`` removes each in order, as ``xllm rm A B C`` does (the line went to the model as a prompt):
    the first removal that fails stops it, the ones before it stay removed and those after it are kept. Nothing asks
    first in a notebook, so a name the server does not know ("rm tiny and the rest", prose) stops it before any goes."""
    store = own_tiny_server.engine.catalog
    names = ("tiny-rm-a", "tiny-rm-b", "tiny-rm-c")
    for name in names:
        store.pull(str(tiny_llama_dir), name)
    cap = run(shell, "rm tiny-rm-a tiny-rm-b")
    assert cap.stderr == "", cap.stderr
    assert shown(cap).splitlines() == ["Removed tiny-rm-a from the server's store", "Removed tiny-rm-b from the server's store"]
    for name in names[:2]:
        store.pull(str(tiny_llama_dir), name)
    cap = run(shell, "rm tiny-rm-a and the rest")
    assert cap.outputs == [] and all(store.exists(n) for n in names)
    assert cap.stderr == ("xllm: the server has no model 'and': nothing was removed (to ask the model this instead: "
                          "`%xllm -- rm tiny-rm-a and the rest`)\n"), cap.stderr
    cap = run(shell, "rm tiny-rm-a tiny-rm-a tiny-rm-b")  # the second removal of one name is the failing one
    assert shown(cap) == "Removed tiny-rm-a from the server's store"
    assert cap.stderr == "xllm: The model 'tiny-rm-a' does not exist\n", cap.stderr
    assert [store.exists(n) for n in names] == [False, True, True]


def test_stop_unloads(shell, own_tiny_server, tiny_llama_dir):
    """`%xllm stop MODEL` unloads, as `xllm stop` does (it used to be sent to the model as a prompt)."""
    name = "tiny-stop"
    own_tiny_server.engine.catalog.pull(str(tiny_llama_dir), name)
    assert shown(run(shell, f"load {name}")).startswith(f"Loaded {name}")
    cap = run(shell, f"stop {name}")
    assert cap.stderr == "" and shown(cap) == f"Unloaded {name}"
    assert not own_tiny_server.engine.is_loaded(name)
    assert shown(run(shell, f"stop {name}")) == f"{name} was not loaded"
    assert run(shell, "stop").stderr.startswith("xllm: %xllm stop: the following arguments are required: model")


def test_show_describes_a_model(shell, own_tiny_server, tiny_llama_dir):
    """`%xllm show MODEL`: the model's details, as `xllm show` gives them (it used to be sent as a prompt)."""
    name = "tiny-stop"  # from test_stop_unloads when it ran first: in the store, not loaded
    if not own_tiny_server.engine.catalog.exists(name):
        own_tiny_server.engine.catalog.pull(str(tiny_llama_dir), name)
    cap = run(shell, f"show {TINY}")
    assert cap.stderr == ""
    assert shown(cap).splitlines()[0].split() == ["model", TINY], shown(cap)[:200]
    rows = {line.split(None, 1)[0]: line.split(None, 1)[1].strip() for line in shown(cap).splitlines() if line.strip()}
    manifest = own_tiny_server.engine.catalog.show(TINY)
    assert rows["model"] == TINY and rows["task"] == "chat" and rows["loaded"] == "yes"
    assert rows["backend"] == "transformers" and rows["format"] == "safetensors"
    assert rows["digest"] == manifest.digest and rows["source"] == "local:" + tiny_llama_dir.name
    assert rows["device"] == "cpu" and rows["requests"] == "0 running, 0 queued" and rows["context"].isdigit()
    assert "<table>" in shown(cap, "text/html") and "| digest |" in shown(cap, "text/markdown")
    rows = dict(line.split(None, 1) for line in shown(run(shell, f"show {name}")).splitlines() if line.strip())
    assert rows["loaded"].strip() == "no" and "device" not in rows and rows["digest"].strip().startswith("sha256:")
    assert "%xllm show MODEL" in shown(run(shell, "help"))


def test_show_with_a_user_key(xllm_home, tiny_catalog, monkeypatch):
    """A user key (the server has admin keys) reads the model's entry but not the store's record: show what it may."""
    user, admin = "sk-show-user", "sk-show-admin"
    cfg = dataclasses.replace(make_test_config(xllm_home, api_keys=(user,)), auth=AuthConfig(admin_keys=(admin,)))
    with running_server(cfg, tiny_catalog, TINY) as info:
        monkeypatch.setenv("XLLM_BASE_URL", info.base_url)
        monkeypatch.setenv("XLLM_API_KEY", user)
        with magic_shell() as ip:
            cap = run(ip, f"show {TINY}")
            assert cap.stderr == ""
            rows = dict(line.split(None, 1) for line in shown(cap).splitlines() if line.strip())
            assert rows["model"].strip() == TINY and rows["digest"].strip() == tiny_catalog.show(TINY).digest
            assert "source" not in rows and "size" not in rows  # the admins' manifest route said 403
            assert "memory" not in rows and "requests" not in rows  # shared activity the server hides from users
            assert shown(cap).splitlines()[-1].split() == ["your", "requests", "0", "running,", "0", "queued"]
            assert run(ip, f"stop {TINY}").stderr.startswith("xllm: ")  # unloading is the admins'
            assert info.engine.is_loaded(TINY)


def test_which_lines_are_commands_and_which_are_prompts(shell):
    """A CLI verb that also begins everyday prompts (stop, show, run) is a command only as the verb alone or the
    verb and one model-name-shaped word; longer lines are asked of the model."""
    run(shell, "config temperature=0 max_tokens=2 format=text")
    for prompt in ("show me a poem about the sea", "stop being verbose and say hi", "run a quick sanity check",
                   f"show {TINY}?"):
        cap = run(shell, prompt)
        assert cap.stderr == "", (prompt, cap.stderr)
        meta = cap.outputs[-1].metadata.get("xllm") or {}
        assert meta.get("model") == TINY and meta["usage"]["completion_tokens"] <= 2, (prompt, meta)
    # a one-word "prompt" after the verb is read as a model name; a name the server lacks says how to ask instead
    cap = run(shell, "show tables")
    assert cap.stderr == ("xllm: The model 'tables' does not exist (to ask the model this instead: "
                          "`%xllm -- show tables`)\n"), cap.stderr
    assert cap.outputs == []
    # the terminal's `xllm run` has no notebook twin: one line saying what to use
    assert shown(run(shell, f"run {TINY}")) == (f"In a notebook, ask with `%%xllm -m {TINY}` (the prompt in the cell) or "
                                               f"`%xllm -m {TINY} PROMPT`; `%xllm use {TINY}` makes it the default")
    assert shown(run(shell, "run")) == "In a notebook, ask with `%%xllm` (the prompt in the cell) or `%xllm PROMPT`"
    # a cell is always a prompt, whatever its first line says
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"stop {TINY}", "now")
    assert cap.stderr == "" and cap.outputs[-1].metadata["xllm"]["model"] == TINY


def test_command_errors_are_one_line(shell, tmp_path, monkeypatch):
    # getpass as it reads a closed stdin (EOFError); not the /dev/tty it tries first, where a test would wait
    monkeypatch.setattr("getpass.getpass", getpass.fallback_getpass)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    cases = {
        "use no-such-model": "xllm: the server has no model 'no-such-model'",
        "load no-such-model": "xllm: The model 'no-such-model' does not exist",
        "load": "xllm: %xllm load: the following arguments are required: model",
        "ps --bogus": "xllm: %xllm ps: unrecognized arguments: --bogus",
        "config colour=red": "xllm: unknown setting 'colour'",
        "config temperature=hot": "xllm: bad value for temperature: 'hot'",
        "config format=yaml": "xllm: bad value for format: 'yaml'",
        # float() takes these, JSON cannot carry them: the ask failed as "unexpected error (ValueError)"
        "config temperature=nan": "xllm: bad value for temperature: 'nan'",
        "-t nan hi": "xllm: argument -t/--temperature: expected a number, got 'nan'",
        "--temperature=-inf hi": "xllm: argument -t/--temperature: expected a number, got '-inf'",
        f"pull {tmp_path / 'nothing-here'}": "xllm: ",
        "pull 'unclosed": "xllm: cannot parse the command",
        # a prompt's word that looks like an option: the line says how to ask it
        "what does ls -la do": "xllm: unrecognized arguments: -la do (`%xllm help` lists the options; a prompt with "
                               "words that start with `-`: `%xllm -- PROMPT`)",
    }
    for line, start in cases.items():
        cap = run(shell, line)
        assert cap.stderr.startswith(start), (line, cap.stderr)
        assert cap.stderr.count("\n") == 1 and "Traceback" not in cap.stderr, (line, cap.stderr)
    # a closed stdin (a terminal IPython fed from a pipe) was "unexpected error (EOFError)" after getpass's prompt
    cap = run(shell, "connect http://127.0.0.1:9/v1 --token")
    assert cap.stderr.endswith("xllm token: xllm: this frontend cannot ask for the token: call "
                               "xllm_jupyter.connect(URL, token) with the token from a variable, or set XLLM_BASE_URL "
                               "to the URL and XLLM_API_KEY to the token\n"), cap.stderr


def test_config_sets_defaults_for_cells(shell, own_tiny_server):
    text = shown(run(shell, "config temperature=0 max_tokens=4 format=text"))
    assert "temperature  0.0" in text and "max_tokens   4" in text and "format       text" in text
    with capture_output() as cap:
        shell.run_cell_magic("xllm", f"-m {TINY}", "Say hi")
    out = cap.outputs[-1]
    assert "text/markdown" not in out.data  # format=text
    assert out.metadata["xllm"]["parameters"] == {"temperature": 0.0, "max_tokens": 4}
    assert out.metadata["xllm"]["usage"]["completion_tokens"] <= 4
    assert "format       markdown" in shown(run(shell, "config format=default"))


def test_status_connect_and_help(shell, own_tiny_server, xllm_server, monkeypatch):
    text = shown(run(shell, "status"))
    assert own_tiny_server.base_url in text and "Jupyter extension" in text and TINY in text
    # set by hand (pointing at `xllm serve`) the variable is not the extension: the row names the variable
    assert "the XLLM_BASE_URL variable" in text
    # connect to another server: it wins over the extension's variables from now on
    cap = run(shell, f"connect {xllm_server.base_url} --token {xllm_server.api_key}")
    assert shown(cap) == f"Connected to {xllm_server.base_url} (connect)"
    assert discovery.find_server().base_url == xllm_server.base_url
    assert "%xllm connect" in shown(run(shell, "status"))
    # a wrong token or a dead URL fails at connect, and the previous choice stays
    cap = run(shell, f"connect {own_tiny_server.base_url} --token wrong")
    assert cap.stderr.startswith("xllm: the xllm server at") and "refused the token" in cap.stderr
    cap = run(shell, "connect http://127.0.0.1:9/v1")
    assert cap.stderr.startswith("xllm: no xllm server at http://127.0.0.1:9")
    # an IPv6 address whose bracket never closes was "unexpected error (InvalidURL): Invalid port: ':1'"
    cap = run(shell, "connect http://[::1")
    assert cap.stderr == "xllm: 'http://[::1' is not a server URL (Invalid port: ':1')\n", cap.stderr
    assert discovery.find_server().base_url == xllm_server.base_url
    # bare `connect`: discover again (the extension's variables)
    assert shown(run(shell, "connect")) == f"Connected to {own_tiny_server.base_url} (extension)"
    usage = shown(run(shell, "help"))
    assert "%xllm pull SOURCE" in usage and "--chat | --new" in usage
    assert shown(run(shell, "")) == usage


def test_pull_route_validates_and_needs_credentials(own_tiny_server):
    root = own_tiny_server.root
    headers = {"Authorization": f"Bearer {own_tiny_server.api_key}"}
    assert httpx.post(root + "/admin/models/pull", json={"model": "x"}).status_code == 401
    r = httpx.post(root + "/admin/models/pull", json={"force": True}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.post(root + "/admin/models/pull", json={"model": "x", "force": "yes"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "force"

    # what fails before any work is a plain 400 error, not a 200 stream holding an error event
    missing = f"/tmp/xllm-no-such-dir-{os.getpid()}/model"
    for body, code, param in (
        ({"model": missing}, "store_error", "model"),
        ({"model": "not a source"}, "store_error", "model"),
        ({"model": "hf:org"}, "store_error", "model"),
        ({"model": "hf:org/repo", "revision": "/x"}, "store_error", "revision"),
        ({"model": "smollm2", "name": "../escape"}, "invalid_model_name", "name"),
    ):
        r = httpx.post(root + "/admin/models/pull", json=body, headers=headers)
        assert r.status_code == 400, (body, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/json")
        error = r.json()["error"]
        assert error["code"] == code and error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
    r = httpx.get(root + "/admin/models/manifest", params={"model": "no-such"}, headers=headers)
    assert r.status_code == 404
    body = httpx.get(root + "/admin/models/manifest", params={"model": TINY}, headers=headers).json()
    assert body["id"] == TINY and body["digest"].startswith("sha256:") and body["server_version"]
    assert "path" not in body and str(own_tiny_server.config.store.home) not in r.text + str(body)


class _SlowStore:
    """A store whose pull reports progress until told to stop (what a long download does)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.reports = 0

    def pull(self, source: str, name: str | None, *, progress: Any, **kw: Any) -> Any:
        try:
            for i in range(10_000):
                self.reports += 1
                progress(PullProgress("download", "model.safetensors", i, 10_000))
                self.stopped.wait(0.01)
            raise AssertionError("the pull was not stopped")
        except PullCancelled:
            self.stopped.set()
            raise


def test_a_client_leaving_stops_the_pull():
    store = _SlowStore()
    args = {"source": "x", "name": None, "revision": None, "force": False, "convert": False}

    async def main() -> dict:
        events = pull_events(store, args)
        first = await events.__anext__()
        await events.aclose()  # what the SSE writer does when the client disconnects
        return first

    first = asyncio.run(main())
    assert first == {"status": "download", "file": "model.safetensors", "completed": 0, "total": 10_000}
    assert store.stopped.is_set() and store.reports < 10_000


class _ConvertingStore:
    """A store whose pull converts a GGUF: progress counted in steps, then a manifest."""

    def pull(self, source: str, name: str | None, *, progress: Any, **kw: Any) -> Any:
        for step in range(4):
            progress(PullProgress("convert", "model.gguf", step, 3, unit="steps"))
        return SimpleNamespace(name="x", digest="sha256:0", format="safetensors", size=1, source="gguf")


def test_a_conversion_is_reported_in_steps_end_to_end():
    """The server's pull events say their unit when it is not bytes, and %xllm pull's line uses it."""
    from xllm_jupyter.magics.render import Progress

    args = {"source": "x", "name": None, "revision": None, "force": False, "convert": False}

    async def main() -> list[dict]:
        return [event async for event in pull_events(_ConvertingStore(), args) if event.get("status") == "convert"]

    events = asyncio.run(main())
    assert events and all(e["unit"] == "steps" for e in events) and events[-1]["completed"] == 3
    line = Progress(None, "pull x").line({**events[-1], "completed": 2})
    assert line == "convert  model.gguf   66%  2/3 steps"


def test_pull_passes_base_to_the_server(shell, own_tiny_server, tiny_llama_dir):
    """``%xllm pull SOURCE --base MODEL`` sends ``base``: the server's check of it answers (not argparse)."""
    cap = run(shell, f"pull {tiny_llama_dir} --name never-pulled --base no-such-base")
    assert cap.stderr.startswith("xllm: The base model 'no-such-base' is not in the server's store"), cap.stderr
    assert "never-pulled" not in {m.name for m in own_tiny_server.engine.catalog.list()}


def test_a_windows_path_keeps_its_backslashes_unquoted(shell, own_tiny_server, tiny_llama_dir, tmp_path):
    """``%xllm pull C:\\models\\x`` pulled ``C:modelsx``: the command's split took a backslash outside quotes for an
    escape, as a POSIX shell does. Here a folder whose name has backslashes (a Windows path, as Linux spells one)
    is pulled unquoted, and quoted with spaces too; inside quotes ``\\"`` is still the quote."""
    import shutil

    folder = tmp_path / "C:\\models\\tiny"
    shutil.copytree(tiny_llama_dir, folder)
    cap = run(shell, f"pull {folder} --name win-copy")
    assert cap.stderr == "" and shown(cap).splitlines()[-1].startswith("Pulled win-copy ("), cap.stderr
    spaced = tmp_path / "my models\\tiny"
    shutil.copytree(tiny_llama_dir, spaced)
    typed = str(spaced).replace("\\", "\\\\")  # in quotes `\\` is one backslash (a lone `\t` stays as typed too)
    cap = run(shell, f'pull "{typed}" --name "spaced-copy"')
    assert cap.stderr == "" and shown(cap).splitlines()[-1].startswith("Pulled spaced-copy ("), cap.stderr
    for name in ("win-copy", "spaced-copy"):
        own_tiny_server.engine.catalog.rm(name)


@pytest.mark.skipif(os.name == "nt", reason="IPython's completer quotes a path on Windows, where a backslash is kept")
def test_a_tab_completed_path_with_spaces_is_one_source(shell, own_tiny_server, tiny_llama_dir, tmp_path):
    """IPython's Tab completion writes ``~/my\\ models`` (a backslash before each space or ``(``, ``'``, ...), which
    the shell split before 44eb7fb read as one word; keeping every backslash made it ``my\\`` and ``models``, so
    ``%xllm pull`` of a completed path with spaces failed. ``\\\\server\\share`` and ``C:\\models`` keep theirs."""
    import shutil
    import warnings

    folder = tmp_path / "my models (v2)" / "it's tiny"
    shutil.copytree(tiny_llama_dir, folder)
    typed = f"%xllm pull {tmp_path}/my"
    with warnings.catch_warnings():  # Completer.complete is "pending deprecation"; it is what a frontend's Tab calls
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        completed = shell.complete("", typed, len(typed))[1]
    assert completed == [f"{tmp_path}/my\\ models\\ \\(v2\\)"], completed  # as Tab fills it in
    line = f"pull {completed[0]}/it\\'s\\ tiny --name tab-copy"
    cap = run(shell, line)
    assert cap.stderr == "" and shown(cap).splitlines()[-1].startswith("Pulled tab-copy ("), cap.stderr
    own_tiny_server.engine.catalog.rm("tab-copy")
    from xllm_jupyter.magics.line import command_words

    assert command_words("pull \\\\server\\share\\x C:\\models\\x") == ["pull", "\\\\server\\share\\x", "C:\\models\\x"]


def test_connect_to_a_host_no_name_lookup_can_encode_is_one_line(shell):
    """c26c930 caught httpx's InvalidURL only: a host the IDNA rules refuse failed later, in httpx's host (``xn--``)
    or the socket's name lookup (``a..b``, a label over 63 letters), and a lone surrogate in the path in httpx's
    URL, each as "unexpected error (IDNAError / UnicodeError / UnicodeEncodeError)"."""
    before = discovery.find_server().base_url
    for url in ("http://xn--:8000", "http://a..b:8000", f"http://{'a' * 64}.example:8000", "http://h:8000/\udce9",
                "ftp://x:1"):  # another scheme was a prompt here, and connect() said "no xllm server at http://ftp://x:1"
        cap = run(shell, f"connect {url}")
        assert cap.stderr.startswith(f"xllm: {url!r} is not a server URL ("), cap.stderr
    assert discovery.find_server().base_url == before
