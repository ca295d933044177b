"""ChatWidget, ProfileWidget and CompareWidget driven through their Python state against the real server."""

from __future__ import annotations

import json
import time

import ipywidgets as W
import pytest

import xllm_jupyter
from tests.server_fixtures import TINY
from xllm_jupyter.widgets import ChatWidget, CompareWidget, ProfileWidget

PNG = b"\x89PNG\r\n\x1a\n"
DEAD = ("http://127.0.0.1:9/v1", None)  # nothing listens on the discard port


@pytest.fixture
def endpoint(xllm_server):
    return (xllm_server.base_url, xllm_server.api_key)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ----------------------------------------------------------------------- chat
def test_chat_widget_streams_a_conversation(make, endpoint):
    w = make(ChatWidget, client=endpoint, params={"ignore_eos": True})
    assert isinstance(w, W.VBox) and w.model_picker.value == TINY and TINY in w.model_picker.options
    w.temperature.value, w.max_tokens.value = 0.0, 6
    w.system_prompt.value = "You are terse."
    w.input.value = "Hello <there>\n"  # Enter in the box adds a newline: not sent
    w.send_button.click()
    assert w.wait(60)
    assert w.input.value == "" and not w.busy
    assert [m["role"] for m in w.messages] == ["user", "assistant"]
    assert w.messages[0]["content"] == "Hello <there>" and w.messages[1]["content"]
    assert w.last.completion_tokens == 6 and w.last.ttft_s > 0
    assert "6 tokens in" in w.status.value
    assert "Stopped at the max tokens limit" in w.status.value  # (ignore_eos: the reply ran into max tokens)
    assert "Hello &lt;there&gt;" in w.transcript.value  # user text is escaped, not rendered
    assert not w.send_button.disabled and w.stop_button.disabled and w.stop_button.button_style == ""
    # the widget sent what chat() sends: same greedy reply
    expected = xllm_jupyter.chat("Hello <there>", TINY, system="You are terse.", client=endpoint, temperature=0.0, top_p=1.0, max_tokens=6, ignore_eos=True)
    assert w.messages[1]["content"] == expected
    # a second turn carries the history
    assert w.ask("And then?")
    assert w.wait(60)
    assert [m["role"] for m in w.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["role"] for m in w.request_messages()] == ["system", "user", "assistant", "user", "assistant"]



def test_chat_widget_sends_only_the_settings_the_user_chose(make, endpoint):
    w = make(ChatWidget, TINY, client=endpoint)
    assert w.request_params() == {} and "model defaults" in w.settings_note.value
    w.temperature.value = 0.3
    assert w.request_params() == {"temperature": 0.3}
    assert "top p, max tokens" in w.settings_note.value
    w.defaults_button.click()
    assert w.request_params() == {} and w.temperature.value == 1.0 and "model defaults" in w.settings_note.value
    given = make(ChatWidget, TINY, client=endpoint, max_tokens=4, params={"seed": 1})
    assert given.request_params() == {"max_tokens": 4, "seed": 1}


def test_chat_widget_leaves_a_created_models_settings_in_force(make, endpoint, xllm_home):
    from xllm_jupyter.client import XllmClient
    from xllm_jupyter.store.store import ModelStore

    store = ModelStore(xllm_home)
    store.create("widget-brief", f"FROM {TINY}\nPARAMETER num_predict 2\n")
    try:
        w = make(ChatWidget, "widget-brief", client=endpoint, params={"ignore_eos": True})
        w.ask("hello")
        assert w.wait(60) and w.last.completion_tokens == 2  # the Modelfile's num_predict, not the widget's
        w.max_tokens.value = 3
        w.ask("again")
        assert w.wait(60) and w.last.completion_tokens == 3  # chosen in the widget: it wins
    finally:
        with XllmClient(*endpoint) as c:
            c.unload("widget-brief")
        store.rm("widget-brief")

