"""A damaged model in the store, or a careless input to the CLI, fails for that one thing with a clear
message, and the other models keep working (list, show, rm, create, a real server)."""

from __future__ import annotations

import openai
import pytest

from tests.server_fixtures import TINY, make_test_config, running_server
from tests.test_cli_ux import home, invoke, one_error_line  # noqa: F401 - ``home`` is a fixture
from xllm_jupyter.core.errors import ModelNotFound, StoreError
from xllm_jupyter.store.store import ModelStore


@pytest.fixture
def broken(home):  # noqa: F811 - the fixture imported above
    """The CLI's store with "tiny" plus "broken", a copy whose manifest is not JSON any more."""
    assert invoke("cp", TINY, "broken").exit_code == 0
    (home / "models" / "broken" / "xllm-manifest.json").write_text("{not json")
    return home


def test_rm_removes_a_model_whose_manifest_is_damaged(broken):
    result = invoke("rm", "-y", "broken")
    assert result.exit_code == 0 and "Removed broken" in result.output
    assert not (broken / "models" / "broken").exists()
    assert "does not exist" in one_error_line(invoke("rm", "-y", "broken"))
    assert "Invalid model name" in one_error_line(invoke("rm", "-y", "../models"))
    assert [m.name for m in ModelStore(broken).list()] == [TINY]


def test_list_names_a_damaged_model_and_lists_the_others(broken):
    result = invoke("list")
    assert result.exit_code == 0
    assert TINY in result.stdout and "broken" not in result.stdout
    assert "model 'broken' is damaged" in result.stderr and "xllm rm broken" in result.stderr
    assert ModelStore(broken).damaged() == [("broken", "Damaged model manifest (JSONDecodeError)")]


def test_show_of_a_damaged_model_names_it(broken):
    line = one_error_line(invoke("show", "broken"))
    assert "Model 'broken' is damaged" in line and "remove it, then pull or create it again" in line
    # a manifest that still says where the model came from: cp made it (as create makes models), so it has no
    # source to pull, and pulling it again cannot mend it
    (broken / "models" / "broken" / "xllm-manifest.json").write_text('{"schema": 1, "source": "modelfile:tiny"}')
    line = one_error_line(invoke("show", "broken"))
    assert "Model 'broken' is damaged" in line and "create it again from 'tiny'" in line and "pull it again" not in line
    assert invoke("show", TINY).exit_code == 0


def test_show_of_a_model_with_a_missing_file_says_it_is_damaged(home):  # noqa: F811
    assert invoke("cp", TINY, "holed").exit_code == 0
    (home / "models" / "holed" / "config.json").unlink()
    result = invoke("show", "holed")
    assert result.exit_code == 0 and "name      holed" in result.stdout  # the manifest is still shown
    assert "model 'holed' is damaged (its file config.json is missing)" in result.stderr
    assert "create it again from tiny (xllm create holed -f Modelfile)" in result.stderr  # cp made it: no pull
    assert "pull it again" not in result.stderr
    with pytest.raises(StoreError, match="create it again from 'tiny'"):  # what a server's load of it says
        ModelStore(home).resolve("holed")
    assert invoke("show", TINY).stderr == ""
    (home / "models" / TINY / "config.json").unlink()  # a pulled model: pulling it again mends it
    assert "pull it again with --force" in invoke("show", TINY).stderr
    with pytest.raises(StoreError, match="pull it again with force"):
        ModelStore(home).resolve(TINY)


