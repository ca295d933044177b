"""In JupyterLab (headless chromium), a reply's links lead only to the web: no relative link opens a Jupyter file.

JupyterLab resolves a relative link in Markdown output against the notebook and opens its target in
the Lab when clicked, so ``[x](../../api/contents/secret)`` in a model's answer was one click from a
file of the user's. Both renderings of model text are checked as the browser shows them: the
``%%xllm`` Markdown bundle (``Reply``) and the ChatWidget's transcript HTML (``markdown_html`` in an
ipywidgets ``HTML``, as the widget shows it).
"""

from __future__ import annotations

import nbformat
import pytest

from tests.browser import chromium, jupyter_lab, require_browser
from tests.test_safe_markdown import AUTOLOAD, RELATIVE_LINKS

pytestmark = [pytest.mark.timeout(600)]

NOTEBOOK = "xllm-links.ipynb"
#: images, media and styles aimed at the Lab's own server (no origin spelt out: the notebook is written before the
#: server starts)
SAME_ORIGIN = AUTOLOAD.format(origin="")
#: brackets that are not math, as the user must see them: a defused link, citations, Markdown-escaped brackets
BRACKETS = {"[x](../../api/contents/secret)": "[x](../../api/contents/secret)", "see [1] and [2]": "see [1] and [2]",
            "lit \\[x\\] end": "lit [x] end"}
BRACKET_TEXT = "\n\n".join(BRACKETS)
#: math, still typeset: dollars, and JupyterLab's own delimiters \\[ \\] and \\( \\) (as in a Markdown cell)
MATH = "math $x^2$ and $$a$$ and \\\\[y\\\\] and \\\\(w\\\\)"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab with a notebook showing the hostile links both ways."""
    require_browser()
    workdir = tmp_path_factory.mktemp("lab-links")
    (workdir / "secret.txt").write_text("not for the model\n")
    cells = [
        nbformat.v4.new_code_cell(f"from xllm_jupyter.magics.render import Reply\nReply('markdown', {RELATIVE_LINKS!r})"),
        nbformat.v4.new_code_cell("import ipywidgets\nfrom xllm_jupyter.widgets.markdown import markdown_html\n"
                                  f"ipywidgets.HTML(markdown_html({RELATIVE_LINKS!r}))"),
        nbformat.v4.new_code_cell(f"Reply('markdown', {SAME_ORIGIN!r})"),
        nbformat.v4.new_code_cell(f"ipywidgets.HTML(markdown_html({SAME_ORIGIN!r}))"),
        nbformat.v4.new_code_cell(f"Reply('markdown', {BRACKET_TEXT!r})"),
        nbformat.v4.new_code_cell(f"Reply('markdown', {MATH!r})"),
    ]
    nb = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                          "language": "python"}})
    nbformat.write(nb, str(workdir / NOTEBOOK))
    with jupyter_lab(workdir, config={"XllmApp": {"home": str(workdir / "store")}}, name="links-browser") as server:
        yield server


def test_no_relative_link_is_clickable_and_nothing_is_fetched_in_markdown_or_the_chat_widget(lab):
    """Only web links stay links; and ``![](/hub/logout)``, ``<img srcset>``, ``<video poster>``, a ``style``
    url() (cells 3 and 4) show as text: no element that loads, no request to the server the page came from; the
    escaped brackets of defused links are no MathJax math (cell 5) while real math is (cell 6). One
    page: a second page of the same Lab reopens the notebook from its workspace and asks first."""
    from tests.test_browser_notebook import run_all_cells

    with chromium() as context:
        page = context.new_page()
        fetched: list[str] = []
        page.on("request", lambda r: fetched.append(r.url) if "/hub/logout" in r.url or "/api/rel" in r.url else None)
        page.goto(lab.lab_url(f"lab/tree/{NOTEBOOK}"), wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        run_all_cells(page)
        cells = page.locator(".jp-NotebookPanel .jp-CodeCell")
        markdown = cells.nth(0).locator(".jp-OutputArea-output[data-mime-type='text/markdown']")
        widget = cells.nth(1).locator(".jp-OutputArea-output .widget-html-content")
        markdown.wait_for(timeout=120_000)
        widget.wait_for(timeout=120_000)
        for output in (markdown, widget):
            # the href as the browser resolved it: JupyterLab rewrites relative ones to the server's URLs
            hrefs = output.locator("a").evaluate_all("els => els.map(e => e.href)")
            assert sorted(hrefs) == ["https://ok.example/ok", "mailto:p@ok.example"], hrefs
            text = output.inner_text()
            assert "api/contents/secret" in text and "files/secret.txt" in text  # shown, as text

        for n in (2, 3):
            output = cells.nth(n).locator(".jp-OutputArea-output[data-mime-type='text/markdown'], "
                                          ".jp-OutputArea-output .widget-html-content")
            output.wait_for(timeout=120_000)
            assert "/hub/logout?md" in output.inner_text()  # shown, as text
            loading = output.locator("img, picture, video, audio, source, link, style, [style*='url(']")
            assert loading.evaluate_all("els => els.map(e => e.outerHTML)") == []
        page.wait_for_timeout(1000)  # time for any fetch a shown element starts
        # \\[...\\] in the Markdown (JupyterLab's math extractor) and \[...\] left in the page (MathJax) are display
        # math: the escape that defuses a link must be neither (a formula shown, or text swallowed up to a \])
        plain, math = (cells.nth(n).locator(".jp-OutputArea-output[data-mime-type='text/markdown']") for n in (4, 5))
        math.locator("mjx-container").first.wait_for(timeout=60_000)  # typeset: MathJax has run on both cells
        assert plain.locator("mjx-container").count() == 0, plain.inner_html()
        assert [p.strip() for p in plain.inner_text().split("\n") if p.strip()] == list(BRACKETS.values())
        assert math.locator("mjx-container").count() == 4, math.inner_html()  # and real math is still math
        assert fetched == [], fetched