def test_chat_widget_stop_cancels_on_the_server(make, endpoint, xllm_server):
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    w = make(ChatWidget, TINY, client=endpoint, max_tokens=1500, params={"ignore_eos": True})
    w.input.value = "Go on forever"
    w.send_button.click()
    assert wait_for(lambda: len(w.messages) == 2 and w.messages[1]["content"]), w.status.value
    assert w.busy and w.send_button.disabled and not w.stop_button.disabled
    # only a Stop that can act is drawn in the warning colour (a disabled one looked enabled)
    assert w.stop_button.button_style == "warning"
    w.stop_button.click()
    assert w.wait(30)
    assert "Stopped" in w.status.value and w.last.cancelled
    assert 0 < w.last.completion_tokens < 1500 and w.messages[1]["content"]
    assert wait_for(lambda: engine.stats(TINY).cancelled > before), "the server kept generating"
    assert not w.send_button.disabled and w.stop_button.button_style == ""


def test_chat_widget_exports_clears_and_reports_errors(make, endpoint, tmp_path):
    # seeded: an empty reply (an end token drawn first) is not kept, and the transcript then lacks the turn
    w = make(ChatWidget, TINY, client=endpoint, max_tokens=3, system="Sys", params={"seed": 7})
    assert w.ask("One") and w.wait(60)
    md = w.export(tmp_path / "t.md").read_text()
    assert md.startswith(f"# Chat with {TINY}") and "**System:**" in md and "**You:**\n\nOne" in md
    w.export_format.value = "json"
    assert w.export_path.value == "transcript.json"
    w.export_path.value = str(tmp_path / "t.json")
    w.export_button.click()
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["model"] == TINY and data["params"]["max_tokens"] == 3
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert "Wrote" in w.status.value
    w.export_path.value = str(tmp_path / "missing-dir" / "t.json")
    w.export_button.click()
    assert "Export failed" in w.status.value and "Traceback" not in w.status.value

    w.clear_button.click()
    assert w.messages == [] and "No messages" in w.transcript.value
    assert not w.ask("   ") and "Type a message" in w.status.value

    w.params = {"n": 3}
    assert not w.ask("hi") and "cannot be set" in w.status.value and w.messages == []

    bad = make(ChatWidget, "no-such-model", client=endpoint)
    assert bad.ask("hi") and bad.wait(30)
    assert "Error:" in bad.status.value and "no-such-model" in bad.status.value
    assert bad.messages == []  # neither the empty reply nor the failed question is kept

    dead = make(ChatWidget, client=DEAD)
    assert dead.model_picker.options == () and "no xllm server" in dead.status.value
    dead.input.value = "hi"
    dead.send_button.click()
    assert not dead.busy and "No model" in dead.status.value


def test_chat_widget_drops_a_failed_turn(make, endpoint):
    w = make(ChatWidget, TINY, client=endpoint, temperature=0.0, max_tokens=3)
    assert w.ask("One") and w.wait(60)
    w.params = {"temperature": 9}  # the server refuses it (400)
    assert w.ask("Two") and w.wait(60)
    assert "Error:" in w.status.value and "temperature" in w.status.value
    assert [m["content"] for m in w.messages if m["role"] == "user"] == ["One"]  # "Two" is not sent again
    w.params = {}
    assert w.ask("Three") and w.wait(60)
    assert "tokens in" in w.status.value, w.status.value
    assert [m["role"] for m in w.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in w.messages if m["role"] == "user"] == ["One", "Three"]


def test_widgets_default_to_xllm_model(make, endpoint, monkeypatch):
    monkeypatch.setenv("XLLM_MODEL", "env-model")
    for cls in (ChatWidget, ProfileWidget):
        w = make(cls, client=endpoint)
        assert w.model_picker.value == "env-model" and TINY in w.model_picker.options, cls.__name__
    assert make(ChatWidget, TINY, client=endpoint).model_picker.value == TINY  # model= still wins
    monkeypatch.delenv("XLLM_MODEL")
    assert make(ProfileWidget, client=endpoint).model_picker.value == TINY


