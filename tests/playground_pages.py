"""Browser tests' playground pages: one whose question waits in Gradio's queue behind another client's turn.

The other turn holds the playground's one chat slot (``CHAT_SLOTS`` patched to 1) on a condition the test
releases, not on a long reply that a busy or an idle machine ends sooner or later than the test expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import xllm_jupyter
from tests.browser import chromium, require_browser
from tests.helpers import free_port

#: the other client's question: its turn waits, before it reaches the server, until the test releases it
HELD = "Hold the one chat slot"


@dataclass
class Queued:
    """A page whose question waits in the queue: the page, its message box, the playground, the other client's job,
    and the event that lets the other turn go on to the server."""

    page: Any
    box: Any
    pg: Any
    other: Any
    release: threading.Event


def open_page(page: Any, url: str, max_tokens: int) -> Any:
    """The playground at ``url`` in ``page``, sending ``max_tokens`` and seed 1; returns its message box."""
    page.goto(url, timeout=60_000)
    box = page.locator("#xllm-input textarea")
    box.wait_for(timeout=60_000)
    # sent as shown, not the model's default: unchecked here, not left to the slider's round trip
    page.get_by_label("The model's defaults").uncheck()
    page.get_by_label("number input for Max tokens").fill(str(max_tokens))
    page.get_by_label("number input for Max tokens").press("Enter")
    page.get_by_role("textbox", name="Seed").fill("1")
    return box


def wait_for_turns(page: Any, turns: int, timeout: float) -> None:
    """Wait until the transcript holds ``turns`` questions and as many answers, and nothing is generating."""
    page.wait_for_function(
        f"() => document.querySelectorAll('#xllm-chatbot [data-testid=user]').length === {turns}"
        f" && document.querySelectorAll('#xllm-chatbot [data-testid=bot]').length === {turns}"
        " && document.querySelectorAll('.generating').length === 0",
        timeout=timeout,
    )


def wait_until_queued(page: Any, timeout: float = 60_000) -> None:
    """Wait until the page shows its question waiting in Gradio's queue (the transcript's "queue: 1/1")."""
    page.wait_for_function(
        "() => (document.querySelector('#xllm-chatbot')?.innerText || '').includes('queue:')", timeout=timeout)


@contextlib.contextmanager
def held_slot(monkeypatch: Any) -> Iterator[tuple[threading.Event, threading.Event]]:
    """One chat slot, and turns asking ``HELD`` wait in it until released: ``(holding, release)``; released at exit."""
    from xllm_jupyter.playground import app as playground_app

    monkeypatch.setattr(playground_app, "CHAT_SLOTS", 1)
    holding, release = threading.Event(), threading.Event()
    stream_reply = playground_app.stream_reply

    async def held(endpoint: Any, messages: list, model: Any, params: dict, finish: list | None = None):
        if messages[-1]["content"] == HELD:
            holding.set()
            while not release.is_set():  # a condition, polled so that Stop or /cancel can end the turn here
                await asyncio.sleep(0.02)
        async for piece in stream_reply(endpoint, messages, model, params, finish):
            yield piece

    monkeypatch.setattr(playground_app, "stream_reply", held)
    try:
        yield holding, release
    finally:
        release.set()


@contextlib.contextmanager
def page_queued_behind_another_client(tiny_client: Any, monkeypatch: Any, question: str, max_tokens: int = 8,
                                      send: str = "Enter") -> Iterator[Queued]:
    """A playground (on a free port) whose one chat slot another client's turn holds, and a page that has sent
    ``question`` (``send``: with Enter, or the Send button), which waits in Gradio's queue behind it."""
    from gradio_client import Client

    require_browser()
    with held_slot(monkeypatch) as (holding, release), \
            xllm_jupyter.playground(client=tiny_client, port=free_port(), replace=False) as pg, \
            chromium() as context:
        page = context.new_page()
        box = open_page(page, pg.local_url, max_tokens)
        other = Client(pg.local_url, verbose=False).submit(
            HELD, [], pg.model, "", 1.0, 1.0, 8, "1", False, api_name=pg.api_name)
        assert holding.wait(60), "the other client's turn did not start"
        box.fill(question)
        if send == "Enter":
            box.press("Enter")
        else:
            page.get_by_role("button", name="Send").click()
        wait_until_queued(page)
        yield Queued(page, box, pg, other, release)
