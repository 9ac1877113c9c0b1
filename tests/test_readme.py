"""The README's code runs as written, and its set-up commands are the ones CI runs."""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from readme_blocks import readme_code_blocks, run_readme_block

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section that starts at ``heading`` (up to the next heading of
    the same or a higher level)."""
    level = len(heading) - len(heading.lstrip("#"))
    start = README.index(heading)
    rest = README[start + len(heading):]
    m = re.search(rf"^#{{1,{level}}} ", rest, flags=re.M)
    section = rest[: m.start()] if m else rest
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_usage_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks("## Using it")
    assert blocks, "the README's usage section has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    net, net2 = namespace["net"], namespace["net2"]
    assert set(net.library_sizes_) == {"0", "2", "4"}
    assert namespace["cpl"].shape == (200,)
    assert net2.library_sizes_ == net.library_sizes_
    assert (tmp_path / "net.lnp").is_file()


def test_setup_commands_match_ci():
    setup = README[README.index("## Set-up"): README.index("## Using it")]
    commands = re.findall(r"```\n(.*?)\n```", setup, flags=re.S)
    assert commands == ["make reproduce", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert "libnet reproduce mnist" in makefile and "pytest tests integration_tests" in makefile


def test_readme_extraction_helper(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- section:a -->\n```python\nx = 1\n```\ntext\n```bash\nls\n```\n```python\ny = 2\n```\n"
                      "<!-- /section:a -->\n```python\nz = 3\n```\n")
    assert readme_code_blocks("a", path=readme) == ["x = 1\n", "y = 2\n"]
    assert readme_code_blocks("a", "bash", path=readme) == ["ls\n"]
    with pytest.raises(LookupError):
        readme_code_blocks("b", path=readme)


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


def test_the_readme_is_a_ten_minute_read():
    assert len(README.splitlines()) < 300  # results and history live in docs/guide.md
