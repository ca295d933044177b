"""The Gradio playground, driven for real: the session's tiny server, a launched app, gradio_client."""

from __future__ import annotations

import re
import sys
import time

import httpx
import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import xllm_jupyter
from tests.playground_pages import wait_for_turns
from xllm_jupyter.client import XllmClient
from xllm_jupyter.core.errors import XllmError
from xllm_jupyter.playground import Playground, detect_root_path
from xllm_jupyter.playground.app import (
    CUT_NOTE,
    ERROR_PREFIX,
    part_text,
    sampling,
    to_openai_messages,
)
from xllm_jupyter.playground.launcher import port_is_free


@pytest.fixture(scope="module")
def pg(tiny_client):
    """One playground for the module, closed (and its port checked) at the end."""
    app = xllm_jupyter.playground(client=tiny_client)
    try:
        yield app
    finally:
        app.close()


def final_text(job) -> str:
    """The assistant text in the last streamed output of a gradio_client job."""
    outputs = job.outputs()
    assert outputs, "the chat endpoint streamed nothing"
    history = outputs[-1][0]
    assert history[-1]["role"] == "assistant"
    return part_text(history[-1]["content"])


def test_a_streamed_chat_through_gradio_client_returns_text(pg, xllm_server):
    assert pg.model == "tiny"
    client = gradio_client.Client(pg.local_url, verbose=False)
    # Sampled with a seed: the random-weight model's greedy answer is only newlines.
    job = client.submit(
        "Say hello", [], "tiny", "", 1.0, 1.0, 200, 7, False, api_name=pg.api_name
    )
    job.result(timeout=120)
    outputs = job.outputs()
    # Streaming: the transcript arrives in several updates, each one extending the last
    # (200 tokens: the engine merges the tokens of each 16 ms into one delta).
    assert len(outputs) >= 3, outputs
    texts = [part_text(o[0][-1]["content"]) for o in outputs]
    assert texts[-1].strip(), "no answer text"
    assert len(set(texts)) >= 3
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    history = outputs[-1][0]
    assert part_text(history[-2]["content"]) == "Say hello"
    # The model, sampling parameters and seed reached the server: a direct request agrees.
    with XllmClient(xllm_server.base_url, xllm_server.api_key) as direct:
        expected = direct.chat(
            "Say hello", "tiny", temperature=1.0, top_p=1.0, max_tokens=200, seed=7
        )
    # (cut at the 200 tokens, the reply ends with the app's note saying so)
    assert texts[-1].strip() in (expected.strip(), f"{expected}\n\n{CUT_NOTE}".strip())



def test_the_models_defaults_are_sent_unless_a_setting_is_chosen(pg, xllm_server, xllm_home):
    from xllm_jupyter.store.store import ModelStore

    store = ModelStore(xllm_home)
    store.create("pg-brief", "FROM tiny\nPARAMETER num_predict 2\nPARAMETER temperature 1\n")
    client = gradio_client.Client(pg.local_url, verbose=False)
    try:
        with XllmClient(xllm_server.base_url, xllm_server.api_key) as direct:
            # the checkbox on (the app's default): the Modelfile's num_predict 2 applies, not the 200 shown
            job = client.submit("Say hello", [], "pg-brief", "", 0.0, 1.0, 200, 5, True, api_name=pg.api_name)
            job.result(timeout=120)
            # (cut at those 2 tokens, the reply ends with the app's note saying so)
            assert final_text(job).removesuffix(CUT_NOTE).strip() == direct.chat("Say hello", "pg-brief", seed=5).strip()
            # off: the settings shown are sent (greedy, 200 tokens)
            job = client.submit("Say hello", [], "pg-brief", "", 0.0, 1.0, 200, 5, False, api_name=pg.api_name)
            job.result(timeout=120)
            assert final_text(job).removesuffix(CUT_NOTE).strip() == direct.chat("Say hello", "pg-brief", temperature=0.0, top_p=1.0,
                                                          max_tokens=200, seed=5).strip()
    finally:
        with XllmClient(xllm_server.base_url, xllm_server.api_key) as direct:
            direct.unload("pg-brief")
        store.rm("pg-brief")

