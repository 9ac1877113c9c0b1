"""The documentation quotes each measured number from one place: the results pages (docs/results/).

A number in the prose of the README and of the user pages (a decimal such as 0.987, a percentage, a ratio
such as 1.38x, a time or a size such as 77 s or 17.6 MB) must appear on a results page, each of which is
headed with the command that made it; otherwise the prose quotes none and links the results. Code blocks,
inline code and link targets are not prose. The reference pages (method.md: the paper's equations and
published numbers; design.md and scale.md: the design and its own measured tables) are not checked here.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
#: the prose pages: the README and the user guide's pages
PROSE = [ROOT / "README.md", *(DOCS / p for p in ("index.md", "getting-started.md", "your-model.md", "detector.md",
                                                 "explanations.md", "performance.md"))]

_NUMBER = re.compile(
    r"(?<![\w.\-/:§])(?:Python |torch )?"            # a version (Python 3.11, torch 2.13) is no measurement
    r"(\d+(?:\.\d+)?(?: ?(?:%|x\b| ?(?:ms|s|min|MB|GB|GiB)\b))|\d+\.\d+(?![.\d]))")


def measured_numbers(text: str) -> set[str]:
    """The measured-looking numbers of markdown prose: decimals, percentages, ratios, times and sizes."""
    text = re.sub(r"^```.*?^```", " ", text, flags=re.S | re.M)  # fenced code
    text = re.sub(r"`[^`\n]*`", " ", text)                       # inline code
    text = re.sub(r"\]\([^)]*\)", "]", text)                     # link targets
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)          # comments (section markers)
    found = set()
    for m in _NUMBER.finditer(text):
        if m.group(0).startswith(("Python ", "torch ")):
            continue
        found.add(m.group(1).replace(" ", ""))
    return found


def results_numbers() -> set[str]:
    found: set[str] = set()
    for page in RESULTS.glob("*.md"):
        text = page.read_text(encoding="utf-8")
        found |= {m.group(1).replace(" ", "") for m in _NUMBER.finditer(text)}
    return found


def test_the_number_finder():
    text = ("AUROC 0.987 at 5% FPR, 1.38x the forward, 77 s and 17.6 MB; `0.5` in code, Python 3.11, "
            "version 2.13.0, [a link](results/x.md#0.25), Eq. 2, §2.2, arXiv:1909.13360, 4,000 images, 1e-6\n```\nx = 0.123\n```\n")
    assert measured_numbers(text) == {"0.987", "5%", "1.38x", "77s", "17.6MB"}


def test_results_pages_carry_their_command():
    pages = sorted(p for p in RESULTS.glob("*.md") if p.name != "index.md")
    assert {p.name for p in pages} >= {"mnist.md", "detector-comparison.md", "evasion.md", "benchmarks.md"}
    for page in pages:
        head = "\n".join(page.read_text(encoding="utf-8").splitlines()[:12])
        assert re.search(r"(?:Made by|from the run of)[^\n]*`[^`]+`", head, flags=re.I), f"{page.name}: no command"
        assert "version" in head and "machine" in head, f"{page.name}: the version and the machine"


@pytest.mark.parametrize("page", PROSE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_prose_numbers_come_from_the_results_pages(page):
    allowed = results_numbers()
    stray = sorted(measured_numbers(page.read_text(encoding="utf-8")) - allowed)
    assert not stray, (f"{page.relative_to(ROOT)} quotes numbers that no results page holds: {stray}; "
                       "move the measurement to docs/results/ (with its command) and link it")


def test_a_number_not_in_the_results_is_caught():
    allowed = results_numbers()
    assert "0.987" in allowed  # a real one, from the detector comparison
    prose = "The default reaches AUROC 0.987 on PGD, and 0.4242 on something never measured."
    assert measured_numbers(prose) - allowed == {"0.4242"}


def test_every_detector_names_its_paper_with_a_link():
    import inspect

    from libnet_plugin.builtins import DETECTORS

    for name, cls in DETECTORS.items():
        text = (inspect.getdoc(cls) or "") + (inspect.getmodule(cls).__doc__ or "")
        assert re.search(r"https://arxiv\.org/abs/\d{4}\.\d{4,5}", text), f"{name} ({cls.__name__}): no paper link"
