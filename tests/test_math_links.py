"""Math in a model's reply spells no link: MathJax's ``\\href`` made one JupyterLab never vets.

JupyterLab typesets ``$...$`` with MathJax, whose ``\\href{url}{text}`` draws an anchor; its safe
mode drops ``javascript:`` and ``data:`` but keeps relative targets, and the anchors appear after
JupyterLab's link handling ran. ``$\\href{files/secret.txt}{x}$`` was therefore a clickable link to a
file of the Jupyter server, which %%xllm's Markdown otherwise only lets lead to the web.
"""

from __future__ import annotations

import re

import nbformat
import pytest

from xllm_jupyter.notebook.safe_markdown import neutral_markdown

HREFS = (
    r"inline $\href{files/secret.txt}{math link}$ "
    r"display $$\href {../../api/contents/secret.txt}{display link}$$ "
    r"paren \(\href{/lab/tree/x.ipynb}{paren link}\) "
    "\\begin{align}\\href{files/secret.txt}{env link}\\end{align}"
)


@pytest.mark.parametrize("text", [
    r"$\href{files/s}{x}$", r"$$\href {files/s}{x}$$", r"\(\href{files/s}{x}\)", r"\[\href{files/s}{x}\]",
    "\\begin{equation}\\href{files/s}{x}\\end{equation}", r"$a + \href{https://ok.example/}{b}$",
    # read as text here, but JupyterLab's MathJax finds the dollars in the rendered page all the same
    r"$\href{files/s}{x} [b](../c)$", r"\$\href{files/s}{x}\$", r"$x$ \\href{files/s}{x} $y$",
])
def test_no_href_reaches_mathjax(text):
    out = neutral_markdown(text)
    assert not re.search(r"\\href(?![a-zA-Z])", out), out
    assert "\uff3chref" in out and "files/s" in out or "ok.example" in out  # shown, as written but for the backslash


def test_other_math_and_code_are_kept():
    assert neutral_markdown(r"$\hrefs + x^2$ and $\frac{a}{b}$") == r"$\hrefs + x^2$ and $\frac{a}{b}$"
    fenced = "```latex\n\\href{https://a.example}{b}\n```"
    assert "\\href{https://a.example}{b}" in neutral_markdown(fenced)  # code is shown as written


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab with a notebook showing math that holds ``\\href``."""
    from tests.browser import jupyter_lab, require_browser

    require_browser()
    workdir = tmp_path_factory.mktemp("lab-math-links")
    (workdir / "secret.txt").write_text("not for the model\n")
    cell = nbformat.v4.new_code_cell(f"from xllm_jupyter.magics.render import Reply\nReply('markdown', {HREFS!r})")
    nb = nbformat.v4.new_notebook(cells=[cell], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                           "language": "python"}})
    nbformat.write(nb, str(workdir / "math.ipynb"))
    with jupyter_lab(workdir, config={"XllmApp": {"home": str(workdir / "store")}}, name="math-links-browser") as server:
        yield server


@pytest.mark.timeout(600)
def test_mathjax_draws_no_link_in_a_reply(lab):
    from tests.browser import chromium
    from tests.test_browser_notebook import run_all_cells

    with chromium() as context:
        page = context.new_page()
        page.goto(lab.lab_url("lab/tree/math.ipynb"), wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        run_all_cells(page)
        output = page.locator(".jp-NotebookPanel .jp-CodeCell .jp-OutputArea-output[data-mime-type='text/markdown']")
        output.wait_for(timeout=120_000)
        page.wait_for_function("() => !document.querySelector('.jp-OutputArea-output')?.innerText.includes('$$')"
                               " || document.querySelector('.jp-OutputArea-output mjx-container')", timeout=60_000)
        page.wait_for_timeout(2000)  # MathJax typesets after the output is attached (no event to wait for)
        hrefs = output.locator("a").evaluate_all("els => els.map(e => e.href)")
        assert hrefs == [], hrefs
        assert "href" in output.inner_text() and "mjx-container" in output.inner_html()  # typeset, as text