def test_stop_cancels_the_generation_on_the_server(pg, xllm_server):
    client = gradio_client.Client(pg.local_url, verbose=False)
    before = xllm_server.engine.stats()
    # 2000 sampled tokens take the tiny model several seconds; stop once the stream is flowing.
    job = client.submit(
        "Tell me a long story", [], "tiny", "", 1.0, 1.0, 2000, 1, False, api_name=pg.api_name
    )
    deadline = time.monotonic() + 120
    while len(job.outputs()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.cancel()
    deadline = time.monotonic() + 60
    while (
        xllm_server.engine.stats().cancelled == before.cancelled
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    after = xllm_server.engine.stats()
    assert after.cancelled == before.cancelled + 1, (
        "the server did not cancel the stopped generation"
    )
    assert after.completed == before.completed
    assert after.steps - before.steps < 2000


def test_server_errors_show_as_one_line_in_the_transcript(pg):
    client = gradio_client.Client(pg.local_url, verbose=False)
    job = client.submit(
        "hi", [], "no-such-model", "", 0.0, 1.0, 8, None, api_name=pg.api_name
    )
    job.result(timeout=60)
    text = final_text(job)
    assert text.startswith(ERROR_PREFIX) and "no-such-model" in text
    assert "Traceback" not in text


def test_inline_display_is_an_iframe_on_the_app(pg):
    page = pg._repr_html_()
    assert "<iframe" in page and f'src="{pg.url}"' in page
    # The URL carries the playground's secret path (see tests/test_playground_guard.py).
    assert re.fullmatch(rf"http://127\.0\.0\.1:{pg.port}/[\w-]{{43}}/", pg.url), pg.url
    assert pg.url == pg.local_url
    assert httpx.get(pg.local_url, timeout=30).status_code == 200


def test_close_frees_the_port_and_root_path_reaches_gradio(tiny_client):
    app = xllm_jupyter.playground(
        client=tiny_client, root_path="/user/alice/proxy/{port}/", inline=False, replace=False
    )
    # "{port}" in root_path stands for the port the playground picked.
    assert app.root_path == f"/user/alice/proxy/{app.port}"
    app.close()
    assert port_is_free(app.port)

    port = app.port
    env_root = detect_root_path(port, {"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"})
    app = xllm_jupyter.playground(
        client=tiny_client, port=port, root_path=env_root, inline=False, replace=False
    )
    try:
        # the proxied path, then the secret path the app is mounted under
        secret_path = app.local_url.split(str(port), 1)[1]
        assert app.url == f"/user/alice/proxy/{port}" + secret_path
        assert "<iframe" not in app._repr_html_() and app.url in app._repr_html_()
        # Gradio builds its browser URLs from the proxy prefix it was given.
        config = httpx.get(app.local_url + "config", timeout=30).json()
        assert config["root"].endswith(app.url.rstrip("/"))
        assert not port_is_free(port)
        with pytest.raises(XllmError, match="already in use"):
            xllm_jupyter.playground(client=tiny_client, port=port, replace=False)
    finally:
        app.close()
    assert port_is_free(port)
    assert "closed" in app._repr_html_()
    app.close()  # idempotent


def test_running_the_cell_again_replaces_the_app(tiny_client, capsys, monkeypatch):
    """A re-run cell closes the app the kernel started before and gets its port back."""
    # A kernel of its own: the module's shared playground is not one of "this kernel's" apps.
    monkeypatch.setattr(sys.modules["xllm_jupyter.playground"], "_started", [], raising=False)
    first = xllm_jupyter.playground(client=tiny_client)
    port = first.port
    try:
        # Bad arguments or an unreachable server must leave the running app alone.
        with pytest.raises(XllmError):
            xllm_jupyter.playground(client=XllmClient("http://127.0.0.1:9/v1", "k"))
        assert not first.closed and not port_is_free(port)
        capsys.readouterr()
        second = xllm_jupyter.playground(client=tiny_client)
    finally:
        first.close()
    try:
        assert first.closed and second.port == port  # the freed port, so the same URL
        assert f"closed the previous playground (port {port})" in capsys.readouterr().out
        assert httpx.get(second.local_url + "config", timeout=30).status_code == 200
        # the old app's secret path is gone with it
        assert httpx.get(first.local_url + "config", timeout=30).status_code == 404
        third = xllm_jupyter.playground(client=tiny_client, replace=False)
        third.close()
        assert not second.closed
    finally:
        second.close()


def test_root_path_detection():
    assert detect_root_path(7860, {}) is None
    assert (
        detect_root_path(7861, {"JUPYTERHUB_SERVICE_PREFIX": "/user/bob/"})
        == "/user/bob/proxy/7861"
    )
    env = {
        "XLLM_PLAYGROUND_ROOT_PATH": "/lab/proxy/{port}/",
        "JUPYTERHUB_SERVICE_PREFIX": "/user/bob/",
    }
    assert detect_root_path(7862, env) == "/lab/proxy/7862"


def test_history_becomes_openai_messages():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "assistant",
            "content": f"partial\n\n{ERROR_PREFIX}the server went away",
        },
    ]
    messages = to_openai_messages(history, "Next?", "Be brief.")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "assistant", "content": "partial"},
        {"role": "user", "content": "Next?"},
    ]


