"""lnp.inspect: the numbers of the report on a small trained model (tests/test_inspection.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close_f32
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.inspection import InspectionError, probeable_layers, spread, sweep_thetas


def clustered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0], [0, 3.0, 0, 0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0, 0, 0]])
    y = torch.arange(n) % 3
    return centres[y] + torch.randn(n, 8, generator=g), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = clustered(150, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), (x, y), clustered(40, 2)


@pytest.fixture(scope="module")
def report(trained):
    model, train, test = trained
    return lnp.inspect(model, train, test, progress=False, indices=[7])


def test_layers_are_chosen_by_spread_of_the_weighted_leaf_modules():
    m = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(6)], nn.Linear(4, 2))
    cands = probeable_layers(m, torch.zeros(3, 4))
    assert cands == ["0.0", "1.0", "2.0", "3.0", "4.0", "5.0", "6"]
    assert spread(cands, 4) == ["0.0", "2.0", "4.0", "6"]
    assert spread(cands[:2], 4) == cands[:2]


def test_sweep_thetas_bracket_the_chosen_theta():
    assert sweep_thetas(0.9) == pytest.approx([0.8, 0.85, 0.9, 0.925])
    assert all(0 < t <= 1 for t in sweep_thetas(0.3))


def test_report_holds_the_papers_numbers(report, trained):
    d = report.to_dict()
    json.dumps(d, allow_nan=False)  # JSON as is
    assert report.layers == ["0", "2", "4"]
    assert d["model_accuracy"] > 0.9
    for l in report.layers:
        row = d["layers"][l]
        sizes = [r["size"] for r in row["sweep"]]
        assert sizes == sorted(sizes)  # a larger theta never keeps fewer nodes
        assert row["theta"] in [r["theta"] for r in row["sweep"]]
        assert 0 <= row["top1_agreement"] <= row["top3_agreement"] <= 1
        assert len(row["confusion_index"]) == 3
    # the output layer agrees with the model on (almost) every input
    assert d["layers"]["4"]["top1_agreement"] > 0.9
    path = d["decision_path"]
    assert [c["class"] for c in path["classes"]] == [0, 1, 2]
    assert all(c["first_layer"] in report.layers for c in path["classes"] if c["n"])
    assert len(d["consistency"]["cpl"]) == 40
    assert all(0 <= v <= 1 + 1e-6 for v in d["consistency"]["cpl"])
    det = d["detector"]
    assert det["calibration_inputs"] == 20 and len(det["scores"]) == 40
    assert det["flagged"] == [i for i, s in enumerate(det["scores"]) if s > det["threshold"]]


def test_sample_holds_top3_and_exemplars_of_every_layer(report, trained):
    d = report.to_dict()
    whys = [s["why"] for s in d["samples"]]
    assert whys.count("least consistent") == 3 and 7 in [s["index"] for s in d["samples"]]
    cpls = [s["cpl"] for s in d["samples"]]
    assert max(cpls[:3]) <= min(cpls[3:6]) + 1e-6
    for s in d["samples"]:
        for l in report.layers:
            top = s["layers"][l]["top3"]
            assert len(top) == 3 and top[0]["evidence"] >= top[1]["evidence"] >= top[2]["evidence"]
            assert all(0 <= i < 150 for i in s["layers"][l]["exemplars"])
    assert report.images == {}  # 8 features per input are no image


def test_same_numbers_as_the_public_api(report, trained):
    """The report's agreement and CPL are what LibraryNetwork.evaluate / consistency give at the same thetas."""
    model, train, test = trained
    d = report.to_dict()
    net = lnp.LibraryNetwork(model, report.layers, thresholds=d["settings"]["thresholds_chosen"]).fit(train)
    ev = net.evaluate(test, progress=False)
    for l in report.layers:
        assert d["layers"][l]["size"] == net.library_sizes_[l]
        assert d["layers"][l]["top1_agreement"] == pytest.approx(ev[l]["top1_agreement"], abs=1e-6)
        assert d["layers"][l]["accuracy"] == pytest.approx(ev[l]["accuracy"], abs=1e-6)
    assert_close_f32(torch.tensor(d["consistency"]["cpl"]), net.consistency(test[0]))
    ci = net.confusion_index(test, progress=False)
    for l in report.layers:
        assert_close_f32(torch.tensor([[float("nan") if v is None else v for v in r]
                                       for r in d["layers"][l]["confusion_index"]]), ci[l])


