"""Sampling defaults from a model's ``generation_config.json`` (store/generation_defaults.py).

Parsed on its own; then on a real server with a pulled tiny Llama whose config asks for
greedy decoding, where a request's own values and a Modelfile's PARAMETERs still win; and
on the packaged SmolLM2, whose converted directory carries its model card's sampling.
"""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from click.testing import CliRunner

from tests.server_fixtures import make_test_config, running_server
from xllm_jupyter.cli.main import main
from xllm_jupyter.store import ModelStore
from xllm_jupyter.store.create import model_defaults
from xllm_jupyter.store.generation_defaults import sampling_defaults

Q = [{"role": "user", "content": "Hello"}]


def _config(path, **values) -> None:
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, **values}))


def test_sampling_keys_under_ollama_names(tmp_path):
    _config(tmp_path, do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, min_p=0.05,
            max_new_tokens=512)
    assert sampling_defaults(tmp_path) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repeat_penalty": 1.05,
                                           "min_p": 0.05}


@pytest.mark.parametrize("values", [
    {"temperature": 2.5}, {"temperature": -1}, {"temperature": "0.7"}, {"temperature": True},
    {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"top_k": 2.5}, {"repetition_penalty": 0}, {"min_p": 2},
    {"temperature": None},
])
def test_values_outside_the_api_range_are_skipped(tmp_path, values):
    kept = {"top_k": 5} if "top_k" not in values else {"temperature": 0.5}
    _config(tmp_path, **kept, **values)
    assert sampling_defaults(tmp_path) == kept  # the bad value alone is dropped


def test_missing_or_broken_files_give_no_defaults(tmp_path):
    assert sampling_defaults(None) == {} and sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    assert sampling_defaults(tmp_path) == {}


@pytest.fixture(scope="module")
def greedy_store(tmp_path_factory, tiny_llama_dir):
    """A store with the tiny Llama pulled as "greedy" (its config: temperature 0) and "mario" made from it."""
    src = tmp_path_factory.mktemp("greedy-src") / "m"
    shutil.copytree(tiny_llama_dir, src)
    _config(src, do_sample=False, temperature=0.0, top_k=7)
    store = ModelStore(tmp_path_factory.mktemp("greedy-home"))
    store.pull(str(src), "greedy")
    store.create("hot", "FROM greedy\nPARAMETER temperature 1.5\n")
    return store


def test_defaults_merge_under_the_modelfile(greedy_store):
    assert model_defaults(greedy_store.show("greedy")).parameters == {"temperature": 0.0, "top_k": 7}
    # a Modelfile's PARAMETER wins over the config it inherits
    assert model_defaults(greedy_store.show("hot")).parameters == {"temperature": 1.5, "top_k": 7}


def test_server_applies_generation_config_and_requests_win(greedy_store):
    config = make_test_config(greedy_store.home)
    with running_server(config, greedy_store, "greedy") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=60) as client:
            def text(model: str, **kw) -> str:
                r = client.chat.completions.create(model=model, messages=Q, max_tokens=12,
                                                   extra_body={"ignore_eos": True}, **kw)
                return r.choices[0].message.content

            greedy = text("greedy")
            assert {text("greedy") for _ in range(3)} == {greedy}  # temperature 0 from generation_config.json
            assert text("greedy", temperature=0) == greedy
            # the request's temperature wins: seeded samples differ from the greedy answer
            assert {text("greedy", temperature=1.5, seed=s) for s in range(4)} != {greedy}
            # the Modelfile's temperature 1.5 wins over the config it inherits
            assert {text("hot", seed=s) for s in range(4)} != {greedy}



def test_engine_default_max_tokens_caps_a_request_that_sets_none(greedy_store):
    """engine.default_max_tokens is the budget of a chat completion or response that sets none (it filled the
    context: a looping answer ran for minutes on a CPU); a Modelfile's num_predict and the request's own win."""
    import dataclasses

    greedy_store.create("short", "FROM greedy\nPARAMETER num_predict 3\n")
    config = make_test_config(greedy_store.home)
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, default_max_tokens=6))
    with running_server(config, greedy_store, "greedy") as info:
        with openai.OpenAI(base_url=info.base_url, api_key=info.api_key, max_retries=0, timeout=60) as client:
            def used(model: str, **kw) -> tuple[int, str]:
                r = client.chat.completions.create(model=model, messages=Q, extra_body={"ignore_eos": True}, **kw)
                return r.usage.completion_tokens, r.choices[0].finish_reason

            assert used("greedy") == (6, "length")
            assert used("greedy", max_tokens=9) == (9, "length")
            assert used("short") == (3, "length")  # the Modelfile's num_predict wins over the engine's default
            streamed = client.chat.completions.create(model="greedy", messages=Q, stream=True,
                                                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            assert [c.usage.completion_tokens for c in streamed if c.usage] == [6]
            response = client.responses.create(model="greedy", input="Hello", extra_body={"ignore_eos": True})
            assert response.usage.output_tokens == 6
            # legacy completions keep OpenAI's own default of 16
            legacy = client.completions.create(model="greedy", prompt="Hello", extra_body={"ignore_eos": True})
            assert legacy.usage.completion_tokens == 16


def test_packaged_smollm2_carries_its_card_sampling(smollm2_home, monkeypatch):
    manifest = ModelStore(smollm2_home).show("smollm2")
    config = json.loads((manifest.path / "generation_config.json").read_text())
    assert config["temperature"] == 0.2 and config["top_p"] == 0.9 and config["do_sample"] is True
    assert "generation_config.json" in {f.path for f in manifest.files}  # hashed with the rest
    assert model_defaults(manifest).parameters == {"temperature": 0.2, "top_p": 0.9}
    monkeypatch.setenv("XLLM_HOME", str(smollm2_home))
    shown = CliRunner().invoke(main, ["show", "smollm2"], catch_exceptions=False)
    assert shown.exit_code == 0 and "defaults  temperature=0.2, top_p=0.9" in shown.output, shown.output