def test_create_from_a_binary_file_is_a_usage_error(home, tmp_path):  # noqa: F811
    path = tmp_path / "Modelfile"
    path.write_bytes(b"FROM tiny\n\xb0\xff\x00binary")
    result = invoke("create", "bin", "-f", str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "is not UTF-8 text" in result.stderr
    assert [m.name for m in ModelStore(home).list()] == [TINY]


def test_a_model_with_damaged_files_fails_to_load_with_a_message_that_says_so(tmp_path, tiny_llama_dir):
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), TINY)
    store.pull(str(tiny_llama_dir), "bad")  # its own copy of the files (a pull copies, cp would link)
    tokenizer = store.show("bad").path / "tokenizer.json"
    with open(tokenizer, "r+b") as f:  # same size: only a load (or verify) can tell
        f.write(b"GARBAGE!")
    made = store.create("made", f"FROM {TINY}\nPARAMETER seed 1\n").path / "tokenizer.json"
    text = made.read_bytes()
    made.unlink()  # (a file of its own: create hard-links its base's, and tiny must stay whole)
    made.write_bytes(b"GARBAGE!" + text[8:])
    with running_server(make_test_config(store.home), store, TINY) as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=60) as client:
            with pytest.raises(openai.InternalServerError) as failed:
                client.chat.completions.create(model="bad", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            body = failed.value.body
            assert failed.value.code == "model_load_failed"
            assert "'bad'" in body["message"] and "damaged" in body["message"]
            assert str(store.home) not in body["message"]
            assert "pull it again with force" in body["message"]
            # a model made by xllm create cannot be pulled: its advice is to create it again
            with pytest.raises(openai.InternalServerError) as failed:
                client.chat.completions.create(model="made", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            message = failed.value.body["message"]
            assert failed.value.code == "model_load_failed" and "'made'" in message, message
            assert "create it again from 'tiny'" in message and "pull it again" not in message, message
            # the other model goes on answering
            reply = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            assert reply.choices[0].message.content is not None


@pytest.mark.parametrize("name", ["tiny.", "x.:v1", "x:v1.", "a."])
def test_a_name_ending_in_a_dot_is_refused(home, name):  # noqa: F811
    # Windows drops a trailing dot from a file name: "tiny." would be the directory of "tiny" there
    assert "Invalid model name" in one_error_line(invoke("cp", TINY, name))
    assert "Invalid model name" in one_error_line(invoke("show", name))
    assert [m.name for m in ModelStore(home).list()] == [TINY]


def test_a_revision_for_a_source_without_revisions_is_refused(home, tiny_llama_dir):  # noqa: F811
    # it used to be dropped silently: the model pulled was not the revision asked for
    for source in (str(tiny_llama_dir), "smollm2"):
        message = one_error_line(invoke("pull", source, "--name", "other", "--revision", "v2"))
        assert "revision applies to Hugging Face repos only" in message
    assert [m.name for m in ModelStore(home).list()] == [TINY]


def test_a_modelfile_saved_with_a_byte_order_mark_and_crlf_is_read(home, tmp_path):  # noqa: F811
    # Windows editors save "UTF-8 with BOM"; it used to fail as "unknown instruction '\ufeffFROM'"
    path = tmp_path / "Modelfile"
    path.write_bytes('FROM tiny\r\nPARAMETER temperature 0.5\r\nSYSTEM """one\r\ntwo"""\r\n'.encode("utf-8-sig"))
    result = invoke("create", "bom", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert invoke("show", "bom", "--system").output == "one\ntwo\n"
    assert invoke("show", "bom", "--parameters").output == "temperature         0.5\n"


@pytest.mark.parametrize("settings", [
    {"from": "tiny", "messages": [{"role": "robot", "content": "hi"}]},  # the server sent this role to the model
    {"from": "tiny", "license": "MIT"},  # was shown as three LICENSE lines: M, I, T
    {"from": "tiny", "adapters": "x"},
])
def test_hand_edited_modelfile_settings_are_damage_not_silently_used(home, settings):  # noqa: F811
    import json

    assert invoke("cp", TINY, "edited").exit_code == 0
    path = home / "models" / "edited" / "xllm-manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "modelfile": settings}))
    for args in (["show", "edited"], ["show", "edited", "--modelfile"], ["show", "edited", "--license"]):
        assert "Model 'edited' has damaged Modelfile settings" in one_error_line(invoke(*args))
    assert invoke("show", TINY, "--modelfile").exit_code == 0


def _loaded(info) -> list[str]:
    import httpx

    r = httpx.get(info.root + "/admin/models", headers={"Authorization": f"Bearer {info.api_key}"}, timeout=30)
    return [m["id"] for m in r.json()["data"]]


def test_a_pull_that_replaces_a_loaded_model_unloads_it(tmp_path, tiny_llama_dir, monkeypatch):
    """Both ways in: the server's pull route and `xllm pull --force` (which tells the server, as create and cp do);
    before, the server went on serving the replaced weights."""
    import shutil

    import httpx

    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    (other / "generation_config.json").write_text('{"temperature": 0.25}')  # other files: another digest
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), TINY)
    with running_server(make_test_config(store.home), store, TINY) as info:
        headers = {"Authorization": f"Bearer {info.api_key}"}

        def pull_route(source: str) -> str:
            r = httpx.post(info.root + "/admin/models/pull", json={"model": source, "name": TINY, "force": True},
                           headers=headers, timeout=120)
            assert r.status_code == 200 and '"status": "success"' in r.text.replace('":"', '": "'), r.text
            return r.text

        pull_route(str(tiny_llama_dir))  # the same files: nothing to unload
        assert TINY in _loaded(info)
        pull_route(str(other))
        assert TINY not in _loaded(info)
        assert store.show(TINY).source == str(other)

        info.call(info.engine.load(TINY))
        assert TINY in _loaded(info)
        monkeypatch.setenv("XLLM_HOME", str(store.home))
        for var in ("XLLM_CONFIG", "XLLM_BASE_URL", "XLLM_API_KEY"):
            monkeypatch.delenv(var, raising=False)
        result = invoke("--url", info.base_url, "--api-key", info.api_key, "pull", str(tiny_llama_dir), "--name", TINY,
                        "--force")
        assert result.exit_code == 0, result.output
        assert TINY not in _loaded(info)


def test_rm_in_a_store_it_cannot_write_is_an_error_line_not_a_traceback(home):  # noqa: F811
    # (a read-only store answers the same way; a file where the locks directory goes fails as root too)
    import shutil

    shutil.rmtree(home / "locks", ignore_errors=True)
    (home / "locks").write_text("not a directory")
    assert "File system error in the model store" in one_error_line(invoke("rm", "-y", TINY))
    assert [m.name for m in ModelStore(home).list()] == [TINY]


def test_show_and_cp_of_a_packaged_model_not_pulled_yet_say_how_to_add_it(home):  # noqa: F811
    # `run smollm2` works (it pulls on first use), so "does not exist" was misleading here
    for args in (["show", "SmolLM2"], ["cp", "smollm2", "copy"]):
        assert "`xllm pull smollm2` adds it" in one_error_line(invoke(*args))
    assert "does not exist" in one_error_line(invoke("show", "nope"))


def _seeded(home) -> str:  # noqa: F811
    """"tiny" with a seed in its Modelfile: unseeded, the random model's reply can be only whitespace, or none."""
    ModelStore(home).create("tiny-seeded", f"FROM {TINY}\nPARAMETER seed 7")
    return "tiny-seeded"


def test_piped_stdin_that_is_not_utf8_is_read_not_a_traceback(home):  # noqa: F811
    # bytes such as a binary file piped by mistake: replaced by U+FFFD, the answer still comes
    result = invoke("run", "--local", _seeded(home), "--max-tokens", "2", "summarize", input=b"ok\xff\xfe\x80 text")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.stdout.strip()


def test_a_prompt_argument_that_is_not_utf8_is_read_not_a_traceback(home):  # noqa: F811
    # a non-UTF-8 byte on the command line reaches Python as a surrogate escape ("\udcff")
    result = invoke("run", "--local", _seeded(home), "--max-tokens", "2", "-s", "be \udcff brief", "hi \udcff")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and result.stdout.strip()


def test_a_malformed_url_or_a_non_utf8_model_name_is_an_error_line(home):  # noqa: F811
    for args in (["--url", "http://[::1", "ps"], ["ps", "--url", "http://[::1"], ["--url", "http://h/v1\udcff", "ps"]):
        result = invoke(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert "is not a usable URL" in result.stderr
    result = invoke("--url", "ftp://x:1", "ps")  # was "no xllm server at http://ftp://x:1"
    assert result.exit_code == 2 and "'ftp://x:1' is not a server URL (use http:// or https://)" in result.stderr
    # the server named by XLLM_BASE_URL is not there: the name was encoded (a traceback) before that mattered
    assert "no xllm server" in one_error_line(invoke("stop", "ti\udcffny"))


def test_list_notes_a_model_whose_files_are_cut_short_or_missing(home):  # noqa: F811
    """Such a model is still listed (its manifest is whole) but its load would fail: ``list`` says so on stderr."""
    assert invoke("cp", TINY, "cut").exit_code == 0 and invoke("cp", TINY, "gone").exit_code == 0
    store = ModelStore(home)
    cut, gone = store.show("cut"), store.show("gone")
    weights = max(cut.files, key=lambda f: f.size)
    # (a fresh file: cp hard-links weights, so truncating in place would cut the original too)
    target = cut.path / weights.path
    target.unlink()
    target.write_bytes(b"x" * 10)
    (gone.path / weights.path).unlink()
    result = invoke("list")
    assert result.exit_code == 0 and "cut" in result.stdout and TINY in result.stdout
    assert f"model 'cut' is damaged (its file {weights.path} has 10 bytes where its manifest says {weights.size:,})" \
        in result.stderr
    assert f"model 'gone' is damaged (its file {weights.path} is missing)" in result.stderr
    assert TINY not in [name for name, _ in store.damaged()]  # the original kept its files


def test_a_model_removed_as_it_is_resolved_is_not_found_not_damaged(tmp_path, tiny_llama_dir, monkeypatch):
    # found by a race of rm, forced pulls and resolves on threads (what DELETE /v1/models/{id} does while users
    # chat): the manifest was read, then the directory left models/ in one rename, and the file check said
    # "damaged ... pull it again with force" (a 400 to the chat) about a model that was removed
    store = ModelStore(tmp_path / "home")
    store.pull(str(tiny_llama_dir), "m")
    show = ModelStore.show
    calls = []

    def show_then_rm(self, name):
        manifest = show(self, name)
        calls.append(name)
        if len(calls) == 1:  # the rename lands between the manifest read and the file check
            self.rm(name)
        return manifest

    monkeypatch.setattr(ModelStore, "show", show_then_rm)
    with pytest.raises(ModelNotFound):  # was a StoreError "damaged"
        store.resolve("m")
    store.pull(str(tiny_llama_dir), "m")
    assert store.resolve("m").name == "m"