def test_bad_input_is_a_clear_error(tiny_client):
    with pytest.raises(XllmError, match="port"):
        xllm_jupyter.playground(client=tiny_client, port=-1)
    with pytest.raises(XllmError, match="whole number"):
        sampling(1.0, 1.0, 8, "abc")
    assert sampling(None, None, None, " 42 ") == {"seed": 42}
    assert sampling(0.5, None, 16, "") == {"temperature": 0.5, "max_tokens": 16}
    with pytest.raises(XllmError, match="client="):
        xllm_jupyter.playground(client=42)
    with pytest.raises(XllmError, match="no xllm server"):
        xllm_jupyter.playground(client=XllmClient("http://127.0.0.1:9/v1", "k"))


def test_the_package_is_callable_and_exports_the_class():
    import xllm_jupyter.playground as package

    assert isinstance(package.Playground, type) and package.Playground is Playground
    assert callable(xllm_jupyter.playground)


def test_the_model_picker_offers_only_chat_models(pg, xllm_server):
    """An embedding model (the packaged all-minilm) is listed by the server but not offered for chat."""
    from xllm_jupyter.client.base import can_chat
    from xllm_jupyter.playground.app import Endpoint
    from xllm_jupyter.playground.launcher import list_models

    with XllmClient(xllm_server.base_url, xllm_server.api_key) as direct:
        embedding = [m["id"] for m in direct.models() if not can_chat(m)]
    assert embedding, "the server lists no embedding model to leave out"
    models, _ = list_models(Endpoint(xllm_server.base_url, xllm_server.api_key))
    assert "tiny" in models
    assert not set(embedding) & set(models)


def test_clear_also_stops_the_reply_in_progress():
    """Clear (and the transcript's trash icon) end the page's replies as Stop does, from inside
    (test_playground_stop.py), not with Gradio's cancels=: a reply left running would refill the
    emptied transcript, and with cancels= an update already on its way did."""
    from xllm_jupyter.playground.app import Endpoint, build_app

    config = build_app(Endpoint("http://127.0.0.1:9/v1", None), ["tiny"], "tiny").get_config_file()
    by_label = {c["props"].get("value"): c["id"] for c in config["components"] if c.get("type") == "button"}
    chatbot = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "xllm-chatbot")

    def listeners(target: tuple[int, str]) -> list[dict]:
        found = [d for d in config["dependencies"] if [target[0], target[1]] in [list(t) for t in d["targets"]]]
        assert found, f"nothing listens to {target}"
        return found

    for target in ((by_label["Clear"], "click"), (chatbot, "clear"), (by_label["Stop"], "click")):
        assert all(d.get("backend_fn") and not d.get("cancels") for d in listeners(target)), target

def test_typing_the_next_question_while_a_reply_streams_is_kept(pg, xllm_server):
    """In a browser: the box empties when a question is sent, then is left alone, so the next
    question typed during a long reply survives it (every streamed update used to wipe it)."""
    from tests.browser import chromium, require_browser

    require_browser()
    before = xllm_server.engine.stats().completed
    with chromium() as context:
        page = context.new_page()
        page.goto(pg.local_url, timeout=60_000)
        box = page.locator("#xllm-input textarea")
        box.wait_for(timeout=60_000)
        page.get_by_label("number input for Max tokens").fill("2000")
        page.get_by_label("number input for Max tokens").press("Enter")
        page.get_by_role("textbox", name="Seed").fill("1")  # sampled: thousands of tokens, no early end
        box.fill("Tell me a long story")
        box.press("Enter")
        page.wait_for_selector("#xllm-chatbot [data-testid=bot]", timeout=60_000)  # the reply streams
        assert box.input_value() == ""
        box.fill("next question")
        deadline = time.monotonic() + 120
        while xllm_server.engine.stats().completed == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert xllm_server.engine.stats().completed > before, "the reply did not finish"
        page.wait_for_function("() => document.querySelectorAll('.generating').length === 0", timeout=60_000)
        assert box.input_value() == "next question"
        assert "Tell me a long story" in page.locator("#xllm-chatbot").inner_text()


