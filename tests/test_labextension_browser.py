"""The JupyterLab panel in a real browser: JupyterLab in a subprocess serving the tiny
Llama through the xllm extension, the prebuilt labextension, headless system chromium.

One JupyterLab for the module (startup is the slow part); the test opens the panel,
sees the model loaded, unloads and reloads it with the panel's buttons (cookie auth +
XSRF through ServerConnection), sends a chat and reads the streamed reply, and opens
the playground. A screenshot lands in tests/artifacts/.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

from tests.browser import ARTIFACTS, chromium, jupyter_lab, open_xllm_panel, require_browser
from tests.server_fixtures import TINY

LABEXTENSION = Path(__file__).resolve().parents[1] / "xllm_jupyter" / "labextension"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, xllm_home):
    """JupyterLab with the xllm extension serving "tiny" from the test store, under base_url /jl/."""
    require_browser()
    if not (LABEXTENSION / "package.json").is_file():
        pytest.fail("the prebuilt labextension is missing: run `make labext-build`")
    config = {"XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_batch_size": 4}}
    with jupyter_lab(tmp_path_factory.mktemp("lab"), config=config, base_url="/jl/", name="labextension-browser") as server:
        yield server


def open_chat_from_the_palette(page) -> None:
    """Run 'xllm: Open Chat' from the command palette with Enter once it is the active item: the palette redraws its
    items as the panel's polling updates command states, and a click on one can keep missing a replaced node."""
    page.keyboard.press("Control+Shift+C")
    palette = page.locator(".lm-CommandPalette-input")
    palette.wait_for(state="visible", timeout=30_000)
    palette.fill("xllm: Open Chat")
    page.wait_for_selector('.lm-CommandPalette-item.lm-mod-active[data-command="xllm:open-chat"]', timeout=30_000)
    palette.press("Enter")


def test_labextension_is_installed(lab):
    """JupyterLab lists the prebuilt extension (the page config the browser gets)."""
    import urllib.request

    with urllib.request.urlopen(lab.lab_url(), timeout=60) as r:
        page = r.read().decode()
    assert "@xllm/jupyterlab" in page