# -------------------------------------------------------------------- profile
def test_profile_widget_runs_and_exports(make, endpoint, tmp_path):
    w = make(ProfileWidget, client=endpoint, max_tokens=3)
    assert isinstance(w, W.VBox) and w.model_picker.value == TINY
    # no plot tabs before there is a figure (an empty Image is a broken-image icon in the page)
    assert w.plots.layout.display == "none"
    w.concurrency.value, w.prompt_tokens.value = "1, 2", "8"
    w.run_button.click()
    assert w.wait(120), w.status.value
    assert w.plots.layout.display != "none"
    assert w.result is not None, w.status.value
    assert len(w.result.frame) == 3 and (w.result.frame["completion_tokens"] == 3).all()
    assert w.progress.value == w.progress.max == 2
    assert "Done: 3 requests" in w.status.value and "<table" in w.table.value
    for name in ("throughput", "ttft", "tok_per_s", "itl", "memory"):
        assert bytes(w.images[name].value).startswith(PNG), name
    pngs = w.export_png(tmp_path / "png")
    assert sorted(p.name for p in pngs) == ["itl.png", "memory.png", "throughput.png", "tok_per_s.png", "ttft.png"]
    w.export_dir.value = str(tmp_path / "csv")
    w.export_csv_button.click()
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["itl.csv", "memory.csv", "requests.csv", "summary.csv"]

    w.concurrency.value = "one, two"
    w.run_button.click()
    assert not w.busy and "whole numbers" in w.status.value


def test_profile_widget_is_never_left_busy(make, endpoint, monkeypatch):
    import xllm_jupyter.widgets.profile as profile_widget

    def broken(fig):
        raise RuntimeError("no PNG today")

    monkeypatch.setattr(profile_widget, "figure_png", broken)  # drawing the result fails
    w = make(ProfileWidget, TINY, client=endpoint, concurrency=(1,), prompt_tokens=(8,), max_tokens=2)
    w.run_button.click()
    assert w.wait(60)
    assert "Profile failed: RuntimeError: no PNG today" in w.status.value, w.status.value
    assert not w.run_button.disabled and w.stop_button.disabled


def test_profile_widget_watches_the_server_live(make, endpoint, tmp_path):
    w = make(ProfileWidget, TINY, client=endpoint, interval=0.1)
    assert w.plots.layout.display == "none"
    w.watch_button.click()
    assert w.busy and w.run_button.disabled
    assert wait_for(lambda: len(w.samples) >= 2), w.status.value
    xllm_jupyter.chat("count", TINY, client=endpoint, max_tokens=20, ignore_eos=True)
    assert wait_for(lambda: len(w.samples) and (w.samples["gen_tok_per_s"] > 0).any()), w.samples
    w.stop_button.click()
    assert w.wait(10)
    assert "Live view stopped" in w.status.value and not w.run_button.disabled
    assert bytes(w.images["live"].value).startswith(PNG) and w.plots.layout.display != "none"
    assert (w.samples["memory_bytes"] > 0).all()
    assert [p.name for p in w.export_csv(tmp_path)] == ["live.csv"]
    assert [p.name for p in w.export_png(tmp_path)] == ["live.png"]


def test_profile_widget_without_a_server_says_so(make):
    w = make(ProfileWidget, client=DEAD, interval=0.1)
    assert "no xllm server" in w.status.value
    w.run_button.click()
    assert "No model" in w.status.value
    w.watch_button.click()
    assert w.wait(20)
    assert "Live view ended" in w.status.value and "no xllm server" in w.status.value


# -------------------------------------------------------------------- compare
def test_compare_widget_side_by_side_with_diff(make, endpoint):
    settings = [{"temperature": 0, "ignore_eos": True}, {"temperature": 1.5, "seed": 3, "ignore_eos": True}]
    w = make(CompareWidget, TINY, settings=settings, prompt="Write", max_tokens=6, client=endpoint)
    assert isinstance(w, W.VBox) and w.models.value == (TINY,)
    w.run_button.click()
    assert w.wait(60), w.status.value
    assert "Done" in w.status.value
    frame = w.result.frame
    assert len(frame) == 2 and (frame["completion_tokens"] == 6).all()
    assert len(w.columns.children) == 2
    assert all("6 tokens" in f.value and "tok/s" in f.value for f in w._footers)
    assert list(w.diff_a.options) == w.result.labels and w.diff_b.value == w.result.labels[1]
    assert "<del" in w.diff_view.value or "<ins" in w.diff_view.value
    w.diff_mode.value = "unified"
    assert w.diff_view.value.startswith("<pre>")
    # models mode: one column per selected model
    w.settings.value = ""
    w.run_button.click()
    assert w.wait(60) and len(w.result.frame) == 1 and w.result.labels == [TINY]


