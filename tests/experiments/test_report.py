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