def test_panel_models_chat_and_playground(lab):
    with chromium() as context:
        page = context.new_page()
        panel, errors = open_xllm_panel(page, lab)

        # the default model is preloaded by the extension and shows as loaded
        row = panel.locator(f'.xllm-Model[data-model="{TINY}"]')
        page.wait_for_selector(f'#xllm-panel .xllm-Model.xllm-mod-loaded[data-model="{TINY}"]', timeout=120_000)
        assert panel.locator(".xllm-Panel-status").inner_text() == "Ready"
        assert re.search(r"\b(KB|MB|GB)\b", row.locator(".xllm-Model-facts").inner_text())
        assert panel.locator(".xllm-Gauge").count() >= 1

        # the chat offers chat models only: an embedding model the server lists is not among them
        listed = lab.api("xllm/v1/models")["data"]
        embedding = [m["id"] for m in listed if m["xllm"]["details"].get("task") == "embedding"]
        assert embedding, "the server lists no embedding model (the packaged all-minilm)"
        options = panel.locator(".xllm-Chat-model option").all_inner_texts()
        assert TINY in options and not set(embedding) & set(options), options

        # a model button outlives the panel's polls (rows are updated in place): a rebuilt
        # button lost the keyboard focus and swallowed a click that spanned a redraw
        action = row.locator(".xllm-Model-action")
        action.evaluate("node => { node.xllmProbe = true; }")
        assert action.get_attribute("aria-label") == f"Unload {TINY}"
        for _ in range(2):  # the first read's redraw is done before the next read is sent
            with page.expect_response(lambda r: "admin/stats" in r.url, timeout=30_000):
                pass
        assert action.evaluate("node => node.xllmProbe === true"), "the poll rebuilt the model's button"
        # so does the memory gauge (its width animates instead of jumping)
        fill = panel.locator(".xllm-Gauge-fill").first
        fill.evaluate("node => { node.xllmProbe = true; }")
        with page.expect_response(lambda r: "admin/stats" in r.url, timeout=30_000):
            pass
        page.wait_for_timeout(100)  # the redraw follows the response
        assert fill.evaluate("node => node.xllmProbe === true"), "the poll rebuilt the memory gauge"

        # unload and load again through the panel's buttons (POSTs with Jupyter's auth + XSRF)
        row.locator(".xllm-Model-action").click()
        page.wait_for_selector(f'#xllm-panel .xllm-Model.xllm-mod-available[data-model="{TINY}"]', timeout=60_000)
        assert TINY not in [m["id"] for m in lab.api("xllm/admin/stats")["models"]]
        row.locator(".xllm-Model-action").click()
        page.wait_for_selector(f'#xllm-panel .xllm-Model.xllm-mod-loaded[data-model="{TINY}"]', timeout=120_000)

        # a quick chat: the reply streams into the log
        assert panel.locator(".xllm-Chat-model").input_value() == TINY
        box = panel.locator(".xllm-Chat-input")
        box.fill("Say hello.")
        box.press("Enter")
        reply = panel.locator(".xllm-Chat-turn.xllm-mod-assistant").last
        page.wait_for_selector("#xllm-panel .xllm-Chat-turn.xllm-mod-assistant:not(.xllm-mod-pending)", timeout=120_000)
        assert panel.locator(".xllm-Chat-error").count() == 0
        text = reply.locator(".xllm-Chat-text").inner_text()
        assert text.strip(), "the reply is empty"
        assert panel.locator(".xllm-Chat-turn.xllm-mod-user").inner_text().strip() == "Say hello."

        # the server counted the tokens; the panel shows the counters it polls
        stats = lab.api("xllm/admin/stats")
        assert stats["generated_tokens"] > 0 and stats["completed"] >= 1
        page.wait_for_function(
            "() => /[1-9]\\d* tokens generated/.test(document.querySelector('#xllm-panel .xllm-Panel-rate').title)",
            timeout=30_000,
        )
        assert panel.locator(".xllm-Panel-queue").inner_text() in ("idle", "1 running")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "labextension-panel.png"))

        # Escape stops a streaming reply; the log is busy (a screen reader waits) only while it streams
        box.fill("Tell me a long story.")
        box.press("Enter")
        page.wait_for_selector("#xllm-panel .xllm-Chat-send.xllm-mod-stop", timeout=30_000)
        log = panel.locator(".xllm-Chat-log")
        assert log.get_attribute("role") == "log" and log.get_attribute("aria-busy") == "true"
        box.press("Escape")
        page.wait_for_selector("#xllm-panel .xllm-Chat-send:not(.xllm-mod-stop)", timeout=30_000)
        assert panel.locator(".xllm-Chat-turn").last.locator(".xllm-Chat-note").inner_text() == "Stopped."
        assert log.get_attribute("aria-busy") == "false"

        # the server unreachable (the stats read fails): said so, the last rows dimmed, no Load/Unload
        page.route("**/xllm/admin/stats*", lambda route: route.abort())
        page.wait_for_selector("#xllm-panel .xllm-Panel-status.xllm-mod-offline", timeout=30_000)
        assert panel.locator(".xllm-Panel-status").inner_text() == "The Jupyter server is not reachable"
        assert panel.locator(".xllm-Panel-models.xllm-mod-stale").count() == 1
        assert panel.locator(".xllm-Model-action:enabled").count() == 0
        page.unroute("**/xllm/admin/stats*")
        page.wait_for_selector("#xllm-panel .xllm-Panel-status.xllm-mod-ready", timeout=30_000)
        assert panel.locator(".xllm-Panel-models.xllm-mod-stale").count() == 0
        assert row.locator(".xllm-Model-action").is_enabled()

        # the palette command opens the same chat in the main area
        open_chat_from_the_palette(page)
        main_chat = page.locator(".jp-MainAreaWidget .xllm-Chat.xllm-mod-main")
        main_chat.wait_for(state="visible", timeout=30_000)
        page.wait_for_function(
            "() => document.querySelector('.xllm-Chat.xllm-mod-main .xllm-Chat-model').options.length > 0", timeout=30_000)
        assert main_chat.locator(".xllm-Chat-notice").is_hidden()

        # when the model list cannot be read, the main-area chat says why instead of an empty picker
        refused = json.dumps({"error": {"message": "Invalid API key", "type": "authentication_error", "param": None, "code": "invalid_api_key"}})
        page.route("**/xllm/v1/models*", lambda route: route.fulfill(status=401, body=refused, content_type="application/json"))
        open_chat_from_the_palette(page)
        notice = page.locator(".jp-MainAreaWidget:visible .xllm-Chat.xllm-mod-main .xllm-Chat-notice")
        notice.wait_for(state="visible", timeout=30_000)
        assert "Invalid API key" in notice.inner_text() and "could not be read" in notice.inner_text()
        page.unroute("**/xllm/v1/models*")

        # the playground command: the server starts Gradio and the new tab opens it
        if importlib.util.find_spec("gradio") is not None:
            with context.expect_page(timeout=120_000) as popup_info:
                panel.locator(".xllm-Panel-playground").click()
            popup = popup_info.value
            popup.wait_for_url(re.compile(r"^http://127\.0\.0\.1:\d+/"), timeout=180_000)
            popup.wait_for_selector("gradio-app, .gradio-container", timeout=120_000)
            info = lab.api("xllm/playground", method="POST", body={})  # started once: the same URL again
            assert popup.url.startswith(info["url"].rstrip("/"))
            popup.close()
        assert not errors, errors


