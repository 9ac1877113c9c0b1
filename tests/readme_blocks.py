"""Helpers for the tests that run the README's examples as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the user guide: the README's sections that a newcomer does not need on the first page
GUIDE = ROOT / "docs" / "guide.md"


def readme_code_blocks(section: str, lang: str = "python", path: Path | None = None) -> list[str]:
    """The fenced ``lang`` code blocks of the section between ``<!-- section:NAME -->`` markers, in ``path``
    (default: the README, then the user guide)."""
    found = None
    for doc in [path] if path is not None else [README, GUIDE]:
        text = doc.read_text(encoding="utf-8")
        found = re.search(rf"<!-- section:{re.escape(section)} -->(.*?)<!-- /section:{re.escape(section)} -->",
                          text, re.S)
        if found is not None:
            break
    if found is None:
        raise LookupError(f"README has no section {section!r}")
    return re.findall(rf"^```{re.escape(lang)}[ \t]*\n(.*?)^```[ \t]*$", found.group(1), re.S | re.M)


def run_readme_block(section: str, index: int = 0) -> tuple[str, dict[str, Any]]:
    """Execute the ``index``-th python block of a README section (in the current folder); return the
    code and the namespace it left."""
    blocks = readme_code_blocks(section)
    if len(blocks) <= index:
        raise AssertionError(f"the README's {section} section has no python example number {index}")
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    exec(compile(blocks[index], f"README.md[{section}]", "exec"), namespace)
    return blocks[index], namespace
