"""Sparse-sampling and random-projection libraries: exact on their transform, seeded, saved exactly."""

from __future__ import annotations

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.errors import SaveFormatError
from libnet_plugin.library import leader_reference, normalize_rows
from libnet_plugin.plugins import make_library
from libnet_plugin.sparse import ProjectedLibrary, SparseLibrary


def data(n: int = 300, d: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, d, generator=g)
    return centres[torch.randint(0, 5, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)


def fit(lib, x: torch.Tensor, batch_size: int = 64):
    for i in range(0, x.shape[0], batch_size):
        lib.partial_fit(x[i:i + batch_size])
    return lib


LIBRARIES = [
    pytest.param(lambda seed, **kw: SparseLibrary(0.8, n_units=24, seed=seed, **kw), id="sparse"),
    pytest.param(lambda seed, **kw: ProjectedLibrary(0.8, n_components=24, seed=seed, **kw), id="gaussian"),
    pytest.param(lambda seed, **kw: ProjectedLibrary(0.8, n_components=24, seed=seed, method="hashing", **kw),
                 id="hashing"),
]


@pytest.mark.parametrize("make", LIBRARIES)
def test_same_seed_same_library_other_seed_other_view(make):
    x = data()
    a, b, c = fit(make(3), x), fit(make(3), x), fit(make(4), x)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.node_indices, b.node_indices)
    assert torch.equal(a.similarity(x[:5]), b.similarity(x[:5]))
    assert not torch.equal(a.transform(x[:5]), c.transform(x[:5]))


def test_sparse_library_is_the_leader_rule_on_the_sampled_units():
    x = data()
    lib = fit(SparseLibrary(0.8, n_units=24, seed=1), x)
    units = lib.units
    assert units.numel() == 24 and torch.equal(units, units.sort().values) and units.unique().numel() == 24
    assert lib.node_indices.tolist() == leader_reference(x[:, units], 0.8)
    assert torch.allclose(lib.nodes, normalize_rows(x[lib.node_indices][:, units]))


@pytest.mark.parametrize("method", ["gaussian", "hashing"])
def test_projected_library_is_the_leader_rule_on_the_projection(method):
    x = data()
    lib = fit(ProjectedLibrary(0.8, n_components=24, seed=1, method=method), x)
    r = lib.projection
    assert r.shape == (96, 24)
    if method == "hashing":  # one signed unit per row of the map
        assert torch.equal(r.abs().sum(dim=1), torch.ones(96))
    assert lib.node_indices.tolist() == leader_reference(x @ r, 0.8)


@pytest.mark.parametrize("method", ["gaussian", "hashing"])
def test_projection_approximately_preserves_cosines(method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2000, generator=g)
    x = base + torch.randn(60, 2000, generator=g) * torch.linspace(0.2, 3.0, 60)[:, None]  # cosines 0.1 .. 1
    lib = ProjectedLibrary(0.5, n_components=1024, seed=0, method=method)
    exact = normalize_rows(x) @ normalize_rows(x).T
    approx = lib.transform(x) @ lib.transform(x).T
    err = (approx - exact).abs()
    assert err.mean() < 0.04 and err.max() < 0.2


@pytest.mark.parametrize("make", [lambda: SparseLibrary(0.8, n_units=500), lambda: ProjectedLibrary(0.8, n_components=96)])
def test_small_layers_are_used_whole(make):
    x = data()
    lib = fit(make(), x)
    assert lib.nodes.shape[1] == 96
    assert lib.node_indices.tolist() == leader_reference(x, 0.8)


def test_libraries_are_served_by_the_hook():
    settings = {"threshold": 0.7, "device": torch.device("cpu"), "layer": "fc1"}
    assert isinstance(make_library("sparse", {**settings, "n_units": 8}), SparseLibrary)
    lib = make_library("projected", {**settings, "n_components": 8, "method": "hashing"},
                       lnp.get_plugin_manager(autoload=False))
    assert isinstance(lib, ProjectedLibrary) and lib.method == "hashing"


@pytest.mark.parametrize("library, options", [
    ("sparse", {"n_units": 12, "seed": 5}),
    ("projected", {"n_components": 12, "seed": 5}),
    ("projected", {"n_components": 12, "seed": 5, "method": "hashing"}),
    ("sparse", {"n_units": 12, "seed": 5, "score_dtype": torch.bfloat16}),  # a dtype object is saved by name
])
def test_network_save_load_restores_the_library_exactly(tmp_path, mlp, mlp_data, library, options):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.85, library=library,
                             library_options=options).fit(x)
    assert net.libraries_["fc1"].nodes.shape[1] == 12 and net.libraries_["out"].nodes.shape[1] == 4
    net.save(tmp_path / "net.lnp")
    back = lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)
    haps = net.probe.run(x[:20]).haps
    for layer in net.layers:
        a, b = net.libraries_[layer], back.libraries_[layer]
        assert type(b) is type(a) and b.config() == a.config()
        assert torch.equal(a.nodes, b.nodes) and torch.equal(a.node_indices, b.node_indices)
        assert torch.equal(a.similarity(haps[layer]), b.similarity(haps[layer]))
    if library == "sparse":
        assert torch.equal(back.libraries_["fc1"].units, net.libraries_["fc1"].units)
    for layer, p in net.predict_scores(x[:50]).items():
        assert torch.equal(back.predict_scores(x[:50])[layer], p)


