"""LibraryNetwork end to end on hand-set models: W^F, P, CPL, confusion index, exemplars, errors."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from conftest import forward_hook_count
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.errors import LayerNotFoundError, NonFiniteError, NotFittedError, ShapeMismatchError

X = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.2, 1.0]])


def g(c: float) -> float:
    return math.exp(-(1.0 - c) / 0.01)


def cos(u, v) -> float:
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def test_hand_computed_weights_and_evidence(two_layer):
    net = lnp.LibraryNetwork(two_layer, ["a", "b"], thresholds=0.9, top_k=1).fit(X)
    # answers (argmax of identity output): [0, 0, 1, 1]; nodes: inputs 0 and 2 (x1 ~ x0, x3 ~ x2)
    assert net.library_sizes_ == {"a": 2, "b": 2}
    assert net.libraries_["a"].node_indices.tolist() == [0, 2]
    answers = [0, 0, 1, 1]
    nodes = [X[0], X[2]]
    expected = torch.zeros(2, 2)
    for n, node in enumerate(nodes):
        for k, x in enumerate(X):
            o = [1.0 if m == answers[k] else -1.0 for m in range(2)]
            for m in range(2):
                expected[n, m] += g(cos(node, x)) * o[m]
    for layer in ("a", "b"):
        assert torch.allclose(net.readouts_[layer].weight, expected, rtol=1e-5, atol=1e-6)
    q = torch.tensor([[0.6, 0.8]])
    # top_k=1: the best node is node 2 (cosine 0.8) -> P = W[1] * 0.8
    p = net.predict_scores(q)["a"]
    assert torch.allclose(p, expected[1:2] * 0.8, rtol=1e-5)
    # top_k=2: both nodes, weighted by raw cosines 0.6 and 0.8
    p2 = net.predict_scores(q, top_k=2)["b"]
    # the two terms nearly cancel (0.82 - 0.91): compare at float32's absolute precision of the weights
    assert torch.allclose(p2, expected[0:1] * 0.6 + expected[1:2] * 0.8, rtol=1e-5, atol=1e-5)
    assert net.predict(q)["a"].tolist() == [int(p.argmax())]


def test_cpl_matches_equation_5(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)
    scores = net.predict_scores(x[:20], top_k=20)
    s = {l: torch.softmax(p.double(), 1) for l, p in scores.items()}
    pairs = list(combinations(net.layers, 2))
    expected = sum(torch.nn.functional.cosine_similarity(s[a], s[b], dim=1) for a, b in pairs) / len(pairs)
    got = net.consistency(x[:20])
    assert got.shape == (20,)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert bool(((got >= 0) & (got <= 1 + 1e-6)).all())


@pytest.mark.parametrize("k", [1, 3, 7, 8, 50])
def test_topk_evidence_is_the_sum_over_the_k_most_similar_nodes(k):
    from libnet_plugin.readout import topk_evidence

    g = torch.Generator().manual_seed(3)
    h, w = torch.rand(6, 8, generator=g), torch.randn(8, 4, generator=g)
    expected = torch.stack([sum(h[b, n] * w[n] for n in h[b].argsort(descending=True)[:min(k, 8)])
                            for b in range(6)])
    assert torch.allclose(topk_evidence(h, w, k), expected, atol=1e-6)


def test_stable_softmax_handles_huge_evidence():
    from libnet_plugin.metrics import stable_softmax

    p = torch.tensor([[1e6, 0.0, -1e6]])
    s = stable_softmax(p)
    assert torch.isfinite(s).all() and torch.allclose(s, torch.tensor([[1.0, 0.0, 0.0]]))


def test_confusion_index_hand_computed():
    from libnet_plugin.metrics import ConfusionAccumulator

    p = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 2])  # trial 2 is wrong (predicts 0 for class 1) and is not selected
    acc = ConfusionAccumulator(3)
    acc.update(p, y)
    ci = acc.result()
    s = torch.softmax(p.double(), 1)
    assert ci[0, 0] == 0 and ci[1, 1] == 0
    assert torch.isclose(ci[0, 1].double(), s[0, 0] * s[0, 1] / (s[0, 0] ** 2), rtol=1e-5)
    assert torch.isclose(ci[1, 2].double(), s[1, 1] * s[1, 2] / (s[1, 1] ** 2), rtol=1e-5)
    assert torch.isclose(ci[2, 0].double(), s[3, 2] * s[3, 0] / (s[3, 2] ** 2), rtol=1e-5)


def test_confusion_index_and_evaluate_on_network(mlp, mlp_data):
    x, y = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    answers = mlp(x).argmax(1)
    ci = net.confusion_index((x, answers))
    assert set(ci) == {"fc1", "out"} and ci["out"].shape == (4, 4)
    pred = net.predict(x)["out"]
    for d in range(4):
        has_trials = bool(((answers == d) & (pred == d)).any())
        row = ci["out"][d]
        # rows of classes with a correctly predicted trial are finite with a 0 diagonal, the others NaN
        assert (bool(torch.isfinite(row).all()) and row[d] == 0) if has_trials else bool(torch.isnan(row).all())
    ev = net.evaluate((x, answers))
    assert ev["out"]["model_accuracy"] == 1.0
    assert ev["out"]["top1_agreement"] == ev["out"]["accuracy"]
    assert ev["out"]["top1_agreement"] <= ev["out"]["top3_agreement"] <= 1.0
    assert ev["out"]["n"] == 300
    ev_nolabels = net.evaluate(x)
    assert math.isnan(ev_nolabels["fc1"]["accuracy"])
    with pytest.raises(ValueError, match="labels"):
        net.confusion_index(x)


def test_exemplars_point_at_training_inputs(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.95).fit(x)
    nodes = net.libraries_["fc1"].node_indices
    idx, sims = net.exemplars(x[nodes[:3]], k=4, return_similarities=True)
    # a training input that is itself a node finds itself first, with cosine 1
    assert idx["fc1"][:, 0].tolist() == nodes[:3].tolist()
    assert torch.allclose(sims["fc1"][:, 0], torch.ones(3), atol=1e-5)
    assert idx["out"].shape == (3, 4) and bool((sims["out"][:, :-1] >= sims["out"][:, 1:]).all())


def test_fit_accepts_every_data_form(mlp, mlp_data):
    x, y = mlp_data
    ref = lnp.LibraryNetwork(mlp, ["fc2"], thresholds=0.9).fit(x)
    ds = torch.utils.data.TensorDataset(x, y)
    forms = [(x, y), ds, torch.utils.data.DataLoader(ds, batch_size=33), [x[:100], x[100:]],
             [{"x": x[:150]}, {"x": x[150:]}], iter([x[:50], x[50:]])]
    for data in forms:
        # a one-shot iterator needs the first pass's HAPs kept for the Hebbian pass
        net = lnp.LibraryNetwork(mlp, ["fc2"], thresholds=0.9, cache_bytes=2**20).fit(data)
        assert torch.equal(net.libraries_["fc2"].node_indices, ref.libraries_["fc2"].node_indices)
        assert torch.allclose(net.readouts_["fc2"].weight, ref.readouts_["fc2"].weight, rtol=1e-5, atol=1e-5)


def test_second_streaming_pass_equals_cached_pass(mlp, mlp_data):
    x, _ = mlp_data
    cached = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.9, batch_size=64, cache_bytes=2**20).fit(x)
    streamed = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.9, batch_size=64, cache_bytes=0).fit(x)
    for l in ("fc1", "fc2"):
        assert torch.allclose(cached.readouts_[l].weight, streamed.readouts_[l].weight)
    with pytest.raises(ValueError, match="one-shot iterator"):
        lnp.LibraryNetwork(mlp, ["fc1"], thresholds=0.9, cache_bytes=0).fit(iter([x[:10], x[10:]]))


def test_batch_invariance_of_scores(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    full = net.predict_scores(x[:40])
    single = net.predict_scores(x[7:8])
    for l in net.layers:
        assert torch.allclose(full[l][7:8], single[l], rtol=1e-5, atol=1e-5)


def test_bad_input_errors(mlp, mlp_data):
    x, _ = mlp_data
    with pytest.raises(LayerNotFoundError, match=r"'fc3'.*Did you mean.*Valid layer names"):
        lnp.LibraryNetwork(mlp, ["fc3"])
    with pytest.raises(ValueError, match="one value per probed layer"):
        lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds={"fc1": 0.5})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lnp.LibraryNetwork(mlp, ["fc1"], thresholds=1.2)
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.8)
    with pytest.raises(NotFittedError, match="fit"):
        net.predict(x[:2])
    with pytest.raises(ValueError, match="empty"):
        net.fit(x[:0])
    net.fit(x)
    with pytest.raises(ShapeMismatchError, match=r"per input \(11,\).*\[B, 10\]"):
        net.predict(torch.randn(2, 11))
    bad = x[:3].clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        net.predict_scores(bad)
    single = lnp.LibraryNetwork(mlp, ["fc1"], thresholds=0.8).fit(x)
    with pytest.raises(ValueError, match="two probed layers"):
        single.consistency(x[:2])


def test_non_finite_activation_names_layer():
    class Blowup(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.log = nn.Identity()

        def forward(self, x):
            return self.log(torch.log(self.lin(x)))  # log of negative numbers -> NaN

    m = Blowup()
    with torch.no_grad():
        m.lin.weight.fill_(-1.0)
        m.lin.bias.zero_()
    with pytest.raises(NonFiniteError, match="layer 'log'"):
        lnp.LibraryNetwork(m, ["log"]).fit(torch.ones(3, 2))


def test_no_hooks_left_after_fit_predict_and_failure(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.8).fit(x)
    net.predict_scores(x[:5])
    net.exemplars(x[:5])
    assert forward_hook_count(mlp) == 0

    class Boom(Exception):
        pass

    def raise_hook(*_):
        raise Boom()

    h = mlp.out.register_forward_pre_hook(raise_hook)
    try:
        with pytest.raises(Boom):
            net.predict_scores(x[:5])
    finally:
        h.remove()
    assert forward_hook_count(mlp) == 0


def test_layer_that_never_fires():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(LayerNotFoundError, match="'unused' never fired"):
        lnp.LibraryNetwork(Skip(), ["used", "unused"]).fit(torch.randn(4, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_network_matches_cpu(mlp, mlp_data):
    x, _ = mlp_data
    cpu = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.8).fit(x)
    gpu = lnp.LibraryNetwork(mlp.cuda(), ["fc1", "fc2"], thresholds=0.8, device="cuda").fit(x)  # CPU input moved
    assert gpu.libraries_["fc1"].nodes.device.type == "cuda"
    for l in ("fc1", "fc2"):
        assert torch.equal(cpu.libraries_[l].node_indices, gpu.libraries_[l].node_indices)
        assert torch.allclose(cpu.predict_scores(x[:8])[l], gpu.predict_scores(x[:8])[l].cpu(), rtol=1e-4, atol=1e-4)


def test_scores_and_exemplars_for_a_subset_of_layers(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)
    haps = net.probe.run(x[:6]).haps
    sub = net.scores_from_haps({"out": haps["out"]}, layers=["out"])
    assert list(sub) == ["out"] and torch.equal(sub["out"], net.predict_scores(x[:6])["out"])
    idx, sims = net.exemplars_from_haps(haps, k=2, layers=["fc2"])
    assert torch.equal(idx["fc2"], net.exemplars(x[:6], k=2)["fc2"]) and sims["fc2"].shape == (6, 2)
    with pytest.raises(LayerNotFoundError, match="'conv9'.*probed layers"):
        net.scores_from_haps(haps, layers=["conv9"])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"top_k": 2.7}, ValueError, "top_k must be a positive integer"),
    ({"thresholds": True}, TypeError, "threshold must be a number"),
    ({"batch_size": 0}, ValueError, "batch_size must be a positive integer"),
    ({"library_options": {"topk": 3}}, TypeError, r"ExactLibrary got unknown setting\(s\) \['topk'\]"),
])
def test_bad_settings_get_a_clear_error(mlp, mlp_data, kwargs, error, message):
    x, _ = mlp_data
    with pytest.raises(error, match=message):
        lnp.LibraryNetwork(mlp, ["fc1", "out"], **{"thresholds": 0.9, **kwargs}).fit(x)


def test_bad_labels_and_meta_tensors_get_a_clear_error(mlp, mlp_data):
    x, y = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        net.evaluate((x, y.float()))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, "):
        net.evaluate((x, y + 100))
    with pytest.raises(ValueError, match="'meta' device"):
        net.predict_scores(torch.empty(4, 10, device="meta"))


def test_a_model_with_one_answer_for_everything_warns(mlp_data):
    x, _ = mlp_data
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    with pytest.warns(UserWarning, match="answers class 0 for every training input"):
        lnp.LibraryNetwork(model, ["0", "2"], thresholds=0.9).fit(x)
