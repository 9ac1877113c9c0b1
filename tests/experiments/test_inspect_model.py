"""`libnet inspect`: model and data loading, the checks before the long work (exit 2), the report folder."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from libnet_plugin.cli import main
from libnet_plugin.experiments.inspect_model import load_data, parse_thresholds
from libnet_plugin.inspection import InspectionError

FACTORY = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 16), nn.ReLU(),
                         nn.Linear(16, 3))


def not_a_model():
    return 3
'''


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A folder with a model factory (never seen by the project) and .npz data, as the current folder."""
    name = f"userfactory_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    (tmp_path / "broken_factory.py").write_text("raise RuntimeError('boom at import')\n")
    rng = np.random.default_rng(0)
    x = rng.random((60, 1, 12, 12), dtype=np.float32)
    y = np.arange(60) % 3
    np.savez(tmp_path / "train.npz", x=x[:40], y=y[:40])
    np.savez(tmp_path / "test.npz", x=x[40:], y=y[40:])
    np.savez(tmp_path / "flat.npz", x=rng.random((40, 7), dtype=np.float32))
    np.savez(tmp_path / "labels.npz", x=x[:40], y=np.full(40, 5))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path, name
    sys.modules.pop(name, None)
    sys.modules.pop("broken_factory", None)


@pytest.mark.slow
def test_factory_model_writes_the_report_folder(project, capsys):
    folder, name = project
    rc = main(["inspect", f"{name}:make", "--train", "train.npz", "--test", "test.npz", "--out", "rep",
               "--thresholds", "0=0.6", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "layers: ['0', '3', '5']" in out
    d = json.loads((folder / "rep" / "report.json").read_text())
    assert d["settings"]["layers"] == ["0", "3", "5"] and d["settings"]["thresholds_chosen"]["0"] == 0.6
    assert d["settings"]["n_test"] == 20 and d["settings"]["model"] == f"{name}:make"
    page = (folder / "rep" / "index.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 5 and "<script" not in page
    assert (folder / "rep" / ".libnet-run").is_file()  # the run manifest: a later run may replace the folder
    # lnp.inspect on the same model and data gives the same numbers
    import libnet_plugin as lnp

    model = __import__(name).make()
    train, test = (np.load(folder / f) for f in ("train.npz", "test.npz"))
    same = lnp.inspect(model, (torch.from_numpy(train["x"]), torch.from_numpy(train["y"])),
                       (torch.from_numpy(test["x"]), torch.from_numpy(test["y"])), thresholds={"0": 0.6},
                       progress=False).to_dict()
    for key in ("layers", "decision_path", "consistency", "detector", "samples", "model_accuracy"):
        assert same[key] == d[key], key


@pytest.mark.parametrize("argv, message", [
    (["{name}:nope", "--train", "train.npz"], "has no attribute 'nope'"),
    (["missing_module_xyz:make", "--train", "train.npz"], "module 'missing_module_xyz' does not import"),
    (["broken_factory:make", "--train", "train.npz"], "boom at import"),
    (["{name}:not_a_model", "--train", "train.npz"], "returned 'int', not a torch nn.Module"),
    (["{name}:make", "--train", "flat.npz"], "refuses the training inputs of shape (40, 7)"),
    (["{name}:make", "--train", "labels.npz"], "label 5 at index 0 is out of range"),
    (["{name}:make", "--train", "nothere.npz"], "no such file"),
    (["{name}:make", "--train", "train.npz", "--layers", "0", "9"], "9"),
    (["{name}:make", "--train", "train.npz", "--thresholds", "0=x"], "is not a number"),
    (["m.onnx", "--train", "train.npz"], "no such ONNX file"),
])
def test_bad_input_exits_2_with_a_clear_error(project, capsys, argv, message):
    _, name = project
    assert main(["inspect", *[a.format(name=name) for a in argv], "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_output_folder_with_foreign_files_is_refused_before_any_work(project, capsys):
    folder, name = project
    (folder / "mine").mkdir()
    (folder / "mine" / "notes.txt").write_text("keep")
    assert main(["inspect", f"{name}:make", "--train", "train.npz", "--out", "mine"]) == 2
    err = capsys.readouterr()
    assert "notes.txt" in err.err and "[checks]" not in err.out
    assert (folder / "mine" / "notes.txt").read_text() == "keep"


def test_list_layers(project, capsys):
    _, name = project
    assert main(["inspect", f"{name}:make", "--train", "train.npz", "--list-layers"]) == 0
    assert "probe-able layers (3): 0 3 5" in capsys.readouterr().out


def test_data_formats(tmp_path):
    x, y = torch.rand(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    torch.save((x, y), tmp_path / "pair.pt")
    from safetensors.torch import save_file

    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    for f in ("d.pt", "pair.pt", "d.safetensors"):
        gx, gy = load_data(str(tmp_path / f))
        assert torch.equal(gx, x) and torch.equal(gy, y)
    torch.save({"inputs": x}, tmp_path / "nox.pt")
    with pytest.raises(InspectionError, match="no tensor named 'x'"):
        load_data(str(tmp_path / "nox.pt"))
    np.savez(tmp_path / "bad.npz", x=np.zeros((6, 3)), y=np.zeros(5))
    with pytest.raises(InspectionError, match="one label per input"):
        load_data(str(tmp_path / "bad.npz"))
    with pytest.raises(InspectionError, match="unknown format .csv"):
        (tmp_path / "d.csv").write_text("1")
        load_data(str(tmp_path / "d.csv"))
    assert parse_thresholds(["0.5"]) == 0.5
    with pytest.raises(InspectionError, match="L=T"):
        parse_thresholds(["0.5", "fc=0.3"])


@pytest.mark.slow
def test_onnx_export_of_a_new_model(project, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from libnet_onnx import export_onnx

    folder, name = project
    sys.path.insert(0, str(folder))
    model = __import__(name).make().eval()
    export_onnx(model, torch.rand(2, 1, 12, 12), folder / "m.onnx", dynamo=False)
    rc = main(["inspect", "m.onnx", "--train", "train.npz", "--test", "test.npz", "--out", "onnxrep",
               "--no-progress", "--sample", "1"])
    assert rc == 0, capsys.readouterr().err
    d = json.loads((folder / "onnxrep" / "report.json").read_text())
    assert d["settings"]["layers"] == ["0", "3", "5"]
    assert d["settings"]["layer_choice"].startswith("ONNX")


def test_image_folder(tmp_path):
    from PIL import Image

    from libnet_plugin.experiments.inspect_model import load_image_folder

    for c, value in (("cat", 0), ("dog", 255)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((6, 5), value, dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    x, y = load_data(str(tmp_path / "imgs"))
    assert x.shape == (4, 1, 6, 5) and y.tolist() == [0, 0, 1, 1]
    assert float(x[0].max()) == 0.0 and float(x[3].min()) == 1.0
    Image.new("RGB", (9, 9), (255, 0, 0)).save(tmp_path / "imgs" / "dog" / "big.png")
    with pytest.raises(InspectionError, match="--image-size"):
        load_data(str(tmp_path / "imgs"))
    x, y, names = load_image_folder(str(tmp_path / "imgs"), (4, 4))
    assert x.shape == (5, 3, 4, 4) and names == ["cat", "dog"]
    assert x[4, :, 0, 0].tolist() == [1.0, 0.0, 0.0]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InspectionError, match="no image"):
        load_data(str(tmp_path / "empty"))