def test_the_memory_gauge_lists_each_gpu_of_several(lab):
    """/admin/stats' CUDA row sums every GPU; with two the panel shows each one's used/free/total under the gauge (one
    GPU: the gauge alone). The server's real answer, given a CUDA row in the browser (no GPU here)."""
    gib = 10**9
    gpus = [{"index": 0, "used_bytes": 78 * gib, "free_bytes": 2 * gib, "total_bytes": 80 * gib},
            {"index": 1, "used_bytes": 2 * gib, "free_bytes": 78 * gib, "total_bytes": 80 * gib}]
    shown = {"devices": gpus}

    def with_gpus(route) -> None:
        reply = route.fetch()
        stats = reply.json()
        stats["memory"]["cuda"] = {"used_bytes": 50 * gib, "budget_bytes": 0,
                                   "total_bytes": sum(g["total_bytes"] for g in shown["devices"]), **shown}
        route.fulfill(response=reply, json=stats)

    with chromium() as context:
        page = context.new_page()
        page.route("**/xllm/admin/stats*", with_gpus)
        panel, errors = open_xllm_panel(page, lab)
        lines = panel.locator('.xllm-Gauge[data-device="cuda"] .xllm-Gauge-device')
        page.wait_for_selector('#xllm-panel .xllm-Gauge[data-device="cuda"] .xllm-Gauge-device', timeout=60_000)
        assert lines.all_inner_texts() == ["GPU 0: 78.0 GB used, 2.00 GB free of 80.0 GB",
                                           "GPU 1: 2.00 GB used, 78.0 GB free of 80.0 GB"]
        assert panel.locator('.xllm-Gauge[data-device="cuda"] .xllm-Gauge-label').inner_text() == "50.0 GB of 160 GB GPU"
        assert panel.locator('.xllm-Gauge[data-device="cpu"] .xllm-Gauge-device').count() == 0
        shown["devices"] = gpus[:1]  # one GPU: the gauge says it all
        page.wait_for_function("() => !document.querySelector('#xllm-panel .xllm-Gauge[data-device=\"cuda\"] .xllm-Gauge-device')",
                               timeout=30_000)
        assert not errors, errors


def test_a_model_deleted_while_picked_leaves_the_chat_picker_at_once(lab, xllm_home, tiny_llama_dir):
    """A chat to a model deleted since the panel read the list says so, and the picker drops it then
    (it kept offering it until the next 30 s re-read, so every send failed the same way)."""
    from xllm_jupyter.store.store import ModelStore

    gone = "tiny-gone"
    ModelStore(xllm_home).pull(str(tiny_llama_dir), gone)
    with chromium() as context:
        page = context.new_page()
        panel, errors = open_xllm_panel(page, lab)
        picker = panel.locator(".xllm-Chat-model")
        page.wait_for_function(
            f"() => [...document.querySelectorAll('#xllm-panel .xllm-Chat-model option')].some(o => o.value === '{gone}')",
            timeout=60_000)
        picker.select_option(gone)
        lab.api(f"xllm/v1/models/{gone}", method="DELETE")  # e.g. `xllm rm` in a terminal

        box = panel.locator(".xllm-Chat-input")
        box.fill("Are you there?")
        box.press("Enter")
        error = panel.locator(".xllm-Chat-turn.xllm-mod-assistant .xllm-Chat-error").last
        error.wait_for(timeout=60_000)
        assert gone in error.inner_text() and "does not exist" in error.inner_text()
        # well before the panel's 30 s re-read of the list
        page.wait_for_function(
            f"() => ![...document.querySelectorAll('#xllm-panel .xllm-Chat-model option')].some(o => o.value === '{gone}')",
            timeout=10_000)
        assert picker.input_value() == TINY
        assert not errors, errors