def test_a_model_added_after_start_is_offered_to_the_next_page(pg, xllm_server, xllm_home):
    """The playground outlives many model changes (the panel's is started once per Jupyter
    server): a model created after it started is in the picker of a page opened later."""
    from tests.browser import chromium, require_browser
    from xllm_jupyter.store.store import ModelStore

    require_browser()
    store = ModelStore(xllm_home)
    store.create("pg-later", "FROM tiny\n")
    try:
        with chromium() as context:
            page = context.new_page()
            page.goto(pg.local_url, timeout=60_000)
            picker = page.get_by_role("combobox", name="Model")
            picker.wait_for(timeout=60_000)
            # the list is read again once the page has opened, after its first paint: look until it is there
            deadline = time.monotonic() + 60
            while True:
                picker.click()
                options = page.get_by_role("option")
                options.first.wait_for(timeout=30_000)
                names = [n.replace("✓", "").strip() for n in options.all_inner_texts()]
                if "pg-later" in names or time.monotonic() > deadline:
                    break
                page.reload()  # a fresh page, whose list is read again (an open dropdown would not redraw)
                picker.wait_for(timeout=60_000)
            assert "pg-later" in names and "tiny" in names, names
            assert "all-minilm" not in names  # still chat models only
    finally:
        store.rm("pg-later")


def test_a_question_sent_while_a_reply_streams_is_asked_after_it(pg, xllm_server):
    """In a browser: Enter during a reply used to do nothing (the text just sat in the box); the
    question is now asked when the reply ends, with that reply in its history."""
    from tests.browser import chromium, require_browser

    require_browser()
    with chromium() as context:
        page = context.new_page()
        page.goto(pg.local_url, timeout=60_000)
        box = page.locator("#xllm-input textarea")
        box.wait_for(timeout=60_000)
        page.get_by_label("number input for Max tokens").fill("400")
        page.get_by_label("number input for Max tokens").press("Enter")
        page.get_by_role("textbox", name="Seed").fill("1")  # sampled: no early end
        box.fill("Tell me a long story")
        box.press("Enter")
        page.wait_for_selector("#xllm-chatbot [data-testid=bot]", timeout=60_000)  # the reply streams
        box.fill("And another one")
        box.press("Enter")
        wait_for_turns(page, 2, timeout=180_000)
        users = page.locator("#xllm-chatbot [data-testid=user]").all_inner_texts()
        assert [u.strip() for u in users] == ["Tell me a long story", "And another one"]
        assert box.input_value() == ""


def test_only_the_chat_turns_and_the_pages_stream_keeper_use_the_queue():
    """Gradio 6 reads a page's queued events from one stream that the server ends when the page's
    last queued event completes; a question sent in that instant was never answered. The picker's
    refresh and the quick events stay off the queue; the chat turns and one page-long event that
    keeps the stream open (no outputs, no concurrency limit) are the queued events a page has."""
    from xllm_jupyter.playground.app import Endpoint, build_app

    app = build_app(Endpoint("http://127.0.0.1:9/v1", None), ["tiny"], "tiny")
    backend = [d for d in app.get_config_file()["dependencies"] if d.get("backend_fn")]
    queued = [d for d in backend if d.get("queue") is not False and not _on(d, "unload")]
    chats = [d for d in queued if not _on(d, "load")]
    assert len(chats) == 1, queued  # Enter and Send: one event (test_playground_queue.py says why)
    assert {t[1] for t in chats[0]["targets"]} == {"submit", "click"}
    assert chats[0].get("trigger_mode") == "always_last"
    keepers = [d for d in queued if _on(d, "load")]
    assert len(keepers) == 1 and keepers[0]["outputs"] == [], keepers
    assert app.fns[keepers[0]["id"]].concurrency_limit is None  # one per open page, never waiting for another
    refresh = [d for d in backend if _on(d, "load") and d not in keepers]
    assert refresh and all(d["queue"] is False for d in refresh), refresh
    assert [d for d in backend if _on(d, "unload")], "nothing ends the keeper when the page leaves"


