"""The playground's message box while a question waits in Gradio's queue (all chat slots taken by other users).

The box used to be emptied by the turn's first update, when the turn started: what the user typed there while the
question waited was wiped, and Gradio's progress overlay covered the box meanwhile. It is now emptied in the page
as the question is sent, and only the transcript shows the queue.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")

import xllm_jupyter
from tests.browser import chromium, require_browser
from tests.helpers import free_port
from tests.playground_pages import (
    HELD,
    held_slot,
    open_page,
    page_queued_behind_another_client,
    wait_for_turns,
)
from tests.test_playground_stop import _answered_on_the_page

pytestmark = [pytest.mark.timeout(600)]


@pytest.mark.parametrize("send", ["Enter", "Send"])
def test_the_box_empties_as_a_question_is_sent_and_keeps_what_is_typed_while_it_waits(
        tiny_client, xllm_server, monkeypatch, send):
    """Sent while another client's turn holds the one chat slot: the box is empty at once, the user can click it and
    type, and what they typed is still there once the question's turn has started and been answered."""
    with page_queued_behind_another_client(tiny_client, monkeypatch, "Tell me a short story", send=send) as queued:
        page, box = queued.page, queued.box
        assert box.input_value() == "", "the box still holds the question that waits in the queue"
        box.click(timeout=10_000)  # not covered by Gradio's progress overlay
        page.keyboard.type("next question")
        queued.release.set()  # the other turn goes on and ends; the page's question starts
        queued.other.result(timeout=120)
        _answered_on_the_page(page, "Tell me a short story", timeout=120_000)
        assert box.input_value() == "next question", "what was typed while the question waited was lost"
        assert page.locator("span.error").count() == 0


def test_a_question_sent_while_the_pages_own_waits_is_asked_after_it(tiny_client, xllm_server, monkeypatch):
    """A second question typed and sent while the page's first still waits in the queue: Gradio holds it until the
    first turn ends (the box keeps it meanwhile), then sends it with that turn in its history; the box is then
    empty. The box used to hold the first question until its turn started, so the second was typed onto it (and
    Gradio's overlay over the box took the click)."""
    with page_queued_behind_another_client(tiny_client, monkeypatch, "Tell me a short story") as queued:
        page, box = queued.page, queued.box
        box.click(timeout=10_000)  # as a user does, who sees an empty box
        page.keyboard.type("And another one")
        page.keyboard.press("Enter")  # held by the page: its first question's turn has not ended
        assert box.input_value() == "And another one"
        queued.release.set()
        queued.other.result(timeout=120)
        wait_for_turns(page, 2, timeout=120_000)
        users = page.locator("#xllm-chatbot [data-testid=user]").all_inner_texts()
        assert [u.strip() for u in users] == ["Tell me a short story", "And another one"]
        assert box.input_value() == ""


@pytest.mark.parametrize("first,second", [("Enter", "Send"), ("Send", "Enter")])
def test_send_during_a_turn_enter_started_is_held_too(tiny_client, xllm_server, monkeypatch, first, second):
    """Enter and Send are one event, so the page holds either back while a turn the other started runs. As two
    events, the second was asked at once, beside the first, with the transcript as it was then (the first question,
    no answer yet); its updates then wiped the first answer from the transcript."""
    require_browser()
    with held_slot(monkeypatch) as (holding, release), \
            xllm_jupyter.playground(client=tiny_client, port=free_port(), replace=False) as pg, chromium() as context:
        page = context.new_page()
        box = open_page(page, pg.local_url, max_tokens=8)

        def send(how: str) -> None:
            if how == "Enter":
                box.press("Enter")
            else:
                page.get_by_role("button", name="Send").click()

        box.fill(HELD)
        send(first)
        assert holding.wait(60), "the first turn did not start"  # and waits, on the page's own question
        box.fill("And another one")
        send(second)  # held by the page while the first turn runs
        assert box.input_value() == "And another one", "the second question was sent during the first turn"
        release.set()
        wait_for_turns(page, 2, timeout=120_000)
        _answered_on_the_page(page, "And another one", timeout=120_000)
        users = [u.strip() for u in page.locator("#xllm-chatbot [data-testid=user]").all_inner_texts()]
        bots = [b.strip() for b in page.locator("#xllm-chatbot [data-testid=bot]").all_inner_texts()]
        assert users == [HELD, "And another one"]
        assert all(bots), f"an answer is missing from the transcript: {bots}"
        assert box.input_value() == ""


def test_clear_drops_a_question_the_page_held_back(tiny_client, xllm_server, monkeypatch):
    """A question sent while the page's own still waits is held by the page, kept in the box; Clear empties the box,
    and drops that question too. It stayed held: once the cleared turn ended, the page sent whatever the box held
    then, such as a next question the user was still typing. An input method's composition-ending Enter in between
    sends nothing (Gradio sends on keypress, which no browser fires for it); Safari's keydown for it has
    ``isComposing`` false (keyCode 229), and the page took it for a send press that undid the Clear."""
    with page_queued_behind_another_client(tiny_client, monkeypatch, "Tell me a short story") as queued:
        page, box = queued.page, queued.box
        box.fill("And another one")
        box.press("Enter")  # held by the page: its first question waits
        with page.expect_response(lambda response: "/run/predict" in response.url, timeout=60_000):
            page.locator("button.lg", has_text="Clear").click()
        page.wait_for_function("() => document.querySelector('#xllm-input textarea').value === ''", timeout=60_000)
        box.click(timeout=10_000)
        page.keyboard.type("half a que")  # not sent
        # Safari's keydown for the Enter that ends an IME composition (no keypress follows, so Gradio sends nothing)
        box.evaluate("""(box) => box.dispatchEvent(new KeyboardEvent("keydown", {
            key: "Enter", keyCode: 229, isComposing: false, bubbles: true, cancelable: true}))""")
        queued.release.set()
        queued.other.result(timeout=120)  # the slot frees: the cleared turn starts and ends at once
        page.wait_for_function("() => document.querySelectorAll('.generating').length === 0", timeout=60_000)
        page.wait_for_timeout(1000)  # time for a wrongly sent question to show (nothing here waits on it)
        assert box.input_value() == "half a que", "what the user was typing was sent"
        assert page.locator("#xllm-chatbot [data-testid=user]").count() == 0
        box.press("Enter")  # sent by the user now: asked
        _answered_on_the_page(page, "half a que", timeout=120_000)
        users = [u.strip() for u in page.locator("#xllm-chatbot [data-testid=user]").all_inner_texts()]
        assert users == ["half a que"]
