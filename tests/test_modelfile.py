"""Modelfiles: the parser against Ollama's documented examples, `create`, `show --modelfile`, and serving defaults."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from tests.server_fixtures import make_test_config, running_server
from xllm_jupyter.cli.main import main
from xllm_jupyter.core.errors import InvalidRequest, StoreError
from xllm_jupyter.core.types import ModelfileDefaults
from xllm_jupyter.store.create import modelfile_of
from xllm_jupyter.store.modelfile import Message, Modelfile, ModelfileError, parse_modelfile, render_modelfile
from xllm_jupyter.store.store import ModelStore

# Ollama's documented "Mario" example (docs/modelfile.md)
MARIO = '''FROM llama3.2
# sets the temperature to 1 [higher is more creative, lower is more coherent]
PARAMETER temperature 1
# sets the context window size to 4096, this controls how many tokens the LLM can use as context to generate the next token
PARAMETER num_ctx 4096

# sets a custom system message to specify the behavior of the chat assistant
SYSTEM """You are Mario from Super Mario Bros, acting as an assistant."""
'''

# Ollama's MESSAGE example
FEW_SHOT = """FROM llama3.2
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
MESSAGE user Is Sacramento in Canada?
MESSAGE assistant no
MESSAGE user Is Ontario in Canada?
MESSAGE assistant yes
"""

# Ollama's TEMPLATE example plus several stops, quoted and not
TEMPLATED = '''from llama3.2
template """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>"""
PARAMETER stop <|start_header_id|>
PARAMETER stop <|end_header_id|>
Parameter Stop "<|eot_id|>"
PARAMETER stop "say \\"bye\\""
LICENSE """
META LLAMA 3 COMMUNITY LICENSE AGREEMENT
"""
ADAPTER ./ollama-lora.gguf
'''


def test_mario_example():
    m = parse_modelfile(MARIO)
    assert m == Modelfile(
        from_="llama3.2",
        parameters={"temperature": 1.0, "num_ctx": 4096},
        system="You are Mario from Super Mario Bros, acting as an assistant.",
    )
    assert isinstance(m.parameters["num_ctx"], int) and isinstance(m.parameters["temperature"], float)


def test_message_example():
    m = parse_modelfile(FEW_SHOT)
    assert [(x.role, x.content) for x in m.messages] == [
        ("user", "Is Toronto in Canada?"),
        ("assistant", "yes"),
        ("user", "Is Sacramento in Canada?"),
        ("assistant", "no"),
        ("user", "Is Ontario in Canada?"),
        ("assistant", "yes"),
    ]


def test_template_stops_license_adapter():
    m = parse_modelfile(TEMPLATED)
    assert m.template is not None
    assert m.template.startswith("{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}")
    assert m.template.endswith("{{ .Response }}<|eot_id|>")  # stored as given, newlines and all
    assert m.parameters["stop"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", 'say "bye"']
    assert m.license == ["\nMETA LLAMA 3 COMMUNITY LICENSE AGREEMENT\n"]
    assert m.adapters == ["./ollama-lora.gguf"]


def test_requires_is_read_and_ignored():
    """Ollama's ``REQUIRES <version>`` (the least Ollama a Modelfile needs) failed the whole Modelfile as an unknown
    instruction; it is read and ignored, as it means nothing to xllm."""
    m = parse_modelfile("FROM llama3.2\nREQUIRES 0.14.0\nSYSTEM Be brief.\n")
    assert m == Modelfile(from_="llama3.2", system="Be brief.")
    with pytest.raises(ModelfileError, match="line 2: REQUIRES needs a value"):
        parse_modelfile("FROM x\nREQUIRES\n")


def test_multiline_system_is_trimmed():
    m = parse_modelfile('FROM x\nSYSTEM """\nYou are Mario.\nAlways say "wahoo".\n"""\n')
    assert m.system == 'You are Mario.\nAlways say "wahoo".'


@pytest.mark.parametrize("text", [MARIO, FEW_SHOT, TEMPLATED])
def test_render_round_trip(text):
    m = parse_modelfile(text)
    assert parse_modelfile(render_modelfile(m)) == m
    assert render_modelfile(parse_modelfile(render_modelfile(m))) == render_modelfile(m)


def test_round_trip_awkward_values():
    m = Modelfile(
        from_="./my model",
        parameters={"stop": ["\n", ' "', '"""', "a\\b"], "seed": 42, "top_p": 0.25, "penalize_newline": True},
        template='  {{ .Prompt }} ends in a quote"',
        system="line one\nline two",
        messages=[Message("user", ""), Message("assistant", 'He said """hi"""')],
    )
    assert parse_modelfile(render_modelfile(m)) == m


