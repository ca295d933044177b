"""A model's own generation defaults in ``/v1/models`` (``xllm.defaults``), and the chat UIs' sliders starting there.

The ChatWidget showed temperature 1.00 / top p 1.00 and the playground 0.7 / 1 while a request that left them unset
got the model's own (SmolLM2's card asks for 0.2 / 0.9): the sliders said one thing and the model did another.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import openai
import pytest

from tests.server_fixtures import make_test_config, running_server
from xllm_jupyter.store import ModelStore

GREEDY = {"temperature": 0.0, "top_p": 0.85, "top_k": 7}  # its generation_config.json, under the request's names
HOT = {**GREEDY, "temperature": 1.5, "max_tokens": 5}  # a Modelfile over it: PARAMETER temperature, num_predict


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    """A server with "greedy" (its own sampling) and "hot" (created from it) loaded, and "cold" (like hot) not."""
    src = tmp_path_factory.mktemp("defaults-src") / "m"
    shutil.copytree(tiny_llama_dir, src)
    (src / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.0, "top_p": 0.85, "top_k": 7}))
    store = ModelStore(tmp_path_factory.mktemp("defaults-home"))
    store.pull(str(src), "greedy")
    store.create("hot", "FROM greedy\nPARAMETER temperature 1.5\nPARAMETER num_predict 5\n")
    store.create("cold", "FROM hot\n")
    with running_server(make_test_config(store.home), store, "greedy") as info:
        info.call(info.engine.load("hot"), timeout=120)
        yield info


def test_models_list_each_models_defaults_beside_the_openai_fields(server):
    with openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0) as client:
        greedy = client.models.retrieve("greedy")
        hot = client.models.retrieve("hot")
        listed = {m.id: m for m in client.models.list()}
    assert (greedy.id, greedy.object, greedy.owned_by) == ("greedy", "model", "xllm") and greedy.created > 0
    assert greedy.model_extra["xllm"]["defaults"] == GREEDY  # what its load read
    assert hot.model_extra["xllm"]["defaults"] == HOT
    assert listed["greedy"].model_extra["xllm"]["defaults"] == GREEDY
    assert listed["hot"].model_extra["xllm"]["defaults"] == HOT
    # not loaded: what the store says its load would read (was left out: only a loaded model's were known)
    cold = listed["cold"].model_extra["xllm"]
    assert cold["loaded"] is False and cold["defaults"] == HOT


def test_chat_widget_settings_start_at_the_picked_models_defaults(server):
    from xllm_jupyter.widgets import ChatWidget

    w = ChatWidget("greedy", client=(server.base_url, server.api_key))
    try:
        assert (w.temperature.value, w.top_p.value, w.max_tokens.value) == (0.0, 0.85, 512)
        assert w.chosen == set() and w.request_params() == {}  # shown, not sent
        w.model_picker.value = "hot"
        assert (w.temperature.value, w.top_p.value, w.max_tokens.value) == (1.5, 0.85, 5)
        assert w.chosen == set()
        w.top_p.value = 0.5  # the user's choice stays across models; the rest follow the model
        w.model_picker.value = "greedy"
        assert (w.temperature.value, w.top_p.value) == (0.0, 0.5) and w.request_params() == {"top_p": 0.5}
        w.use_model_defaults()
        assert w.top_p.value == 0.85 and w.chosen == set()
        w.model_picker.value = "cold"  # not loaded: the store's word
        assert (w.temperature.value, w.max_tokens.value) == (1.5, 5)
    finally:
        w.close()
    w = ChatWidget("hot", client=(server.base_url, server.api_key), temperature=0.3)
    try:
        assert (w.temperature.value, w.max_tokens.value) == (0.3, 5) and w.chosen == {"temperature"}
    finally:
        w.close()


def test_chat_widget_model_defaults_button_reads_them_again(server):
    """A model re-created while its ChatWidget was open (`xllm create`, `%xllm create`) has new defaults; the widget
    showed the ones it read when it was built, "Model defaults" too, while requests got the new ones."""
    from xllm_jupyter.widgets import ChatWidget

    store = ModelStore(server.config.store.home)
    store.create("warm", "FROM greedy\nPARAMETER temperature 0.5\n")
    w = ChatWidget("warm", client=(server.base_url, server.api_key))
    try:
        assert w.temperature.value == 0.5
        store.create("warm", "FROM greedy\nPARAMETER temperature 1.25\nPARAMETER num_predict 9\n")  # as `xllm create`
        w.temperature.value = 0.2
        w.use_model_defaults()
        assert (w.temperature.value, w.top_p.value, w.max_tokens.value) == (1.25, 0.85, 9) and w.chosen == set()
    finally:
        w.close()
        store.rm("warm")


def test_playground_sliders_start_at_the_models_defaults(server):
    pytest.importorskip("gradio")
    from xllm_jupyter.playground.app import SHOWN, Endpoint, build_app, model_settings
    from xllm_jupyter.playground.launcher import first_settings

    endpoint = Endpoint(server.base_url, server.api_key)
    assert first_settings(endpoint, "greedy") == {"temperature": 0.0, "top_p": 0.85, "max_tokens": 256}
    assert asyncio.run(model_settings(endpoint, "hot")) == {"temperature": 1.5, "top_p": 0.85, "max_tokens": 5}
    assert first_settings(endpoint, "no-such-model") == SHOWN == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 256}

    config = build_app(endpoint, ["greedy", "hot"], "greedy", settings=first_settings(endpoint, "greedy")).get_config_file()
    sliders = {c["props"]["label"]: c for c in config["components"] if c.get("type") == "slider"}
    assert {k: v["props"]["value"] for k, v in sliders.items()} == {"Temperature": 0.0, "Top p": 0.85, "Max tokens": 256}
    # another model picked (or the defaults turned on again) sets the sliders, the user's own moves only turn them off
    picker = next(c["id"] for c in config["components"] if c.get("props", {}).get("label") == "Model")
    shows = [d for d in config["dependencies"] if [picker, "input"] in [list(t) for t in d["targets"]]]
    assert shows and set(shows[0]["outputs"]) == {c["id"] for c in sliders.values()}


def test_playground_page_sliders_follow_the_picked_model(server, monkeypatch):
    """In a browser: picking another model moves the sliders to its defaults while "The model's defaults" is on; a
    slider the user moved turns that off and stays; turning it on again shows the model's own once more."""
    pytest.importorskip("gradio")
    import xllm_jupyter
    import xllm_jupyter.playground as playground_package
    from tests.browser import chromium, require_browser

    require_browser()
    monkeypatch.setattr(playground_package, "_started", [])  # replaces no playground started elsewhere
    pg = xllm_jupyter.playground("greedy", client=(server.base_url, server.api_key), inline=False)
    try:
        with chromium() as context:
            page = context.new_page()
            page.goto(pg.local_url, timeout=60_000)
            temperature = page.get_by_label("number input for Temperature")
            max_tokens = page.get_by_label("number input for Max tokens")
            temperature.wait_for(timeout=60_000)
            assert (temperature.input_value(), max_tokens.input_value()) == ("0", "256")

            def pick(name: str) -> None:
                page.get_by_role("combobox", name="Model").click()
                page.get_by_role("option", name=name).click()

            def shows(value: str) -> None:
                page.wait_for_function("([el, v]) => el.value === v", arg=[temperature.element_handle(), value],
                                       timeout=30_000)

            pick("hot")
            shows("1.5")
            assert max_tokens.input_value() == "5"
            temperature.fill("0.4")
            temperature.press("Enter")
            defaults = page.get_by_role("checkbox", name="The model's defaults")
            page.wait_for_function("el => !el.checked", arg=defaults.element_handle(), timeout=30_000)
            pick("greedy")
            defaults.check()  # greedy's own again: picking it with the defaults off left the user's 0.4
            shows("0")
    finally:
        pg.close()
