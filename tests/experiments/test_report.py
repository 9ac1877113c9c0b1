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


# --------------------------------------------------------------------------------------------------
# Output folders never lose a file that the project did not write (issue 25)
# --------------------------------------------------------------------------------------------------


def _tree(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (hidden ones included; links as their target)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if not p.is_dir() or p.is_symlink()}


def _earlier_run(folder, **files):
    """A folder as a complete run leaves it: its files and the manifest listing them."""
    from libnet_plugin.experiments.report import write_run_manifest

    folder.mkdir(parents=True)
    for name, text in (files or {"report.json": "{}", "report.md": "# a report\n"}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    write_run_manifest(folder)
    return folder


def test_a_folder_without_manifest_is_refused_even_with_a_report_json(tmp_path):
    from libnet_plugin.experiments.report import ExperimentError, check_run_folder, staged_output

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("do not delete")
    (mine / "report.json").write_text("")  # an empty report.json proves nothing
    before = _tree(mine)
    for marker in ("detectors.json", ".libnet-run"):  # the markers of earlier versions prove nothing either
        (mine / marker).write_text("a libnet-plugin run folder\n")
        with pytest.raises(ExperimentError, match="no run manifest") as err:
            check_run_folder(mine)
        assert "thesis.tex" in str(err.value) and "not an earlier run's" in str(err.value)
        (mine / marker).unlink()
    with pytest.raises(ExperimentError, match="thesis.tex"), staged_output(mine):
        raise AssertionError("the run started")
    assert _tree(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_earlier_run_is_replaced_only_when_it_holds_nothing_else_unchanged(tmp_path):
    from libnet_plugin.experiments.report import ExperimentError, check_run_folder, staged_output

    out = _earlier_run(tmp_path / "run", **{"report.json": "{}", "figs/a.png": "png"})
    assert check_run_folder(out) == out
    (out / "notes.txt").write_text("mine")  # a file of the user's beside the run's
    with pytest.raises(ExperimentError, match=r"notes\.txt") as err:
        check_run_folder(out)
    assert "no run manifest" not in str(err.value)
    (out / "notes.txt").unlink()
    (out / "figs" / "a.png").write_text("edited by the user")  # listed, but not what the run wrote
    with pytest.raises(ExperimentError, match=r"figs/a\.png \(changed since the run wrote it\)"):
        check_run_folder(out)
    (out / "figs" / "a.png").write_text("png")
    (out / "figs" / "extra").mkdir()  # a folder the run did not make
    with pytest.raises(ExperimentError, match="figs/extra/"):
        check_run_folder(out)
    (out / "figs" / "extra").rmdir()
    (out / "link").symlink_to(tmp_path)  # a run writes no links
    with pytest.raises(ExperimentError, match=r"link \(a link\)"):
        check_run_folder(out)
    (out / "link").unlink()
    with staged_output(out) as stage:
        (stage / "report.json").write_text("new")
    assert _tree(out).keys() == {".libnet-run", "report.json"} and (out / "report.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging or old folder left
    with staged_output(out) as stage:  # the new run's own manifest lets the next run replace it
        (stage / "report.md").write_text("newer")
    assert _tree(out).keys() == {".libnet-run", "report.md"}


def test_a_crafted_manifest_cannot_reach_outside_the_folder(tmp_path):
    import hashlib

    from libnet_plugin.experiments.report import ExperimentError, check_run_folder

    outside = tmp_path / "thesis.tex"
    outside.write_text("do not delete")
    out = _earlier_run(tmp_path / "run")
    manifest = json.loads((out / ".libnet-run").read_text())
    manifest["files"]["../thesis.tex"] = {"size": 13, "sha256": hashlib.sha256(b"do not delete").hexdigest()}
    (out / ".libnet-run").write_text(json.dumps(manifest))
    with pytest.raises(ExperimentError, match="no run manifest"):  # an invalid manifest is no manifest
        check_run_folder(out)
    for bad in ("[" * 100_000, '{"format": 1}', "not json"):
        (out / ".libnet-run").write_text(bad)
        with pytest.raises(ExperimentError, match="no run manifest"):
            check_run_folder(out)
    assert outside.read_text() == "do not delete"


def test_paths_are_resolved_before_the_current_folder_check(tmp_path, monkeypatch):
    from libnet_plugin.experiments.report import ExperimentError, check_run_folder, staged_output

    project = _earlier_run(tmp_path / "P", **{"report.json": "{}", "proj/notes.txt": "my project"})
    monkeypatch.chdir(project / "proj")
    before = _tree(tmp_path)
    for given in ("../../P", "..", ".", str(tmp_path)):
        with pytest.raises(ExperimentError, match="holds the current folder"):
            check_run_folder(given)
    (tmp_path / "alias").symlink_to(project)  # a link to the folder holding the current one
    with pytest.raises(ExperimentError, match="holds the current folder"), staged_output(tmp_path / "alias"):
        raise AssertionError("the run started")
    (tmp_path / "alias").unlink()
    assert _tree(tmp_path) == before


def test_an_out_that_is_a_link_keeps_its_link_and_the_run_goes_to_its_target(tmp_path):
    from libnet_plugin.experiments.report import staged_output

    target = _earlier_run(tmp_path / "disk" / "run")
    link = tmp_path / "runs"
    link.symlink_to(target, target_is_directory=True)
    with staged_output(link) as stage:
        assert stage.parent == target.parent  # staged beside the target, swapped in by renames there
        (stage / "report.json").write_text("new")
    assert link.is_symlink() and link.resolve() == target and (link / "report.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "runs"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["run"]  # no hidden leftovers


def test_files_put_into_out_during_the_run_are_kept_and_so_is_the_run(tmp_path):
    from libnet_plugin.experiments.report import ExperimentError, staged_output

    out = _earlier_run(tmp_path / "run")
    with pytest.raises(ExperimentError, match="while the run was going on") as err, staged_output(out) as stage:
        (stage / "report.json").write_text("new")
        (out / "thesis.tex").write_text("saved here during the run")
    assert (out / "thesis.tex").read_text() == "saved here during the run" and (out / "report.json").read_text() == "{}"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.new-")]
    assert len(kept) == 1 and (kept[0] / "report.json").read_text() == "new" and str(kept[0]) in str(err.value)


def test_removing_an_earlier_run_deletes_only_the_files_it_lists(tmp_path):
    from libnet_plugin.experiments.report import _remove_run

    old = _earlier_run(tmp_path / "old", **{"report.json": "{}", "figs/a.png": "png"})
    (old / "figs" / "late.txt").write_text("appeared after the check")
    with pytest.warns(RuntimeWarning, match="kept in"):
        _remove_run(old)
    assert _tree(old) == {"figs/late.txt": b"appeared after the check"}


@pytest.mark.parametrize("command", [["reproduce", "mnist"], ["evaluate-detectors"]])
def test_the_commands_refuse_a_folder_with_a_foreign_file_before_any_work(command, tmp_path, monkeypatch, capsys):
    from libnet_plugin.cli import main
    from libnet_plugin.experiments import data, mnist

    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(mnist, "_load_data", no_work)
    monkeypatch.setattr(data, "load_mnist_default", no_work)
    out = tmp_path / "P"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    (out / "report.json").write_text("")
    before = _tree(out)
    rc = main([*command, "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "thesis.tex" in err and "no run manifest" in err and "Traceback" not in err
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["P"]
