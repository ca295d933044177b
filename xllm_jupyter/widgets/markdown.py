"""Markdown to safe HTML for the widgets' transcripts (model output is untrusted text)."""

from __future__ import annotations

import re
from functools import lru_cache
from html import escape
from typing import Any

#: where a link may lead: the web or mail. A relative link would open a file of the Jupyter server
#: (``../../api/contents/secret``, ``files/...``) in the user's tab when clicked: it is shown as text
_WEB = re.compile(r"(?:https?://|mailto:)", re.IGNORECASE)

#: styles for rendered replies, scoped to the transcript: an HTML widget gets none of JupyterLab's
#: Markdown styles, so without them a code block would be proportional text on the page's background
TRANSCRIPT_CSS = (
    "<style>"
    # ipywidgets sets an HTML widget's line-height to a control's height (28 px): text read double-spaced
    ".xllm-chat-transcript .widget-html-content{line-height:1.45}"
    # a reply's "# Title" is a heading inside one message, not the page's
    ".xllm-md h1{font-size:1.3em}.xllm-md h2{font-size:1.2em}.xllm-md h3,.xllm-md h4,.xllm-md h5,.xllm-md h6{font-size:1.05em}"
    ".xllm-md h1,.xllm-md h2,.xllm-md h3,.xllm-md h4,.xllm-md h5,.xllm-md h6{margin:0.6em 0 0.3em}"
    ".xllm-md > :first-child{margin-top:0}.xllm-md > :last-child{margin-bottom:0}"
    ".xllm-md pre{background:var(--jp-layout-color2,#f5f5f5);padding:6px 8px;border-radius:4px;"
    "overflow-x:auto;white-space:pre;font-family:var(--jp-code-font-family,monospace);font-size:0.9em}"
    ".xllm-md code{font-family:var(--jp-code-font-family,monospace);font-size:0.9em}"
    ".xllm-md table{border-collapse:collapse}.xllm-md th,.xllm-md td{border:1px solid var(--jp-border-color2,#ddd);padding:2px 6px}"
    "</style>"
)


@lru_cache(maxsize=1)
def _parser() -> Any:
    from markdown_it import MarkdownIt  # a dependency of rich, which xllm-jupyter requires

    # html=False: raw HTML in a reply is shown as text, never injected into the page;
    # markdown-it also refuses javascript:, vbscript:, file: and (but for images) data: links
    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    md.add_render_rule("image", _image_as_link)
    md.add_render_rule("link_open", _link_open)
    md.add_render_rule("link_close", _link_close)
    return md


def _anchor(href: str) -> str:
    return f'<a href="{escape(href)}" target="_blank" rel="noopener noreferrer">'


def _image_as_link(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    """An image as a link to it: the browser fetches nothing the model names (an exfiltration channel)."""
    token = tokens[idx]
    src = str(token.attrGet("src") or "")
    alt = self.renderInlineAsText(token.children or [], options, env) or src or "image"
    return f"{_anchor(src)}{escape(alt)}</a>" if _WEB.match(src) else f"{escape(alt)} ({escape(src)})"


def _link_open(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    """A web link opens in a new tab; any other is left out (its text shows, then its target as text)."""
    href = str(tokens[idx].attrGet("href") or "")
    env.setdefault("xllm_links", []).append(None if _WEB.match(href) else href)  # links do not nest
    return _anchor(href) if _WEB.match(href) else ""


def _link_close(self: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
    """The end of the link ``_link_open`` began."""
    stack = env.get("xllm_links") or [None]
    shown = stack.pop()
    return "</a>" if shown is None else f" ({escape(shown)})"


# the transcript is rendered whole at every streamed update (each RENDER_INTERVAL): its finished replies,
# which no longer change, come from here instead of being parsed again each time
@lru_cache(maxsize=256)
def markdown_html(text: str) -> str:
    """``text`` rendered as Markdown, as HTML with any raw HTML escaped; an unclosed code fence runs to the end."""
    return f'<div class="xllm-md">{_parser().render(text)}</div>'