@pytest.mark.parametrize("library, options", [("exact", {}), ("sparse", {"n_units": 12, "seed": 5})])
def test_bfloat16_scoring_keeps_the_nodes_and_approximates_the_cosines(mlp, mlp_data, library, options):
    x, _ = mlp_data
    full = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9, library=library, library_options=options).fit(x)
    half = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9, library=library,
                              library_options={**options, "score_dtype": "bfloat16"}).fit(x)
    haps = full.probe.run(x[:64]).haps
    for layer in full.layers:
        a, b = full.libraries_[layer], half.libraries_[layer]
        assert b.score_dtype == torch.bfloat16 and b.config()["score_dtype"] == "bfloat16"
        assert torch.equal(a.nodes, b.nodes)  # the leader rule runs in float32 either way
        h_full, h_half = a.similarity(haps[layer]), b.similarity(haps[layer])
        assert h_half.dtype == torch.float32
        err = (h_half - h_full).abs().max().item()
        assert 0 < err < 2e-2  # bfloat16 rounding: visible, but within 3 significant digits
    agree = {l: (p == half.predict(x)[l]).float().mean().item() for l, p in full.predict(x).items()}
    assert min(agree.values()) > 0.9, agree


def test_score_dtype_per_layer(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9,
                             library_options={"score_dtype": {"fc1": torch.bfloat16}}).fit(x)
    assert net.libraries_["fc1"].score_dtype == torch.bfloat16
    assert net.libraries_["out"].score_dtype == torch.float32 and "score_dtype" not in net.libraries_["out"].config()


def test_score_dtype_is_checked():
    with pytest.raises(ValueError, match="score_dtype for layer 'fc1' must be one of .*'bfloat16'.*got 'int8'"):
        make_library("exact", {"threshold": 0.7, "layer": "fc1", "score_dtype": "int8"})


def test_projection_drawn_differently_is_refused():
    lib = ProjectedLibrary(0.8, n_components=8, seed=0, dim=40)
    with pytest.raises(SaveFormatError, match="differs from the one the library was built with"):
        ProjectedLibrary(0.8, n_components=8, seed=0, dim=40, projection_digest="0" * 16)
    assert ProjectedLibrary(0.8, n_components=8, seed=0, dim=40,
                            projection_digest=lib.projection_digest).projection_digest == lib.projection_digest


def test_saved_units_that_do_not_fit_are_refused():
    lib = fit(SparseLibrary(0.8, n_units=24, layer="conv1"), data())
    state = lib.state_dict()
    other = SparseLibrary(0.8, n_units=24, dim=96, layer="conv1")
    with pytest.raises(SaveFormatError, match="conv1"):
        other.load_state_dict({**state, "units": torch.arange(10)})
    with pytest.raises(SaveFormatError, match="no 'units'"):
        other.load_state_dict({k: v for k, v in state.items() if k != "units"})


def test_wrong_size_option_names_the_right_one():
    with pytest.raises(TypeError, match="'sparse' library takes 'n_units', not 'n_components'"):
        SparseLibrary(0.8, n_components=10)
    with pytest.raises(TypeError, match="'projected' library takes 'n_components', not 'n_units'"):
        ProjectedLibrary(0.8, n_units=10)
    with pytest.raises(ValueError, match="method .* must be one of"):
        ProjectedLibrary(0.8, method="pca")
    with pytest.raises(ValueError, match="n_units for layer 'fc1' must be a positive integer"):
        SparseLibrary(0.8, n_units=0, layer="fc1")


def test_readme_performance_example_runs(tmp_path, monkeypatch):
    from readme_blocks import run_readme_block

    monkeypatch.chdir(tmp_path)
    _, namespace = run_readme_block("performance")
    sparse, same = namespace["sparse"], namespace["same"]
    assert sparse.libraries_["0"].nodes.shape[1] == 64
    assert same.library_sizes_ == sparse.library_sizes_
    assert torch.equal(same.libraries_["0"].units, sparse.libraries_["0"].units)
    assert namespace["projected"].libraries_["0"].nodes.shape[1] == 64


@pytest.mark.parametrize("library, key", [("sparse", "n_units"), ("projected", "n_components")])
def test_a_size_per_layer_samples_only_the_layers_named(tmp_path, mlp, mlp_data, library, key):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.85, library=library,
                             library_options={key: {"fc1": 8}, "seed": 2}).fit(x)
    assert net.libraries_["fc1"].nodes.shape[1] == 8
    assert net.libraries_["fc2"].nodes.shape[1] == 16  # not named: used whole
    assert net.libraries_["fc2"].config()[key] is None
    net.save(tmp_path / "net.lnp")
    back = lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)
    for layer in net.layers:
        assert torch.equal(back.libraries_[layer].nodes, net.libraries_[layer].nodes)
        assert back.libraries_[layer].config() == net.libraries_[layer].config()