@pytest.mark.parametrize(
    "text, message",
    [
        ("FROM x\nPARAMETER temperature 1\n\nPARAMETR top_k 4\n", "line 4: unknown instruction 'PARAMETR' (did you mean 'PARAMETER'?)"),
        ("FROM x\n# c\n#\n\n\n\nPARAMETER temperature hot\n", "line 7: PARAMETER temperature expects a number"),
        ("PARAMETER temperature 1\n", "missing FROM: a Modelfile must name its base model"),
        ("FROM x\nPARAMETER top_k 2.5\n", "line 2: PARAMETER top_k expects an integer"),
        ("FROM x\nPARAMETER top_p 3\n", "line 2: PARAMETER top_p must be between 0 and 1"),
        ("FROM x\nPARAMETER temperature -1\n", "line 2: PARAMETER temperature must be at least 0"),
        ("FROM x\nPARAMETER warmth 1\n", "line 2: unknown parameter 'warmth'"),  # nothing close: no guess
        ("FROM x\nPARAMETER temprature 1\n", "line 2: unknown parameter 'temprature' (did you mean 'temperature'?)"),
        ("FROM x\nPARAMETER temperature\n", "line 2: PARAMETER temperature needs a value"),
        ("FROM x\nFROM y\n", "line 2: FROM given twice (first on line 1)"),
        ("FROM x\nMESSAGE robot hi\n", "line 2: MESSAGE role must be one of system, user, assistant"),
        ('FROM x\n\nSYSTEM """never closed\nstill open\n', 'line 3: SYSTEM: unterminated """ string'),
        ('FROM x\nSYSTEM "open\n', 'line 2: SYSTEM: unterminated " string'),
        ('FROM x\nSYSTEM """a""" b\n', "line 2: SYSTEM: unexpected text after the closing quote"),
        ("FROM\n", "line 1: FROM needs a value"),
    ],
)
def test_errors_name_the_line(text, message):
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    assert str(info.value) == message
    assert isinstance(info.value, InvalidRequest) and info.value.status == 400 and info.value.param == "modelfile"


# --------------------------------------------------------------------------- store

SERVED = '''FROM tiny
PARAMETER temperature 0
PARAMETER num_predict 5
PARAMETER num_ctx 512
SYSTEM """You are Mario from Super Mario Bros."""
MESSAGE user Is Toronto in Canada?
MESSAGE assistant yes
'''


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir):
    """A store of its own: the tiny Llama as "tiny" and "mario" created from it."""
    s = ModelStore(tmp_path_factory.mktemp("modelfile-home"))
    s.pull(str(tiny_llama_dir), "tiny")
    s.create("mario", SERVED)
    return s


def test_create_shares_files_and_records_settings(store):
    tiny, mario = store.show("tiny"), store.show("mario")
    assert mario.files == tiny.files and mario.digest == tiny.digest and mario.format == tiny.format
    weights = next(f.path for f in tiny.files if f.path.endswith(".safetensors"))
    assert os.stat(mario.path / weights).st_ino == os.stat(tiny.path / weights).st_ino  # hard-linked, not copied
    assert store.verify("mario") and store.verify("tiny")
    assert modelfile_of(mario) == parse_modelfile(SERVED)
    raw = json.loads((mario.path / "xllm-manifest.json").read_text())
    assert raw["modelfile"]["parameters"] == {"temperature": 0.0, "num_predict": 5, "num_ctx": 512}
    assert raw["modelfile"]["from"] == "tiny" and raw["source"] == "modelfile:tiny"
    assert "modelfile" not in json.loads((tiny.path / "xllm-manifest.json").read_text())  # pulled manifests unchanged
    spec = store.resolve("mario")
    assert spec.context_length == 512
    assert spec.defaults.system == "You are Mario from Super Mario Bros."
    assert store.resolve("tiny").defaults == ModelfileDefaults()


