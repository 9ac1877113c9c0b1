"""Conformance of every served library to the Library protocol (libnet_plugin/library.py).

Each test is parametrized over ``libnet_plugin.builtins.LIBRARIES``, so a new built-in library is
checked by every property here without editing this module. The HAPs are the ``fc1`` activations
(32 units) of the ``mlp`` fixture on ``mlp_data``; the sparse and projected libraries see 8 of them.
"""

from __future__ import annotations

import json

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.builtins import LIBRARIES
from libnet_plugin.errors import ShapeMismatchError
from libnet_plugin.library import Library
from libnet_plugin.plugins import make_library

NAMES = sorted(LIBRARIES)
#: settings that make a library see less than the fixture's layers (fc1: 32 units, fc2: 16, out: 4)
SIZES: dict[str, dict] = {"sparse": {"n_units": 8}, "projected": {"n_components": 8}}
TOL = 1e-5

#: ``{(test function, library name): reason}`` of properties known not to hold; marked xfail(strict=True)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def names_for(test: str) -> list:
    """Every served library name, with the known failures of ``test`` marked ``xfail(strict=True)``."""
    return [pytest.param(n, id=n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(test, n)]))
            if (test, n) in KNOWN_FAILURES else pytest.param(n, id=n) for n in NAMES]


def settings(name: str, **extra) -> dict:
    return {"threshold": 0.8, "device": "cpu", "layer": "fc1", **SIZES.get(name, {}), **extra}


@pytest.fixture
def pm():
    return lnp.get_plugin_manager(autoload=False)


@pytest.fixture
def haps(mlp, mlp_data) -> torch.Tensor:
    """Raw fc1 activations ``[300, 32]`` of the fixture model (what the probe hands a library)."""
    x, _ = mlp_data
    with torch.no_grad():
        return mlp.fc1(x).detach()


