"""The README's code runs as written, it reads in ten minutes (length, order, no dates, few table rows, links
to every documentation page), and its set-up commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from readme_blocks import readme_code_blocks, run_readme_block

import libnet_plugin as lnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

#: the README's sections, in the order of issue 31 (what a newcomer needs first comes first)
ORDER = ["Install", "Quick start: a detector", "What it does not catch", "Your model", "Serving", "Plugins",
         "Reproducing the paper", "Documentation", "License and citation"]


def headings(text: str) -> list[str]:
    """The ``## `` headings of a markdown text, outside code blocks."""
    return re.findall(r"^## (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M)


def section(heading: str) -> str:
    """The README's text from ``## heading`` to the next ``## `` heading."""
    start = README.index(f"## {heading}\n")
    rest = README[start + len(heading) + 4:]
    m = re.search(r"^## ", rest, flags=re.M)
    return rest[: m.start()] if m else rest


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_usage_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, namespace = run_readme_block("library-network")
    net, net2 = namespace["net"], namespace["net2"]
    assert set(net.library_sizes_) == {"0", "2", "4"}
    assert namespace["cpl"].shape == (200,)
    assert net2.library_sizes_ == net.library_sizes_
    assert (tmp_path / "net.lnp").is_file()


def test_setup_commands_match_ci():
    commands = re.findall(r"```\n(.*?)\n```", section("Reproducing the paper"), flags=re.S)
    assert commands == ["make reproduce", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert "libnet reproduce mnist" in makefile and "pytest tests integration_tests" in makefile
    assert re.search(r"^\t(?:NO_MKDOCS_2_WARNING=1 )?\$\(BIN\)/mkdocs build --strict", makefile, flags=re.M), "make test builds the site"
    assert re.search(r"^docs: ", makefile, flags=re.M) and "mkdocs serve" in makefile


def test_readme_extraction_helper(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- section:a -->\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python\ny = 2\n```\n"
                      "<!-- /section:a -->\n```python\nz = 3\n```\n")
    assert readme_code_blocks("a", path=readme) == ["x = 1\n", "y = 2\n"]
    assert readme_code_blocks("a", "bash", path=readme) == ["ls\n"]
    with pytest.raises(LookupError):
        readme_code_blocks("b", path=readme)


def test_a_section_lives_in_one_page(monkeypatch, tmp_path):
    import readme_blocks

    page = "<!-- section:twice -->\n```python\nx = 1\n```\n<!-- /section:twice -->\n"
    (tmp_path / "a.md").write_text(page)
    (tmp_path / "b.md").write_text(page)
    monkeypatch.setattr(readme_blocks, "doc_pages", lambda: sorted(tmp_path.glob("*.md")))
    with pytest.raises(LookupError, match="several pages"):
        readme_code_blocks("twice")


def test_your_model_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _, ns = run_readme_block("your-model", 0)
    assert ns["net"].n_train_ == 300 and ns["flags"].shape == (8,)
    assert float(ns["net"].libraries_["1.bn"].nodes.min()) < 0  # recorded before the in-place ReLU
    pytest.importorskip("transformers")
    _, ns = run_readme_block("your-model", 1)
    assert ns["out"].output.shape == (4, 3) and ns["out"].flagged.shape == (4,)
    assert ns["net"].n_train_ == 200


def test_detector_quickstart_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _, ns = run_readme_block("quickstart-detector")
    assert ns["out"].output.shape == (8, 4) and ns["out"].flagged.dtype == torch.bool
    assert (tmp_path / "det.lnp").is_file()
    assert ns["det"].threshold_ is not None and ns["det"].method == "library-fusion"
    torch.testing.assert_close(ns["det"].score(ns["x"]), ns["out"].score)  # the loaded detector scores alike


def test_plugin_example_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _, ns = run_readme_block("quickstart-detector")  # model, train, clean, x
    code = readme_code_blocks("plugin")[0]
    assert len(code.splitlines()) <= 25
    exec(compile(code, "README.md[plugin]", "exec"), ns)
    assert ns["gap"].method == "logit-gap"
    assert ns["flags"].shape == (8,) and ns["flags"].dtype == torch.bool
    top2 = ns["model"](ns["x"]).topk(2, dim=1).values
    torch.testing.assert_close(ns["gap"].score(ns["x"]), top2[:, 1] - top2[:, 0])


def test_every_readme_python_block_runs_in_a_test():
    blocks = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
    tested = readme_code_blocks("quickstart-detector") + readme_code_blocks("plugin")
    assert blocks and sorted(blocks) == sorted(tested)


def test_the_readme_is_a_ten_minute_read():
    assert len(README.splitlines()) <= 300  # the rest lives in docs/, the numbers in docs/results/


def test_the_readme_sections_come_in_the_issues_order():
    assert headings(README) == ORDER


def test_the_readme_has_a_table_of_contents():
    contents = next(line for line in README.split("\n\n") if line.startswith("**Contents:**"))
    anchors = re.findall(r"\]\(#([a-z0-9-]+)\)", contents)
    expected = [re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in ORDER]
    assert anchors == expected


def test_the_readme_has_no_dates():
    months = "January|February|March|April|May|June|July|August|September|October|November|December"
    dates = re.findall(rf"\b\d{{4}}-\d{{2}}-\d{{2}}\b|\b(?:{months}) \d{{1,2}},? \d{{4}}\b|\b\d{{1,2}} (?:{months}) \d{{4}}\b",
                       README)
    assert not dates, f"dates belong in CHANGELOG.md or the results pages: {dates}"
    history = re.findall(r"[^.]*\b(?:since|until) (?:\d|version|v\d)[^.]*\.|[^.]*\bwas [^.]* before\b[^.]*\.", README)
    assert not history, f"history belongs in CHANGELOG.md: {history}"


def test_the_readme_has_at_most_40_table_rows():
    rows = [line for line in prose(README).splitlines() if line.lstrip().startswith("|")]
    assert len(rows) <= 40, len(rows)


def test_the_readme_links_every_documentation_page():
    linked = {pathlib.Path(m).as_posix() for m in re.findall(r"\]\((docs/[^)#]+\.md)", README)}
    pages = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    pages |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "api").glob("*.md")}
    pages.add("docs/results/index.md")
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"
    targets = re.findall(r"\]\(((?!https?:|#)[^)#]+)(?:#[^)]*)?\)", README)
    assert [t for t in targets if not (ROOT / t).exists()] == []
    for path in ("LICENSE", "CITATION.cff", "CHANGELOG.md"):
        assert f"]({path})" in README and (ROOT / path).is_file(), path


def test_the_readme_cites_the_paper():
    cff = (ROOT / "CITATION.cff").read_text()
    assert "Library network, a possible path to explainable neural networks" in cff and "1909.13360" in cff
    assert "arXiv:1909.13360" in section("License and citation") and "MIT" in section("License and citation")


@pytest.mark.parametrize("recipe, layers", [
    ("fused-candidate", ["conv1", "conv2", "conv2:input", "fc1:input", "fc1"]),  # issue 28's candidate, by name
    ("fusion-recipe", ["conv1", "conv2:input", "fc1:input", "fc2:input"]),  # the same fusion, layers by rule
])
def test_the_fused_detector_recipes_run(recipe, layers):
    """docs/detector.md's recipes for issue 28's fused detector, on the paper's MNIST net with random weights."""
    from libnet_plugin.experiments.models import MnistNet

    torch.manual_seed(0)
    ns = {"lnp": lnp, "model": MnistNet().eval(), "train": torch.rand(200, 1, 28, 28),
          "clean": torch.rand(100, 1, 28, 28)}
    exec(compile(readme_code_blocks(recipe)[0], f"docs/detector.md[{recipe}]", "exec"), ns)
    det = ns["det"]
    assert det.method == "library-gaussian-fusion" and det.is_calibrated and det.net.layers == layers
    assert det.scorer.feature_names()[-1] == "peer/vim" and det.scorer.combination == "truncated"
    assert det.predict(torch.rand(3, 1, 28, 28)).shape == (3,)