def test_create_inherits_and_overrides(store):
    store.create("luigi", "FROM mario\nPARAMETER num_predict 7\nSYSTEM You are Luigi.\n")
    m = modelfile_of(store.show("luigi"))
    assert m.parameters == {"temperature": 0.0, "num_predict": 7, "num_ctx": 512}
    assert m.system == "You are Luigi." and len(m.messages) == 2 and m.from_ == "mario"
    store.create("luigi", "FROM tiny\n")  # create replaces an existing name
    assert modelfile_of(store.show("luigi")).parameters == {}
    store.rm("luigi")
    assert store.verify("mario")  # removing a model leaves the files it shared intact


def test_create_from_a_local_path(store, tiny_llama_dir):
    m = store.create("from-path", f"FROM {tiny_llama_dir}\nPARAMETER seed 3\n")
    assert modelfile_of(m).parameters == {"seed": 3}
    assert store.show(m.name).digest == store.show("tiny").digest
    pulled = modelfile_of(m).from_
    assert pulled == str(tiny_llama_dir)
    base = [x.name for x in store.list() if x.name not in ("tiny", "mario", "from-path")]
    assert len(base) == 1  # the path was pulled under its default name first, as `xllm pull` would
    store.rm("from-path")
    # the store API takes the Modelfile's directory too: a relative FROM resolves against it
    m = store.create("from-relative", f"FROM ./{Path(tiny_llama_dir).name}\n", base_dir=Path(tiny_llama_dir).parent)
    assert modelfile_of(m).from_ == str(tiny_llama_dir)
    store.rm("from-relative")
    store.rm(base[0])


def test_create_errors(store):
    with pytest.raises(StoreError, match="no such model in the store"):
        store.create("x", "FROM not-here\n")
    with pytest.raises(ModelfileError, match="line 2: unknown instruction 'PARAMETR'"):
        store.create("x", "FROM tiny\nPARAMETR temperature 1\n")
    assert [m.name for m in store.list()] == ["mario", "tiny"]  # nothing half-made


# ----------------------------------------------------------------------------- CLI