def _on(dependency: dict, trigger: str) -> bool:
    return any(t[1] == trigger for t in dependency["targets"])


def test_the_first_question_right_after_a_page_opens_is_answered(pg, xllm_server, monkeypatch):
    """The page-open refresh of the picker used to be a queued event: a question sent just after it
    ended joined the queue while the page still took the ending stream for open, and got no reply
    (CI, loaded machine). The stream's end is held back here so that instant is long and sure."""
    import asyncio
    import threading

    import gradio.routes

    from tests.browser import chromium, require_browser
    from xllm_jupyter.playground import app as app_module

    require_browser()
    held, released = [], []
    streaming = gradio.routes.StreamingResponse

    class LateEnd(streaming):
        """Gradio's streamed response with its close_stream message sent 2 s late."""

        def __init__(self, content, *args, **kwargs):
            async def late():
                async for chunk in content:
                    if "close_stream" in str(chunk):
                        held.append(chunk)
                        await asyncio.sleep(2)
                        released.append(chunk)
                    yield chunk

            super().__init__(late(), *args, **kwargs)

    monkeypatch.setattr(gradio.routes, "StreamingResponse", LateEnd)
    refreshed = threading.Event()
    real = app_module.picker_choices

    async def picker_choices(*args, **kwargs):
        try:
            return await real(*args, **kwargs)
        finally:
            refreshed.set()

    monkeypatch.setattr(app_module, "picker_choices", picker_choices)
    with chromium() as context:
        page = context.new_page()
        page.goto(pg.local_url, timeout=60_000)
        box = page.locator("#xllm-input textarea")
        box.wait_for(timeout=60_000)
        # seeded: the random model's reply could start with an end token and leave no answer to wait for
        page.get_by_role("textbox", name="Seed").fill("1")
        assert refreshed.wait(60), "the page's load event did not run"
        box.fill("Say hello")
        box.press("Enter")
        page.wait_for_selector("#xllm-chatbot [data-testid=bot]", timeout=60_000)
        page.wait_for_function("() => document.querySelectorAll('.generating').length === 0", timeout=60_000)
        assert box.input_value() == ""
        assert "Say hello" in page.locator("#xllm-chatbot").inner_text()
        # what ended while the page was open (closing it ends the stream-keeping event: a close_stream
        # may follow, legitimately, before the check below runs)
        ended_while_open = list(held)
        # a stream end would be held too: let it out before the page goes (closing the page under a
        # held stream makes Gradio log "async generator ignored GeneratorExit")
        deadline = time.monotonic() + 30
        while len(released) < len(held):
            if time.monotonic() > deadline:
                break
            page.wait_for_timeout(100)
    # the page's stream-keeping event: its stream never ended while it was open (no such instant at all)
    assert not ended_while_open, ended_while_open