def test_compare_widget_runs_again_with_new_labels(make, endpoint):
    w = make(CompareWidget, TINY, settings=[{"temperature": 0}, {"temperature": 1.2, "seed": 1}], prompt="Say hi", max_tokens=3, client=endpoint)
    w.run_button.click()
    assert w.wait(60) and "Done" in w.status.value, w.status.value
    first = w.result.labels
    w.settings.value = '{"temperature": 0, "seed": 5}\n{"top_p": 0.5, "seed": 6}'
    w.run_button.click()
    assert w.wait(60)
    assert set(w.result.labels).isdisjoint(first)
    assert "Done" in w.status.value, w.status.value  # not stuck "Streaming…"
    assert not w.run_button.disabled and w.stop_button.disabled
    assert (w.diff_a.value, w.diff_b.value) == tuple(w.result.labels) and list(w.diff_b.options) == w.result.labels
    assert w.diff_view.value  # the new pair's diff is drawn
    w.diff_mode.value = "unified"
    assert w.diff_view.value.startswith("<pre>")


def test_compare_widget_stop_and_bad_input(make, endpoint, xllm_server):
    engine = xllm_server.engine
    before = engine.stats(TINY).cancelled
    settings = [{"ignore_eos": True, "seed": 1}, {"ignore_eos": True, "seed": 2}]
    w = make(CompareWidget, TINY, settings=settings, prompt="Go", max_tokens=1500, client=endpoint)
    w.run_button.click()
    assert wait_for(lambda: all(r.pieces for r in w._records)), w.status.value
    w.stop_button.click()
    assert w.wait(30)
    assert "Stopped" in w.status.value and all(r.cancelled for r in w.result.records)
    assert all(0 < r.completion_tokens < 1500 for r in w.result.records)
    assert wait_for(lambda: engine.stats(TINY).cancelled >= before + 2), "the server kept generating"

    w.settings.value = "{not json"
    w.run_button.click()
    assert not w.busy and "settings" in w.status.value
    w.settings.value, w.prompt.value = "", " "
    w.run_button.click()
    assert not w.busy and "prompt is empty" in w.status.value
    # nothing picked: the message speaks of the widget's controls, not of compare()'s arguments
    w.models.value, w.prompt.value = (), "Go"
    w.run_button.click()
    assert not w.busy and "Pick models" in w.status.value and "models=[" not in w.status.value, w.status.value


def test_controls_are_labelled_and_status_follows_the_theme(make, endpoint):
    """Every text control has a visible label (its accessible name), long labels are not cut,
    and status colours come from JupyterLab's theme so they stay readable in a dark theme."""
    chat = make(ChatWidget, client=endpoint)
    profile = make(ProfileWidget, client=endpoint)
    assert chat.input.description == "Message"
    assert chat.export_format.description and chat.export_path.description
    # the description is each box's <label for> (its accessible name); its tooltip says what a short one means
    for box in (chat.system_prompt, chat.input, chat.export_path):
        assert box.description and box.tooltip and box.tooltip != box.placeholder, box
    for control in (chat.temperature, profile.concurrency, profile.prompt_tokens):
        assert control.style.description_width == "initial", control.description
    chat.ask("")  # nothing typed: an error status
    assert "var(--jp-error-color1" in chat.status.value and "Type a message first." in chat.status.value


def test_profile_widget_says_which_requests_failed(make, endpoint):
    """A sweep point the server refuses (a prompt past the tiny model's 2,048-token context) is no "Done" in green:
    the status counts the failed requests and says why; ``profile()``'s own display does too."""
    w = make(ProfileWidget, TINY, client=endpoint, concurrency=(1,), prompt_tokens=(8, 4000), max_tokens=2)
    w.run_button.click()
    assert w.wait(120), w.status.value
    status = w.status.value
    assert "Done: 2 requests, 1 failed" in status and "maximum context length" in status, status
    assert "error-color" in status and "best aggregate" in status, status
    shown = w.result._repr_html_()
    assert "1 of 2 requests failed" in shown and "maximum context length" in shown and "<th>errors</th>" in shown
    # every request refused: no "best aggregate nan tok/s", and the widget is not left busy
    w.prompt_tokens.value = "4000"
    w.run_button.click()
    assert w.wait(120), w.status.value
    assert "Done: 1 requests, 1 failed" in w.status.value and "nan" not in w.status.value, w.status.value
    assert not w.run_button.disabled