def test_cli_create_and_show_modelfile_round_trip(tmp_path, monkeypatch, tiny_llama_dir):
    home = tmp_path / "home"
    monkeypatch.setenv("XLLM_HOME", str(home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    ModelStore(home).pull(str(tiny_llama_dir), "tiny")
    (tmp_path / "Modelfile").write_text(TEMPLATED.replace("llama3.2", "tiny") + FEW_SHOT.replace("FROM llama3.2\n", ""))
    runner = CliRunner()
    result = runner.invoke(main, ["create", "mario", "-f", str(tmp_path / "Modelfile")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Created mario" in result.output
    summary = runner.invoke(main, ["show", "mario"], catch_exceptions=False).output
    # the settings a server applies are listed without --modelfile too, as `ollama show` lists them
    assert "defaults  stop=" in summary and "messages  6" in summary, summary
    shown = runner.invoke(main, ["show", "mario", "--modelfile"], catch_exceptions=False)
    assert shown.exit_code == 0 and "FROM mario" in shown.output
    (tmp_path / "copy.Modelfile").write_text(shown.output)
    result = runner.invoke(main, ["create", "copy", "-f", str(tmp_path / "copy.Modelfile")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    store = ModelStore(home)
    original, copy = modelfile_of(store.show("mario")), modelfile_of(store.show("copy"))
    assert copy.from_ == "mario"
    assert copy.parameters == original.parameters and len(copy.parameters["stop"]) == 4
    assert (copy.template, copy.system, copy.license, copy.adapters, copy.messages) == (
        original.template, original.system, original.license, original.adapters, original.messages
    )
    # a bad Modelfile: one line naming the line, exit 1, nothing created
    (tmp_path / "bad").write_text("FROM tiny\nPARAMETER temperature 1\n\nPARAMETR top_k 4\n")
    bad = runner.invoke(main, ["create", "oops", "-f", str(tmp_path / "bad")], catch_exceptions=False)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "line 4: unknown instruction 'PARAMETR'" in bad.output
    assert sorted(m.name for m in store.list()) == ["copy", "mario", "tiny"]


def test_cli_create_reads_a_local_from_path_again_after_it_changed(tmp_path, monkeypatch, tiny_llama_dir):
    """``FROM ./dir``: an edit of the directory reaches the next ``xllm create`` (it got the first pull's copy)."""
    home = tmp_path / "home"
    monkeypatch.setenv("XLLM_HOME", str(home))
    monkeypatch.delenv("XLLM_CONFIG", raising=False)
    source = tmp_path / "work" / "my-llama"
    shutil.copytree(tiny_llama_dir, source)
    (tmp_path / "work" / "Modelfile").write_text("FROM ./my-llama\nPARAMETER seed 3\n")
    store, runner = ModelStore(home), CliRunner()

    def create() -> str:
        result = runner.invoke(main, ["create", "mine", "-f", str(tmp_path / "work" / "Modelfile")],
                               catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return store.show("mine").digest

    first = create()
    weights = store.show("my-llama").path / "model.safetensors"
    inode = weights.stat().st_ino
    assert create() == first and weights.stat().st_ino == inode  # unchanged: the stored copy, not pulled again

    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.3}))
    second = create()
    assert second != first and store.show("my-llama").digest == second
    assert store.resolve("mine").defaults.parameters["temperature"] == 0.3
    assert "temperature=0.3" in runner.invoke(main, ["show", "mine"], catch_exceptions=False).output

    with open(source / "model.safetensors", "r+b") as f:  # an edit that keeps every size: found by the hashes
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    third = create()
    assert third not in (first, second) and store.verify("mine") and store.verify("my-llama")
    assert sorted(m.name for m in store.list()) == ["mine", "my-llama"]


# -------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def mario_server(store):
    with running_server(make_test_config(store.home), store, "mario") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=60) as client:
            yield info, client


def test_server_applies_modelfile_defaults(mario_server):
    info, client = mario_server
    q = [{"role": "user", "content": "Hello"}]
    first = client.chat.completions.create(model="mario", messages=q)
    again = client.chat.completions.create(model="mario", messages=q)
    assert first.usage.completion_tokens == 5 and first.choices[0].finish_reason == "length"
    assert again.choices[0].message.content == first.choices[0].message.content  # temperature 0: greedy
    # SYSTEM then the MESSAGE turns were put before the user's message: spelled out, the same prompt
    explicit = [
        {"role": "system", "content": "You are Mario from Super Mario Bros."},
        {"role": "user", "content": "Is Toronto in Canada?"},
        {"role": "assistant", "content": "yes"},
        *q,
    ]
    spelled = client.chat.completions.create(model="tiny", messages=explicit, temperature=0, max_tokens=5)
    assert spelled.usage.prompt_tokens == first.usage.prompt_tokens
    assert spelled.choices[0].message.content == first.choices[0].message.content
    assert info.engine.model_info("mario").context_length == 512  # num_ctx


def test_request_values_win(mario_server):
    _, client = mario_server
    q = [{"role": "user", "content": "Hello"}]
    base = client.chat.completions.create(model="mario", messages=q)
    short = client.chat.completions.create(model="mario", messages=q, max_tokens=3)
    assert short.usage.completion_tokens == 3
    own_system = client.chat.completions.create(model="mario", messages=[{"role": "system", "content": "Hi"}, *q])
    assert own_system.usage.prompt_tokens < base.usage.prompt_tokens  # the request's system replaced SYSTEM
    sampled = {
        client.chat.completions.create(model="mario", messages=q, temperature=1.5, seed=s).choices[0].message.content
        for s in range(4)
    }
    assert sampled != {base.choices[0].message.content}  # temperature 1.5 overrode temperature 0
    legacy = client.completions.create(model="mario", prompt="Once upon a time")
    assert legacy.usage.completion_tokens == 5  # num_predict also sets the legacy default (16)
    assert client.completions.create(model="mario", prompt="Once", max_tokens=2).usage.completion_tokens == 2
