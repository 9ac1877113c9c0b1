"""Report writing (experiments.report): writable folders, atomic NaN-free JSON, markdown tables, timers."""

from __future__ import annotations

import json

import pytest
import torch

from libnet_plugin.experiments.report import (
    StageTimer,
    ensure_writable_dir,
    markdown_table,
    write_json_atomic,
)


def test_writable_dir_checks(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        ensure_writable_dir(f)
    with pytest.raises(PermissionError, match="not writable"):
        ensure_writable_dir(f / "sub")


def test_json_report_is_atomic_and_nan_free(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": torch.tensor([1.0, float("nan")]), 0.25: (1, float("inf"))})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "0.25": [1, None]}
    with pytest.raises(TypeError, match="JSON"):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text())["a"] == [1.0, None]  # the earlier report is intact
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_markdown_table_and_timer():
    assert markdown_table(["x", "y"], [[0.12345, None]]).splitlines()[-1] == "| 0.123 | n/a |"
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["x"], [[1, 2]])
    msgs = []
    timer = StageTimer(log=msgs.append)
    with timer.stage("a"):
        pass
    with pytest.raises(RuntimeError):
        with timer.stage("b"):
            raise RuntimeError("boom")
    assert set(timer.as_dict()) == {"a", "b", "total"} and len(msgs) == 4


def test_a_staged_run_replaces_only_an_earlier_run_and_only_when_complete(tmp_path, monkeypatch):
    import pytest

    from libnet_plugin.experiments.report import ExperimentError, staged_output

    out = tmp_path / "run"
    with staged_output(out) as stage:
        (stage / "report.json").write_text("1")
    with pytest.raises(RuntimeError), staged_output(out) as stage:  # a failed rerun
        (stage / "report.json").write_text("2")
        raise RuntimeError("boom")
    assert (out / "report.json").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with staged_output(out) as stage:  # a complete rerun replaces the folder as a whole
        (stage / "other.txt").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == [".libnet-run", "other.txt"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    with pytest.raises(ExperimentError, match="not an earlier run's"), staged_output(mine):
        pass
    assert (mine / "thesis.tex").exists()
    monkeypatch.chdir(out)
    with pytest.raises(ExperimentError, match="holds the current folder"), staged_output(tmp_path):
        pass
