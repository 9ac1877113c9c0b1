"""Helpers for the tests that run the examples of the README and of the documentation pages as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the documentation site's pages (mkdocs.yml): the sections that a newcomer does not need on the first page
DOCS = ROOT / "docs"


def doc_pages() -> list[Path]:
    """The README, then every markdown page under docs/ (sorted)."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def readme_code_blocks(section: str, lang: str = "python", path: Path | None = None) -> list[str]:
    """The fenced ``lang`` code blocks of the section between ``<!-- section:NAME -->`` markers, in ``path``
    (default: the one page among the README and docs/**/*.md that holds it; two pages holding it is an error)."""
    pattern = rf"<!-- section:{re.escape(section)} -->(.*?)<!-- /section:{re.escape(section)} -->"
    found = []
    for doc in [path] if path is not None else doc_pages():
        match = re.search(pattern, doc.read_text(encoding="utf-8"), re.S)
        if match is not None:
            found.append((doc, match))
    if not found:
        raise LookupError(f"no page has a section {section!r}")
    if len(found) > 1:
        pages = [d.relative_to(ROOT).as_posix() if d.is_relative_to(ROOT) else str(d) for d, _ in found]
        raise LookupError(f"section {section!r} is in several pages: {pages}")
    return re.findall(rf"^```{re.escape(lang)}[ \t]*\n(.*?)^```[ \t]*$", found[0][1].group(1), re.S | re.M)


def run_readme_block(section: str, index: int = 0) -> tuple[str, dict[str, Any]]:
    """Execute the ``index``-th python block of a README section (in the current folder); return the
    code and the namespace it left."""
    blocks = readme_code_blocks(section)
    if len(blocks) <= index:
        raise AssertionError(f"the {section} section has no python example number {index}")
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    exec(compile(blocks[index], f"README.md[{section}]", "exec"), namespace)
    return blocks[index], namespace
