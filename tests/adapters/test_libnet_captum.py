"""The Captum adapter: LibraryAttribution / LibraryExemplars against the core, shapes, hooks, bad input, README."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("captum")

from captum.attr import Attribution, LayerAttribution
from captum.influence import DataInfluence
from captum.metrics import sensitivity_max
from conftest import SmallMLP, forward_hook_count
from readme_blocks import readme_code_blocks, run_readme_block

import libnet_captum
import libnet_plugin as lnp
from libnet_captum import CaptumForward, CaptumLayerProbe, LibraryAttribution, LibraryExemplars
from libnet_plugin.errors import (
    LayerNotFoundError,
    LibnetError,
    NonFiniteError,
    NotFittedError,
    ShapeMismatchError,
)
from libnet_plugin.plugins import make_probe

LAYERS = ["fc1", "fc2", "out"]


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Scaled(nn.Module):
    """A model with an extra forward argument (Captum's ``additional_forward_args``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.out(torch.relu(self.fc1(x * scale)))


@pytest.fixture(scope="module")
def train_x() -> torch.Tensor:
    return torch.randn(300, 10, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fitted(train_x):
    """One fitted attribution shared by the read-only tests of this module (fitting is the slow part)."""
    torch.manual_seed(0)
    model = SmallMLP().eval()
    return LibraryAttribution(model, [model.fc1, model.fc2, model.out]).fit(train_x, thresholds=0.9, top_k=3)


def assert_scores_equal(got: tuple[torch.Tensor, ...], expected: dict[str, torch.Tensor], names: list[str]) -> None:
    assert len(got) == len(names)
    for g, n in zip(got, names):
        assert torch.equal(g, expected[n]), n


# ---------------------------------------------------------------------------------------------- equality with the core
def test_attribution_equals_core_predict_scores_exactly(fitted, train_x, monkeypatch):
    x = train_x
    net = fitted.library_network
    assert fitted.layer_names == LAYERS and net.layers == LAYERS
    q = x[:25] + 0.05
    for k in (1, 3, 7):
        assert_scores_equal(fitted.attribute(q, top_k=k), net.predict_scores(q, top_k=k), LAYERS)
    monkeypatch.setattr(net, "top_k", 5)
    assert_scores_equal(fitted.attribute(q, top_k=None), net.predict_scores(q), LAYERS)
    # fit built a plain LibraryNetwork of the model, probed by the core's built-in probe
    assert isinstance(net.probe, lnp.TorchLayerProbe) and net.model is fitted.forward_func
    assert net.thresholds_ == {layer: 0.9 for layer in LAYERS} and net.n_train_ == 300


def test_given_core_network_and_layer_subset(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, LAYERS, thresholds=0.85, top_k=4).fit(x)
    by_name = LibraryAttribution(mlp, "fc2", library_network=net)
    by_module = LibraryAttribution(mlp, mlp.fc2, library_network=net)
    expected = net.predict_scores(x[:9], top_k=4)["fc2"]
    assert torch.equal(by_name.attribute(x[:9], top_k=4), expected)
    assert torch.equal(by_module.attribute(x[:9], top_k=None), expected)
    two = LibraryAttribution(mlp, ["out", "fc1"], library_network=net)   # order of the user, not of the net
    assert_scores_equal(two.attribute(x[:9], top_k=4), net.predict_scores(x[:9], top_k=4), ["out", "fc1"])


def test_conv_layers_equal_core():
    torch.manual_seed(3)
    model = TinyCNN().eval()
    x = torch.rand(120, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    attr = LibraryAttribution(model, [model.conv, model.fc]).fit(x, thresholds=0.95)
    assert attr.library_network.hap_dims_ == {"conv": 48, "fc": 5}
    conv, fc = attr.attribute(x[:6])
    assert conv.shape == fc.shape == (6, 5)
    assert_scores_equal((conv, fc), attr.library_network.predict_scores(x[:6]), ["conv", "fc"])


def test_plain_callable_uses_captum_probe_and_equals_core(mlp, mlp_data):
    x, _ = mlp_data
    attr = LibraryAttribution(lambda t: mlp(t).log_softmax(1), [mlp.fc1, mlp.out]).fit(x, thresholds=0.9)
    net = attr.library_network
    assert isinstance(net.model, CaptumForward) and isinstance(net.probe, CaptumLayerProbe)
    assert attr.layer_names == net.layers == ["layer0", "layer1"]
    assert_scores_equal(attr.attribute(x[:11]), net.predict_scores(x[:11]), ["layer0", "layer1"])
    # same libraries as the built-in probe on the model itself (log_softmax keeps the model's answers)
    core = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    assert torch.equal(net.libraries_["layer0"].node_indices, core.libraries_["fc1"].node_indices)
    assert torch.equal(attr.attribute(x[:11])[1], core.predict_scores(x[:11])["out"])
    # a bound forward method names the layers through its module
    bound = LibraryAttribution(mlp.forward, ["fc1", "out"]).fit(x, thresholds=0.9)
    assert isinstance(bound.library_network.model, CaptumForward) and bound.layer_names == ["fc1", "out"]


def test_additional_forward_args(mlp_data):
    x, _ = mlp_data
    torch.manual_seed(5)
    model = Scaled().eval()
    attr = LibraryAttribution(model, [model.fc1, model.out]).fit(x, thresholds=0.9, additional_forward_args=2.0)
    net = attr.library_network
    assert isinstance(net.model, CaptumForward) and net.model.additional_forward_args == 2.0
    assert_scores_equal(attr.attribute(x[:8], additional_forward_args=2.0), net.predict_scores(x[:8]), ["fc1", "out"])
    other = attr.attribute(x[:8], additional_forward_args=(0.5,))
    assert not torch.equal(other[0], attr.attribute(x[:8], additional_forward_args=2.0)[0])


class LSTMNet(nn.Module):
    """``nn.LSTM`` returns ``(output, (h, c))``: the probes record ``output``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class AttnNet(nn.Module):
    """``nn.MultiheadAttention(need_weights=False)`` returns ``(output, None)``; a second input is optional."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(48, 3)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x)
        c = h if context is None else self.proj(context)
        out, _ = self.attn(h, c, c, need_weights=False)
        return self.head(out.flatten(1))


def _sequences(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 6, 4, generator=torch.Generator().manual_seed(seed))


def _assert_close_scores(got, expected: dict[str, torch.Tensor], names: list[str]) -> None:
    assert len(got) == len(names)
    for g, n in zip(got, names):
        torch.testing.assert_close(g, expected[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_cls, seed, layer", [(LSTMNet, 1, "lstm"), (AttnNet, 0, "attn")])
def test_modules_with_tuple_outputs_equal_core(model_cls, seed, layer):
    torch.manual_seed(seed)
    model = model_cls().eval()
    x, q = _sequences(150, 2), _sequences(7, 3)
    names = [layer, "head"]
    attr = LibraryAttribution(model, names).fit(x, thresholds=0.9)
    net = attr.library_network
    assert isinstance(net.probe, lnp.TorchLayerProbe)  # fitted by the core's probe, read by the adapter's hooks
    _assert_close_scores(attr.attribute(q), net.predict_scores(q), names)
    influences = LibraryExemplars(model, names, library_network=net).influence(q, top_k=3)
    indices, sims = net.exemplars(q, 3, return_similarities=True)
    for name in names:
        assert torch.equal(influences[name][0], indices[name])
        torch.testing.assert_close(influences[name][1], sims[name], rtol=1e-5, atol=1e-6)
    # a plain callable goes through the adapter's probe for fitting too: the same libraries
    fn = LibraryAttribution(lambda t: model(t), [getattr(model, layer), model.head]).fit(x, thresholds=0.9)
    assert isinstance(fn.library_network.probe, CaptumLayerProbe)
    assert torch.equal(fn.library_network.libraries_["layer0"].node_indices, net.libraries_[layer].node_indices)
    _assert_close_scores(fn.attribute(q), {"layer0": attr.attribute(q)[0], "layer1": attr.attribute(q)[1]},
                         ["layer0", "layer1"])
    assert forward_hook_count(model) == 0


def test_forward_function_of_two_inputs(tmp_path):
    torch.manual_seed(0)
    model = AttnNet().eval()
    x, context = _sequences(150, 2), _sequences(150, 4)

    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return model(a, b)

    attr = LibraryAttribution(forward, [model.attn, model.head]).fit(((x, context),), thresholds=0.9)
    net = attr.library_network
    assert isinstance(net.probe, CaptumLayerProbe) and net.n_train_ == 150
    core = lnp.LibraryNetwork(model, ["attn", "head"], thresholds=0.9).fit(((x, context),))  # model(x, context)
    assert torch.equal(net.libraries_["layer0"].node_indices, core.libraries_["attn"].node_indices)
    q = (x[:5] + 0.1, context[:5])
    _assert_close_scores(attr.attribute(q), net.predict_scores((q,)), ["layer0", "layer1"])
    influences = LibraryExemplars(forward, [model.attn], library_network=net).influence(q, top_k=2)
    assert influences["layer0"][0].shape == (5, 2)


def test_saved_network_reloaded_gives_same_attribution(fitted, train_x, tmp_path):
    mlp = fitted.forward_func
    x = train_x
    fitted.library_network.save(tmp_path / "net.lnp")
    loaded = lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)
    again = LibraryAttribution(mlp, LAYERS, library_network=loaded)
    assert_scores_equal(again.attribute(x[:5]), dict(zip(LAYERS, fitted.attribute(x[:5]))), LAYERS)


# ---------------------------------------------------------------------------------------------- shapes and targets
def test_shapes_single_and_multiple_layers(fitted, train_x):
    mlp = fitted.forward_func
    x = train_x
    net = fitted.library_network
    b, c = 6, net.n_classes_
    single = LibraryAttribution(mlp, mlp.fc2, library_network=net).attribute(x[:b])
    assert isinstance(single, torch.Tensor) and single.shape == (b, c) and single.dtype == torch.float32
    assert LibraryAttribution(mlp, "fc2", library_network=net).attribute(x[:b], target=1).shape == (b,)
    one = LibraryAttribution(mlp, [mlp.fc2], library_network=net).attribute(x[:b])
    assert isinstance(one, tuple) and len(one) == 1 and one[0].shape == (b, c)
    many = fitted.attribute(x[:b])
    assert isinstance(many, tuple) and [t.shape for t in many] == [(b, c)] * 3
    assert [t.shape for t in fitted.attribute(x[:b], target=0)] == [(b,)] * 3
    assert torch.equal(fitted.attribute((x[:b],))[2], many[2])   # inputs as a 1-tuple, as Captum passes them


def test_target_forms(fitted, train_x):
    x = train_x
    q = x[:5]
    full = fitted.attribute(q)
    per = [2, 0, 3, 3, 1]
    for target, cols in [(2, [2] * 5), (torch.tensor(3), [3] * 5), (torch.tensor([1]), [1] * 5),
                         (per, per), (torch.tensor(per), per)]:
        got = fitted.attribute(q, target=target)
        for g, f in zip(got, full):
            assert torch.equal(g, f[torch.arange(5), torch.tensor(cols)])


@pytest.mark.parametrize("target, error, match", [
    (4, ValueError, r"target 4 is outside the classes.*0 <= target < 4"),
    (-1, ValueError, "target -1 is outside"),
    ([0, 1], ShapeMismatchError, "2 entries for a batch of 5"),
    (torch.tensor([0, 1, 9, 0, 0]), ValueError, "target 9"),
    (torch.tensor([0.0]), TypeError, "integers"),
    ((0, 1), TypeError, "tuple targets"),
    ("1", TypeError, "target must be"),
])
def test_bad_targets(fitted, train_x, target, error, match):
    with pytest.raises(error, match=match):
        fitted.attribute(train_x[:5], target=target)


def test_captum_contract(fitted):
    assert isinstance(fitted, Attribution) and not isinstance(fitted, LayerAttribution)
    assert fitted.multiplies_by_inputs is False and fitted.has_convergence_delta() is False
    assert LibraryAttribution.get_name() == "Library Attribution"
    ex = LibraryExemplars(fitted.forward_func, LAYERS, library_network=fitted.library_network)
    assert isinstance(ex, DataInfluence) and ex.model is fitted.forward_func


# ---------------------------------------------------------------------------------------------- batch invariance
def test_batch_invariance(fitted, train_x):
    x = train_x
    q = x[:30] * 1.1
    full = fitted.attribute(q)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    shuffled = fitted.attribute(q[perm])
    for i in (0, 13, 29):
        alone = fitted.attribute(q[i:i + 1])
        where = int(torch.nonzero(perm == i))
        for f, s, a in zip(full, shuffled, alone):
            torch.testing.assert_close(a[0], f[i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s[where], f[i], rtol=1e-5, atol=1e-5)
    ex = LibraryExemplars(fitted.forward_func, LAYERS, library_network=fitted.library_network)
    batch, alone = ex.influence(q), ex.influence(q[13:14])
    for layer in LAYERS:
        assert torch.equal(batch[layer][0][13], alone[layer][0][0])


# ---------------------------------------------------------------------------------------------- exemplars
def test_exemplars_equal_core_and_point_at_training_inputs(fitted, train_x):
    x = train_x
    net = fitted.library_network
    ex = LibraryExemplars(fitted.forward_func, [fitted.forward_func.fc1, fitted.forward_func.out],
                          library_network=net)
    infl = ex.influence(x[100:108], top_k=4)
    idx, sims = net.exemplars(x[100:108], k=4, return_similarities=True)
    assert list(infl) == ["fc1", "out"]
    for layer in infl:
        i, s = infl[layer]
        assert i.dtype == torch.long and i.shape == s.shape == (8, 4)
        assert torch.equal(i, idx[layer]) and torch.equal(s, sims[layer])
        assert bool((s[:, :-1] >= s[:, 1:]).all())
    # a training input that became a node is its own best exemplar, with cosine 1
    node = int(net.libraries_["fc1"].node_indices[5])
    i, s = ex.influence(x[node:node + 1], top_k=1)["fc1"]
    assert int(i[0, 0]) == node and float(s[0, 0]) == pytest.approx(1.0, abs=1e-5)
    # top_k is clipped to the library size
    small = LibraryExemplars(fitted.forward_func, "out").fit(x, thresholds=0.3)
    assert small.library_network.library_sizes_["out"] < 50
    assert small.influence(x[:2], top_k=50)["out"][0].shape == (2, small.library_network.library_sizes_["out"])


# ---------------------------------------------------------------------------------------------- Captum metrics
def test_sensitivity_max_runs_on_attribution(fitted, train_x):
    x = train_x
    torch.manual_seed(0)
    sens = sensitivity_max(fitted.attribute, x[:6], target=1, n_perturb_samples=4)
    assert sens.shape == (6,) and bool(torch.isfinite(sens).all()) and bool((sens >= 0).all())
    # zero perturbation: the explanation does not move
    still = sensitivity_max(fitted.attribute, x[:6], perturb_func=lambda inp: inp, n_perturb_samples=2)
    torch.testing.assert_close(still, torch.zeros(6), rtol=0, atol=1e-6)   # batch of 12 vs 6: rounding only
    assert forward_hook_count(fitted.forward_func) == 0


# ---------------------------------------------------------------------------------------------- hooks
def test_no_hook_left_after_calls_and_when_the_model_raises(fitted, train_x):
    x = train_x
    model = fitted.forward_func
    ex = LibraryExemplars(model, LAYERS, library_network=fitted.library_network)
    fitted.attribute(x[:4])
    ex.influence(x[:4])
    assert forward_hook_count(model) == 0

    class Boom(Exception):
        pass

    def raise_hook(*_):
        raise Boom()

    h = model.out.register_forward_pre_hook(raise_hook)  # raises after fc1 and fc2 have been recorded
    try:
        with pytest.raises(Boom):
            fitted.attribute(x[:4])
        with pytest.raises(Boom):
            ex.influence(x[:4])
        with pytest.raises(Boom):
            LibraryAttribution(lambda t: model(t), [model.fc1]).fit(x[:20])
        with pytest.raises(Boom):
            LibraryAttribution(model, [model.fc1]).fit(x[:20])
        assert forward_hook_count(model) == 1   # only the test's own hook
    finally:
        h.remove()
    assert forward_hook_count(model) == 0


# ---------------------------------------------------------------------------------------------- bad input
def test_layers_not_in_the_model(mlp, mlp_data):
    x, _ = mlp_data
    stranger = nn.Linear(10, 32)
    with pytest.raises(LayerNotFoundError, match=r"layers\[1\] \(Linear\) is not a submodule of the model SmallMLP"):
        LibraryAttribution(mlp, [mlp.fc1, stranger])
    with pytest.raises(LayerNotFoundError, match=r"'fc3'.*Did you mean.*'fc1'"):
        LibraryAttribution(mlp, ["fc1", "fc3"])
    with pytest.raises(TypeError, match="given by name.*pass the modules"):
        LibraryAttribution(lambda t: mlp(t), "fc1")
    with pytest.raises(TypeError, match=r"layers\[0\] must be a torch.nn.Module or a layer name"):
        LibraryAttribution(mlp, [3])
    with pytest.raises(ValueError, match="distinct"):
        LibraryAttribution(mlp, [mlp.fc1, "fc1"])
    with pytest.raises(ValueError, match="at least one"):
        LibraryAttribution(mlp, [])
    with pytest.raises(TypeError, match="callable"):
        LibraryAttribution(42, "fc1")

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(10, 4)
            self.unused = nn.Linear(10, 4)

        def forward(self, t):
            return self.used(t)

    skip = Skip()
    with pytest.raises(LayerNotFoundError, match=r"never fired"):   # one of two layers ran
        LibraryAttribution(lambda t: skip(t), [skip.used, skip.unused]).fit(x[:20])
    with pytest.raises(LayerNotFoundError, match=r"\['layer0'\] never fired"):   # no layer ran
        LibraryAttribution(lambda t: skip(t), [skip.unused]).fit(x[:20])
    assert forward_hook_count(skip) == 0


def test_network_fitted_on_other_layers_or_model(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.8).fit(x)
    with pytest.raises(LayerNotFoundError, match=r"fitted on the layers \['fc1', 'fc2'\].*no library for \['out'\]"):
        LibraryAttribution(mlp, ["fc1", "out"], library_network=net)
    torch.manual_seed(1)
    twin = type(mlp)().eval()                                   # same layer names, another model
    with pytest.raises(LayerNotFoundError, match="not a submodule of the library network's model SmallMLP"):
        LibraryAttribution(twin, [twin.fc1], library_network=net)
    with pytest.raises(LayerNotFoundError, match="'fc1'.*not a submodule of the model SmallMLP that forward_func runs"):
        LibraryAttribution(twin, "fc1", library_network=net)
    with pytest.raises(TypeError, match="library_network must be"):
        LibraryAttribution(mlp, "fc1", library_network={"fc1": net})


def test_wrong_inputs_and_states(fitted, mlp, train_x):
    x = train_x
    with pytest.raises(ShapeMismatchError, match=r"inputs have shape \(2, 11\).*fitted on inputs of shape \[B, 10\]"):
        fitted.attribute(torch.randn(2, 11))
    with pytest.raises(ShapeMismatchError, match=r"per input \(\)"):
        fitted.attribute(torch.randn(10))
    with pytest.raises(TypeError, match="Tensor or a tuple of Tensors"):
        fitted.attribute([x[:2]])
    bad = x[:3].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        fitted.attribute(bad)
    for k, error in [(0, ValueError), (True, TypeError), (2.5, TypeError)]:
        with pytest.raises(error, match="top_k must be a positive integer"):
            fitted.attribute(x[:2], top_k=k)
    fresh = LibraryAttribution(mlp, "fc1")
    with pytest.raises(NotFittedError, match="call fit"):
        fresh.attribute(x[:2])
    with pytest.raises(NotFittedError, match="call fit"):
        LibraryExemplars(mlp, "fc1").influence(x[:2])
    unfitted = lnp.LibraryNetwork(mlp, ["fc1"], thresholds=0.8)
    given = LibraryAttribution(mlp, "fc1", library_network=unfitted)
    with pytest.raises(NotFittedError):
        given.attribute(x[:2])
    with pytest.raises(ValueError, match="refits it with its own settings"):
        given.fit(x, thresholds=0.5)
    assert given.fit(x) is given and unfitted.is_fitted
    assert torch.equal(given.attribute(x[:3]), unfitted.predict_scores(x[:3])["fc1"])


# ---------------------------------------------------------------------------------------------- the plugin
def test_plugin_claims_only_its_marker(mlp, mlp_data):
    x, _ = mlp_data
    pm = lnp.get_plugin_manager(autoload=True)   # found through the libnet_plugin entry-point group
    assert pm.get_plugin("captum") is libnet_captum.plugin
    dev = torch.device("cpu")
    assert isinstance(make_probe(mlp, ["fc1"], dev, pm), lnp.TorchLayerProbe)
    marker = CaptumForward(mlp, {"hidden": mlp.fc1, "logits": mlp.out})
    assert isinstance(make_probe(marker, ["hidden"], dev, pm), CaptumLayerProbe)
    with pytest.raises(LayerNotFoundError, match="'hiden'.*Did you mean 'hidden'"):
        make_probe(marker, ["hiden"], dev, pm)
    via_captum = lnp.LibraryNetwork(marker, ["hidden", "logits"], thresholds=0.9, plugin_manager=pm).fit(x)
    via_core = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9, plugin_manager=pm).fit(x)
    for a, b in (("hidden", "fc1"), ("logits", "out")):
        assert torch.equal(via_captum.libraries_[a].nodes, via_core.libraries_[b].nodes)
        assert torch.equal(via_captum.readouts_[a].weight, via_core.readouts_[b].weight)
    # a library network over the marker names its layers for LibraryAttribution too
    attr = LibraryAttribution(mlp, [mlp.out], library_network=via_captum)
    assert attr.layer_names == ["logits"]
    assert torch.equal(attr.attribute(x[:4])[0], via_core.predict_scores(x[:4])["out"])


def test_plugin_manager_without_the_adapter(mlp, mlp_data, monkeypatch):
    import libnet_captum.attribution as attribution

    x, _ = mlp_data
    bare = lnp.get_plugin_manager(autoload=False)          # as with LIBNET_PLUGIN_NO_AUTOLOAD=1
    monkeypatch.setattr(attribution, "default_plugin_manager", lambda: bare)
    attr = LibraryAttribution(lambda t: mlp(t), [mlp.fc1]).fit(x[:50], thresholds=0.9)
    assert attr.attribute(x[:2])[0].shape == (2, 4)
    with pytest.raises(LibnetError, match=r"register it with pm.register\(libnet_captum.plugin"):
        LibraryAttribution(lambda t: mlp(t), [mlp.fc1]).fit(x[:50], plugin_manager=bare)


def test_docstring_examples_of_the_probe_run():
    import doctest

    import libnet_captum.probe
    from libnet_plugin.plugins import default_plugin_manager

    if not default_plugin_manager().is_registered(libnet_captum.plugin):
        pytest.skip("entry-point autoloading is turned off: the example relies on it")
    assert doctest.testmod(libnet_captum.probe).failed == 0


def test_plugin_import_is_light():
    code = "import sys, libnet_captum.plugin; print('captum' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------- README
def test_readme_captum_example_runs_as_written():
    code, namespace = run_readme_block("captum")
    assert len(code.strip().splitlines()) <= 5
    for block in readme_code_blocks("captum")[1:]:
        exec(compile(block, "README.md[captum]", "exec"), namespace)
    attr = namespace["attr"]
    assert isinstance(attr, LibraryAttribution) and attr.library_network.is_fitted


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_attribution_equals_core(mlp, mlp_data):
    x, _ = mlp_data
    model = mlp.cuda()
    attr = LibraryAttribution(model, [model.fc1, model.out]).fit(x, thresholds=0.9)
    net = attr.library_network
    assert net.device.type == "cuda"
    q = x[:16].cuda()
    got = attr.attribute(q, target=torch.arange(16, device="cuda") % 4)
    full = net.predict_scores(q)
    for g, n in zip(got, ["fc1", "out"]):
        assert g.device.type == "cuda"
        assert torch.equal(g, full[n][torch.arange(16), torch.arange(16) % 4])
    fn = LibraryAttribution(lambda t: model(t), [model.fc1]).fit(x, thresholds=0.9)   # CaptumForward path
    assert fn.library_network.device.type == "cuda"
    assert torch.equal(fn.attribute(q)[0], fn.library_network.predict_scores(x[:16])["layer0"])