def test_bad_inputs_are_refused_before_the_long_work(trained):
    model, (x, y), test = trained
    with pytest.raises(InspectionError, match=r"shape \(150, 5\)"):
        lnp.inspect(model, torch.randn(150, 5), progress=False)
    with pytest.raises(InspectionError, match="label 7 at index 0 is out of range"):
        lnp.inspect(model, (x, torch.full_like(y, 7)), progress=False)
    with pytest.raises(InspectionError, match="out of range for 40 test inputs"):
        lnp.inspect(model, (x, y), test, indices=[40], progress=False)
    with pytest.raises(InspectionError, match="not probed"):
        lnp.inspect(model, (x, y), test, layers=["0", "4"], thresholds={"2": 0.5}, progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['topk'\]"):
        lnp.inspect(model, (x, y), test, topk=5)
    with pytest.raises(InspectionError, match=r"auto_thresholds=\{'target': 0.2\}.*thresholds=0.5"):
        lnp.inspect(model, (x, y), test, layers=["0", "4"], thresholds=0.5, auto_thresholds={"target": 0.2})
    with pytest.raises(TypeError, match="options must be an InspectOptions"):
        lnp.inspect(model, (x, y), test, options={"top_k": 5})


def test_thresholds_given_per_layer_and_no_labels(trained):
    model, (x, _), _ = trained
    options = lnp.InspectOptions(sweep=[0.3], progress=False, sample=5)
    r = lnp.inspect(model, x[:100], x[100:], layers=["0", "4"], thresholds={"0": 0.5}, options=options,
                    sample=1).to_dict()  # a keyword replaces the setting of options
    assert sum(s["why"] == "least consistent" for s in r["samples"]) == 1  # sample=1, not 5
    assert r["settings"]["thresholds_chosen"]["0"] == 0.5 and r["settings"]["auto_layers"] == ["4"]
    assert [row["theta"] for row in r["layers"]["0"]["sweep"]] == [0.3, 0.5]
    assert r["layers"]["0"]["accuracy"] is None and r["model_accuracy"] is None
    assert r["settings"]["confusion_basis"].startswith("the model's answers")


def test_readme_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from readme_blocks import run_readme_block

    monkeypatch.chdir(tmp_path)
    _, ns = run_readme_block("inspect")
    assert ns["report"].layers == ["0", "2", "4"]
    assert (tmp_path / "inspect.html").read_text().startswith("<!DOCTYPE html>")


class TokenBag(nn.Module):
    """Token ids -> embedding -> mean -> two linear layers (a text classifier in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(ids).mean(1))))


def test_token_inputs_show_token_ids_not_thumbnails():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (120, 7), generator=g)
    r = lnp.inspect(TokenBag().eval(), ids[:80], ids[80:], progress=False, sample=1)
    d = r.to_dict()
    assert r.layers == ["emb", "fc", "out"] and r.images == {}
    assert d["samples"][0]["token_ids"] == ids[80 + d["samples"][0]["index"]].tolist()


def test_sweep_false_means_no_sweep_and_a_bad_sweep_names_the_setting(trained):
    model, (x, y), (xt, yt) = trained
    kw = dict(layers=["0", "2"], thresholds=0.9, sample=1, progress=False)
    none = lnp.inspect(model, (x, y), (xt, yt), sweep=False, **kw)
    empty = lnp.inspect(model, (x, y), (xt, yt), sweep=(), **kw)
    assert none.data["settings"]["sweep"] == empty.data["settings"]["sweep"] == {"0": [0.9], "2": [0.9]}
    with pytest.raises(TypeError, match="sweep must be thetas"):
        lnp.inspect(model, (x, y), (xt, yt), sweep=0.5, **kw)