def test_a_question_sent_as_the_last_reply_ends_is_answered(pg, xllm_server, monkeypatch):
    """Gradio 6 ends a page's event stream when its last queued event completes; a question sent in that
    instant (the page not yet told) joined the queue while the page took the ending stream for open, then
    closed it and never saw the reply. The stream's end, if the server sends one, is held here until the
    page has the second question's join answer, so that instant is sure; nothing waits on a clock."""
    import asyncio
    import threading

    import gradio.routes

    from tests.browser import chromium, require_browser

    require_browser()
    joined, ends = threading.Event(), []
    streaming = gradio.routes.StreamingResponse

    class HeldEnd(streaming):
        """Gradio's streamed response with its first close_stream message held until ``joined``."""

        def __init__(self, content, *args, **kwargs):
            async def held():
                async for chunk in content:
                    if "close_stream" in str(chunk):
                        ends.append(chunk)
                        for _ in range(6000):  # (the limit only ends a hung test)
                            if joined.is_set() or len(ends) > 1:
                                break
                            await asyncio.sleep(0.01)
                    yield chunk

            super().__init__(held(), *args, **kwargs)

    monkeypatch.setattr(gradio.routes, "StreamingResponse", HeldEnd)
    with chromium() as context:
        page = context.new_page()
        page.goto(pg.local_url, timeout=60_000)
        box = page.locator("#xllm-input textarea")
        box.wait_for(timeout=60_000)
        box.fill("Say hello")
        box.press("Enter")
        page.wait_for_function(
            "() => document.querySelectorAll('#xllm-chatbot [data-testid=bot]').length === 1"
            " && document.querySelectorAll('.generating').length === 0", timeout=60_000)
        box.fill("Say hello again")
        with page.expect_response(lambda r: "/queue/join" in r.url, timeout=60_000) as answer:
            box.press("Enter")
        answer.value.finished()
        joined.set()  # the page has its join answer: the held end (if any) reaches it after that
        page.wait_for_function(  # was never: the second reply was not read
            "() => document.querySelectorAll('#xllm-chatbot [data-testid=bot]').length === 2"
            " && document.querySelectorAll('.generating').length === 0", timeout=60_000)
        users = page.locator("#xllm-chatbot [data-testid=user]").all_inner_texts()
        assert [u.strip() for u in users] == ["Say hello", "Say hello again"]
        assert any(jobs for jobs in pg.app._queue.active_jobs if jobs)  # the open page's own queued event
    # the page's queued event that keeps its stream open ends once the page has left (no task per page kept)
    queue = pg.app._queue
    deadline = time.monotonic() + 120  # (Gradio hears of a closed page at its next heartbeat)
    while any(jobs for jobs in queue.active_jobs if jobs):
        assert time.monotonic() < deadline, "a closed page's event still runs"
        time.sleep(0.1)


def test_a_reply_cut_at_max_tokens_says_so_and_the_note_is_not_sent_back(pg, xllm_server):
    """A reply the server ended at max tokens ends with a note saying so (the lab panel's chat and ChatWidget do): it
    read as if the model had finished. The note is the app's, never sent back to the model."""
    story = ("Tell me a long story", "tiny", "", 1.0, 1.0, 4, 1)
    # the same request straight to the server: it is cut at 4 tokens (seeded, no early end)
    body = {"model": "tiny", "messages": [{"role": "user", "content": story[0]}], "temperature": 1.0, "top_p": 1.0,
            "max_tokens": 4, "seed": 1}
    direct = httpx.post(xllm_server.base_url + "/chat/completions", json=body, timeout=60,
                        headers={"Authorization": f"Bearer {xllm_server.api_key}"} if xllm_server.api_key else {}).json()
    assert direct["choices"][0]["finish_reason"] == "length", direct
    client = gradio_client.Client(pg.local_url, verbose=False)
    job = client.submit(story[0], [], *story[1:], False, api_name=pg.api_name)
    job.result(timeout=120)
    text = final_text(job)
    assert text == f"{direct['choices'][0]['message']['content']}\n\n{CUT_NOTE}".strip(), text
    history = job.outputs()[-1][0]
    sent = to_openai_messages(history, "And then?", None)
    assert sent[1] == {"role": "assistant", "content": direct["choices"][0]["message"]["content"].strip()}


def test_a_port_taken_between_its_pick_and_the_bind_moves_the_app_to_the_next(tiny_client, monkeypatch):
    """Two kernels starting playgrounds at once both pick the first free port: the one that binds second took
    'could not start: Address already in use' (a CI run beside other test runs failed so); it tries the next."""
    import socket

    from xllm_jupyter.playground import launcher

    real_pick = launcher.pick_port
    taken: list[socket.socket] = []

    def pick_then_lose_it(host, candidates=launcher.PORT_RANGE):
        chosen = real_pick(host, candidates)
        if not taken:  # the other kernel's app binds it first
            sock = socket.socket()
            sock.bind((host, chosen))
            sock.listen()
            taken.append(sock)
        return chosen

    monkeypatch.setattr(launcher, "pick_port", pick_then_lose_it)
    try:
        app = xllm_jupyter.playground(client=tiny_client, inline=False, replace=False)
        try:
            lost = taken[0].getsockname()[1]
            assert app.port > lost and not port_is_free(app.port)
            assert httpx.get(app.local_url + "config", timeout=30).status_code == 200
        finally:
            app.close()
    finally:
        for sock in taken:
            sock.close()