def test_a_streaming_reply_leaves_a_log_scrolled_up_where_it_is(lab):
    """The quick chat follows a reply only while its log is at the end: one scrolled up to read stays there (every
    streamed piece, and the reply's end, pulled it back to the bottom); a question sent then shows at the end."""
    with chromium() as context:
        page = context.new_page()
        panel, errors = open_xllm_panel(page, lab)
        page.wait_for_selector(f'#xllm-panel .xllm-Model.xllm-mod-loaded[data-model="{TINY}"]', timeout=120_000)
        log = panel.locator(".xllm-Chat-log")
        # a log a few pixels high, so the question alone overflows it; once the question and the pending reply are drawn
        # (the log's first redraw of its children), the "user" scrolls to the top, whatever the reply streams after
        log.evaluate("""node => {
            Object.assign(node.style, {flex: 'none', height: '24px', minHeight: '0'});
            const watch = new MutationObserver(() => { watch.disconnect(); node.scrollTop = 0; window.xllmScrolledUp = true; });
            watch.observe(node, {childList: true});
        }""")
        box = panel.locator(".xllm-Chat-input")
        box.fill("Tell me a long story.")
        box.press("Enter")
        page.wait_for_function("() => window.xllmScrolledUp === true", timeout=30_000)
        page.wait_for_selector("#xllm-panel .xllm-Chat-send:not(.xllm-mod-stop)", timeout=120_000)
        assert panel.locator(".xllm-Chat-error").count() == 0
        top, height, shown = log.evaluate("node => [node.scrollTop, node.scrollHeight, node.clientHeight]")
        assert height > shown and top == 0, (top, height, shown)

        # a question sent from there is shown at the end, and its reply followed
        box.fill("And then?")
        box.press("Enter")
        page.wait_for_selector("#xllm-panel .xllm-Chat-turn.xllm-mod-assistant:not(.xllm-mod-pending) >> nth=1", timeout=120_000)
        page.wait_for_selector("#xllm-panel .xllm-Chat-send:not(.xllm-mod-stop)", timeout=120_000)
        top, height, shown = log.evaluate("node => [node.scrollTop, node.scrollHeight, node.clientHeight]")
        assert height - top - shown <= 8, (top, height, shown)
        assert not errors, errors


def test_closing_a_main_area_chat_stops_its_reply_on_the_server(lab):
    """Closing the main-area chat's tab while a reply streams ends the generation (the reply ran on to its 512-token
    limit, a batch slot taken for nobody)."""
    with chromium() as context:
        page = context.new_page()
        panel, errors = open_xllm_panel(page, lab)
        page.wait_for_selector(f'#xllm-panel .xllm-Model.xllm-mod-loaded[data-model="{TINY}"]', timeout=120_000)
        open_chat_from_the_palette(page)
        chat = page.locator(".jp-MainAreaWidget:visible .xllm-Chat.xllm-mod-main")
        chat.wait_for(state="visible", timeout=30_000)
        page.wait_for_function(
            "() => document.querySelector('.jp-MainAreaWidget:not(.lm-mod-hidden) .xllm-Chat.xllm-mod-main .xllm-Chat-model').value !== ''",
            timeout=30_000)
        before = lab.api("xllm/admin/stats")["generated_tokens"]
        box = chat.locator(".xllm-Chat-input")
        box.fill("Tell me a long story.")
        box.press("Enter")
        # the reply has begun: close the tab
        page.wait_for_function(
            "() => [...document.querySelectorAll('.xllm-Chat.xllm-mod-main .xllm-Chat-turn.xllm-mod-pending .xllm-Chat-text')]"
            ".some(n => n.textContent.length > 0)", timeout=60_000)
        page.locator('.lm-DockPanel .lm-TabBar-tab.lm-mod-current:has-text("xllm chat") .lm-TabBar-tabCloseIcon').click()
        chat.wait_for(state="detached", timeout=30_000)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = lab.api("xllm/admin/stats")
            if stats["running"] == 0 and stats["queued"] == 0:
                break
            time.sleep(0.1)
        # stopped within a step of the close, far short of the chat's 512-token limit
        assert stats["running"] == 0 and stats["generated_tokens"] - before < 400, stats
        assert not errors, errors
