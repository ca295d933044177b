"""Relative links in the README and docs/ lead somewhere: the file exists and a `#anchor` names one of its headings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```.*?```", re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")  # a link written inside `code` is an example, not a link
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """The `#anchor`s GitHub gives the headings of ``markdown`` (lowercased, punctuation dropped, spaces to hyphens)."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.*)$", FENCE.sub("", markdown), re.M):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(path: Path) -> list[str]:
    """The relative links in ``path`` (outside code blocks) whose file or anchor does not exist."""
    bad = []
    for link in LINK.findall(INLINE_CODE.sub("", FENCE.sub("", path.read_text()))):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto: ...
            continue
        target_name, _, anchor = link.partition("#")
        target = (path.parent / target_name) if target_name else path
        if not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text()):
            bad.append(f"{link}: no heading with that anchor")
    return bad


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(path):
    assert broken_links(path) == []


def test_the_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## The `server` section — keys\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#the-server-section--keys) [x](docs/b.md) [y](docs/a.md#nope) [z](#here)\n"
                    "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`\n")
    assert broken_links(page) == ["docs/b.md: no such file", "docs/a.md#nope: no heading with that anchor",
                                  "#here: no heading with that anchor"]
