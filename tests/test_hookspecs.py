"""The pluggy core: hookspecs documented and tested, built-ins as ordinary plugins, entry points, switch."""

from __future__ import annotations

import inspect
import pathlib
import re
import sys
import types
from importlib.metadata import EntryPoint

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin import hookspecs, plugins
from libnet_plugin.library import ExactLibrary
from libnet_plugin.plugins import registered_detectors

TESTS = pathlib.Path(__file__).parent


def test_every_hook_is_documented_and_typed():
    for name in hookspecs.ALL_HOOKS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert len(doc) > 80, f"{name} needs a docstring saying who calls it and what it returns"
        sig = inspect.signature(fn)
        assert "Called by" in doc and "Returns:" in doc, name
        assert "Args:" in doc or not sig.parameters, f"{name}'s docstring has no Args: section"
        for param in sig.parameters.values():
            assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name}) has no annotation"
            assert param.name in doc, f"{name}'s docstring does not describe {param.name!r}"
    declared = {n for n, f in vars(hookspecs).items() if n.startswith("libnet_") and callable(f)}
    assert declared == set(hookspecs.ALL_HOOKS)


def test_every_hook_has_a_test():
    text = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py") if p.name != "test_hookspecs.py")
    text += (TESTS / "test_hookspecs.py").read_text().split("# -- hook tests below --", 1)[1]
    for name in hookspecs.ALL_HOOKS:
        assert re.search(rf"\bhook\.{name}\b|def {name}\b", text), f"no test exercises the hook {name}"


def test_builtins_register_like_any_plugin():
    pm = lnp.get_plugin_manager(autoload=False)
    assert pm.get_plugin("libnet-builtins") is not None
    for name in hookspecs.ALL_HOOKS:
        impls = getattr(pm.hook, name).get_hookimpls()
        assert impls, f"no built-in implementation of {name}"


def test_autoload_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(plugins, "load_entry_point_plugins", lambda pm, group=plugins.ENTRY_POINT_GROUP: calls.append(group))
    monkeypatch.setenv(plugins.NO_AUTOLOAD_ENV, "1")
    plugins.get_plugin_manager()
    assert calls == []
    monkeypatch.setenv(plugins.NO_AUTOLOAD_ENV, "0")
    plugins.get_plugin_manager()
    assert calls == ["libnet_plugin"]
    plugins.get_plugin_manager(autoload=False)
    assert calls == ["libnet_plugin"]


def _fake_entry_points(monkeypatch, *eps):
    import importlib.metadata as md

    real = md.entry_points

    def fake(**kw):
        if kw.get("group") == plugins.ENTRY_POINT_GROUP:
            return list(eps)
        return real(**kw)

    monkeypatch.setattr(md, "entry_points", fake)


def test_third_party_plugin_arrives_through_entry_point(monkeypatch):
    mod = types.ModuleType("libnet_test_thirdparty")

    class Doubling(ExactLibrary):
        name = "doubling"

    @lnp.hookimpl
    def libnet_library(name, settings):
        return Doubling(**settings) if name == "doubling" else None

    mod.libnet_library = libnet_library
    monkeypatch.setitem(sys.modules, "libnet_test_thirdparty", mod)
    _fake_entry_points(monkeypatch, EntryPoint("thirdparty", "libnet_test_thirdparty", plugins.ENTRY_POINT_GROUP),
                       EntryPoint("broken", "libnet_no_such_module_xyz", plugins.ENTRY_POINT_GROUP))
    with pytest.warns(RuntimeWarning, match="'broken'.*skipped"):
        pm = plugins.get_plugin_manager(autoload=True)
    assert pm.get_plugin("thirdparty") is mod
    lib = pm.hook.libnet_library(name="doubling", settings={"threshold": 0.5})
    assert isinstance(lib, Doubling)


# -- hook tests below --
def test_hook_libnet_layer_probe_claims_torch_modules_only(mlp):
    pm = lnp.get_plugin_manager(autoload=False)
    probe = pm.hook.libnet_layer_probe(model=mlp, layers=["fc1"], device=torch.device("cpu"))
    assert isinstance(probe, lnp.TorchLayerProbe)
    assert pm.hook.libnet_layer_probe(model="not-a-model.txt", layers=["fc1"], device=torch.device("cpu")) is None
    with pytest.raises(TypeError, match="no layer probe understands"):
        lnp.LibraryNetwork(object(), ["fc1"], plugin_manager=pm)


def test_hook_libnet_library_and_readout_feed_the_network(mlp, mlp_data):
    x, _ = mlp_data
    seen = []

    class Recording(ExactLibrary):
        name = "recording"

        def partial_fit(self, haps, indices=None):
            seen.append(haps.shape[0])
            return super().partial_fit(haps, indices)

    class Plugin:
        @lnp.hookimpl
        def libnet_library(self, name, settings):
            return Recording(**settings) if name == "recording" else None

    pm = lnp.get_plugin_manager(autoload=False, plugins=[Plugin()])
    assert isinstance(pm.hook.libnet_readout(name="hebbian", settings={"n_classes": 3}), lnp.HebbianReadout)
    assert pm.hook.libnet_readout(name="nope", settings={"n_classes": 3}) is None
    net = lnp.LibraryNetwork(mlp, ["fc1"], thresholds=0.8, library="recording", batch_size=100, plugin_manager=pm).fit(x)
    assert seen == [100, 100, 100]
    ref = lnp.LibraryNetwork(mlp, ["fc1"], thresholds=0.8, plugin_manager=pm).fit(x)
    assert torch.equal(net.libraries_["fc1"].node_indices, ref.libraries_["fc1"].node_indices)
    with pytest.raises(lnp.LibnetError, match="no registered plugin provides a library named 'missing'"):
        lnp.LibraryNetwork(mlp, ["fc1"], library="missing", plugin_manager=pm).fit(x)


def test_hook_libnet_consistency_detector_serves_cpl(mlp, mlp_data):
    x, _ = mlp_data
    pm = lnp.get_plugin_manager(autoload=False)
    det = pm.hook.libnet_consistency_detector(name="cpl", settings={"top_k": 20})
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9, plugin_manager=pm).fit(x)
    score = det.fit(net).score(net, net.probe.run(x[:10]))
    assert torch.allclose(score, 1 - net.consistency(x[:10], top_k=20))


def test_comparison_hook_merges_every_plugin_in_registration_order():
    class Extra:
        @lnp.hookimpl
        def libnet_detector_comparison(self):
            return {"knn": ("knn", {"k": 3}), "msp (again)": ("msp", {})}

    class Later:
        @lnp.hookimpl
        def libnet_detector_comparison(self):
            return {"knn": ("knn", {"k": 5})}

    pm = lnp.get_plugin_manager(autoload=False, plugins=[Extra(), Later()])
    answers = pm.hook.libnet_detector_comparison()
    assert len(answers) == 3  # the built-in plugin's list and the two above
    listed = registered_detectors(pm)
    assert listed["knn"] == ("knn", {"k": 5})  # the plugin registered last wins a label
    assert listed["msp (again)"] == ("msp", {})
    assert listed["cpl (paper, top_k 20)"] == ("cpl", {"top_k": 20})
    assert list(listed)[:2] == ["cpl (paper, top_k 20)", "cpl (top_k 3)"]  # the built-ins first