@pytest.fixture
def queries(mlp) -> torch.Tensor:
    x = torch.randn(17, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return mlp.fc1(x).detach()


def _fitted(name: str, pm, haps: torch.Tensor):
    lib = make_library(name, settings(name), pm)
    lib.partial_fit(haps, torch.arange(haps.shape[0]))
    return lib


@pytest.mark.parametrize("name", names_for("test_served_and_starts_empty"))
def test_served_and_starts_empty(name, pm):
    lib = make_library(name, settings(name), pm)
    assert isinstance(lib, LIBRARIES[name])
    assert isinstance(lib, Library)
    assert lib.threshold == 0.8
    assert lib.size == 0
    assert lib.node_indices.numel() == 0


@pytest.mark.parametrize("name", names_for("test_partial_fit_reports_what_it_stores"))
def test_partial_fit_reports_what_it_stores(name, pm, haps):
    lib = make_library(name, settings(name), pm)
    for start, stop in ((0, 120), (120, 121), (121, 300)):
        before = lib.size
        indices = torch.arange(start, stop)
        stored = lib.partial_fit(haps[start:stop], indices)
        assert isinstance(stored, torch.Tensor)
        assert stored.dtype == torch.bool and stored.shape == (stop - start,)
        assert lib.size - before == int(stored.sum())
        assert torch.equal(lib.node_indices[before:].cpu(), indices[stored.cpu()])
        if start == 0:
            assert bool(stored[0]), "the first row of an empty library is always novel"
    assert 1 < lib.size < haps.shape[0]  # theta 0.8 on these activations keeps some rows, not all
    assert lib.node_indices.shape == (lib.size,)
    assert bool((lib.node_indices.diff() > 0).all()), "nodes are stored in visiting order"


@pytest.mark.parametrize("name", names_for("test_similarity_is_cosine_to_every_node"))
def test_similarity_is_cosine_to_every_node(name, pm, haps, queries):
    lib = _fitted(name, pm, haps)
    h = lib.similarity(queries)
    assert h.shape == (queries.shape[0], lib.size)
    assert h.is_floating_point()
    assert bool(((h >= -1 - TOL) & (h <= 1 + TOL)).all()), (h.min(), h.max())
    # every stored row has cosine ~1 with its own node (node j holds row node_indices[j])
    own = lib.similarity(haps[lib.node_indices])
    assert own.shape == (lib.size, lib.size)
    torch.testing.assert_close(own.diagonal(), torch.ones(lib.size), atol=TOL, rtol=0)
    # and every training row reaches theta with some node (else it would have been stored)
    assert bool((lib.similarity(haps).amax(dim=1) >= lib.threshold - TOL).all())


@pytest.mark.parametrize("name", names_for("test_state_dict_round_trip"))
def test_state_dict_round_trip(name, pm, haps, queries):
    lib = _fitted(name, pm, haps)
    fresh = make_library(name, settings(name), pm)
    fresh.load_state_dict({k: v.clone() for k, v in lib.state_dict().items()})
    assert fresh.size == lib.size
    assert torch.equal(fresh.node_indices, lib.node_indices)
    assert torch.equal(fresh.similarity(queries), lib.similarity(queries))
    assert torch.equal(fresh.similarity(haps), lib.similarity(haps))


@pytest.mark.parametrize("name", names_for("test_config_is_json"))
def test_config_is_json(name, pm, haps):
    lib = make_library(name, settings(name), pm)
    for stage in ("empty", "fitted"):
        if stage == "fitted":
            lib.partial_fit(haps, torch.arange(haps.shape[0]))
        config = lib.config()
        text = json.dumps(config)
        assert json.loads(text) == config, stage
        assert config["name"] == name, stage


@pytest.mark.parametrize("name", names_for("test_unknown_setting_rejected"))
def test_unknown_setting_rejected(name, pm):
    cls = LIBRARIES[name]
    with pytest.raises(TypeError) as info:
        make_library(name, settings(name, no_such_setting=1), pm)
    message = str(info.value)
    assert cls.__name__ in message and "no_such_setting" in message, message
    with pytest.raises(TypeError):
        cls(0.8, no_such_setting=1)


@pytest.mark.parametrize("name", names_for("test_threshold_outside_unit_interval_rejected"))
def test_threshold_outside_unit_interval_rejected(name, pm):
    for bad in (0, 0.0, -0.5, 1.0001, 2.0, float("nan")):
        with pytest.raises(ValueError):
            make_library(name, settings(name, threshold=bad), pm)
    assert make_library(name, settings(name, threshold=1.0), pm).threshold == 1.0  # (0, 1] is closed at 1


@pytest.mark.parametrize("name", names_for("test_wrong_width_after_first_batch"))
def test_wrong_width_after_first_batch(name, pm, haps):
    lib = make_library(name, settings(name), pm)
    lib.partial_fit(haps[:50], torch.arange(50))
    size = lib.size
    with pytest.raises(ShapeMismatchError):
        lib.partial_fit(haps[50:60, :31], torch.arange(50, 60))
    with pytest.raises(ShapeMismatchError):
        lib.partial_fit(torch.cat([haps[50:60], haps[50:60, :1]], dim=1), torch.arange(50, 60))
    assert lib.size == size  # a rejected batch stores nothing
    with pytest.raises(ShapeMismatchError):
        lib.similarity(haps[:5, :31])


@pytest.mark.parametrize("name", names_for("test_network_save_load_round_trip"))
def test_network_save_load_round_trip(name, pm, mlp, mlp_data, tmp_path):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.85, library=name,
                             library_options=SIZES.get(name, {}), plugin_manager=pm).fit(x)
    assert all(isinstance(lib, LIBRARIES[name]) for lib in net.libraries_.values())
    path = tmp_path / f"{name}.safetensors"
    net.save(path)
    loaded = lnp.LibraryNetwork.load(path, mlp, plugin_manager=pm)
    assert loaded.library == name
    assert loaded.library_sizes_ == net.library_sizes_
    test = torch.randn(40, 10, generator=torch.Generator().manual_seed(6))
    a, b = net.predict_scores(test), loaded.predict_scores(test)
    assert sorted(a) == sorted(b) == ["fc1", "fc2", "out"]
    for layer in a:
        assert torch.equal(a[layer], b[layer]), layer
