"""The Hebbian readout's pass (Eq. 2): the same weights however the work is split, no subnormal gains, and the
pair pass (only the pairs whose gain counts, recomputed in float64) equal to Eq. 2 in float64."""

from __future__ import annotations

import math

import pytest
import torch

from libnet_plugin.readout import HebbianReadout, hebbian_gain


def test_gain_equals_the_formula_except_below_the_smallest_normal():
    h = torch.linspace(-1.0, 1.0, 20001)
    ref = torch.exp(-(1.0 - h) / 0.01)
    g = hebbian_gain(h)
    tiny = torch.finfo(torch.float32).tiny
    kept = ref > tiny
    assert torch.equal(g[kept], ref[kept])  # bit for bit where g is a normal number
    assert bool((g[~kept] == 0).all())  # and 0 (never subnormal) where it is not
    assert not bool(((g > 0) & (g < tiny)).any())
    # the cut sits where exp((h - 1) / w) leaves the normal range
    assert abs(float(h[kept][0]) - (1 + 0.01 * math.log(tiny))) < 2e-4


def test_gain_keeps_float64():
    h = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)
    assert torch.equal(hebbian_gain(h, 0.05), torch.exp(-(1.0 - h) / 0.05))


def test_accumulate_unchanged_by_the_subnormal_cut():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(64, 7, generator=g) * 2 - 1
    h[::5, 2] = 0.999  # some near-duplicates, so that every row has gains near 1
    ans = torch.randint(0, 3, (64,), generator=g)
    r = HebbianReadout(3)
    r.reset(7)
    r.accumulate(h, ans)
    gain = torch.exp(-(1.0 - h) / 0.01)  # the float32 gains of Eq. 2, subnormal ones included
    assert bool(((gain > 0) & (gain < torch.finfo(torch.float32).tiny)).any())
    onehot = torch.nn.functional.one_hot(ans, 3).float()
    ref = 2.0 * (gain.T @ onehot) - gain.sum(dim=0, keepdim=True).T
    assert torch.equal(r.weight, ref)  # the subnormal terms vanish in the rounding of the sums


# -- the pair pass (HebbianPairPass): Eq. 2 over the pairs that count, without the [N, M] product ---------

def _clustered(n: int, dim: int, centres: int, noise: float, seed: int = 0) -> torch.Tensor:
    """Unit rows around random centres: two rows of one centre are at cosine about 1 / (1 + noise^2)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g)
    c = c / c.norm(dim=1, keepdim=True)
    x = c[torch.randint(0, centres, (n,), generator=g)] + noise * torch.randn(n, dim, generator=g) / dim ** 0.5
    return x / x.norm(dim=1, keepdim=True)


def _reference(x: torch.Tensor, nodes: torch.Tensor, answers: torch.Tensor, c: int, width: float = 0.01):
    """Eq. 2 in float64 over every (input, node) pair, no cut at all."""
    f = x.double()
    h = (f @ nodes.double().T) / (f.norm(dim=1, keepdim=True) + 1e-12)
    gain = torch.exp((h - 1.0) / width)
    onehot = torch.nn.functional.one_hot(answers, c).double()
    return 2.0 * gain.T @ onehot - gain.sum(dim=0)[:, None]


def _pair_fit(x, answers, theta, *, batch=128, chunk=1024, record=True, c=3, scale=1.0):
    from libnet_plugin.hebbian_pass import HebbianPairPass
    from libnet_plugin.library import ExactLibrary

    lib, ro = ExactLibrary(theta, chunk_size=chunk), HebbianReadout(c)
    pp = HebbianPairPass(lib, ro, record=record)
    assert HebbianPairPass.applies(lib, ro)
    for i in range(0, x.shape[0], batch):
        if record:
            pp.begin(i)
            lib.partial_fit(scale * x[i:i + batch], observer=pp)
        else:
            lib.partial_fit(scale * x[i:i + batch])
    ro.reset(lib.size)
    pp.end_first_pass(x.shape[0])
    for i in range(0, x.shape[0], batch):
        pp.accumulate(scale * x[i:i + batch], answers[i:i + batch], i)
    pp.finalize()
    return lib, ro, pp


@pytest.mark.parametrize("case", ["settled", "growing", "theta below the cut"])
def test_pair_pass_equals_eq2_in_float64(case):
    # settled: few centres, the screen decides most rows (leads and neighbour lists); growing: cosines near
    # theta, most rows compared with the whole library (the first pass's own pairs); theta 0.7 below the cut
    # (0.723): a stored row needs no node stored after it, and the neighbour lists reach too far to pay
    centres, noise, theta = {"settled": (150, 0.45, 0.8), "growing": (1500, 0.5, 0.8),
                             "theta below the cut": (300, 0.62, 0.7)}[case]
    x = _clustered(1500, 1024, centres, noise)
    answers = torch.randint(0, 3, (1500,), generator=torch.Generator().manual_seed(3))
    lib, ro, pp = _pair_fit(x, answers, theta, scale=2.5)  # raw rows need not be unit vectors
    ref = _reference(x, lib.nodes, answers, 3)
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert float(((ro.weight.double() - ref).abs() / scale).max()) < 2e-7  # float32 rounding of the sums
    assert pp.stats["triangle_rows"] > 0
    if case == "settled":
        assert lib.stats["screened"] > 0
    if case == "theta below the cut":
        assert pp.stats["settled_rows"] == lib.size  # every stored row, only its own pair left for pass 2
        # pairs with a gain that counts exist beyond the rows' own nodes
        assert pp.stats["kept"] > lib.size
        assert not pp.has_nbrs  # the triangle's bound leaves nearly every node at theta 0.7: no lists
    else:
        assert pp.stats["settled_rows"] == 0
    # the old dense float32 pass, for scale: its cosines' rounding times 1 / width
    old = HebbianReadout(3)
    old.reset(lib.size)
    for i in range(0, 1500, 128):
        old.accumulate(lib.similarity(x[i:i + 128]), answers[i:i + 128])
    assert float(((old.weight.double() - ref).abs() / scale).max()) < 1e-4


@pytest.mark.parametrize("theta", [0.8, 0.7])
def test_pair_pass_does_not_depend_on_how_the_work_is_split(theta, monkeypatch):
    from libnet_plugin.hebbian_pass import HebbianPairPass

    x = _clustered(1200, 1024, 300, 0.48 if theta == 0.8 else 0.62)
    answers = torch.randint(0, 4, (1200,), generator=torch.Generator().manual_seed(1))
    lib, ro, _ = _pair_fit(x, answers, theta, c=4)
    # record=False: the distributed way; NODES64_BYTES 0: the nodes converted batch by batch
    for kwargs, copy_bytes in (({"batch": 50, "chunk": 32}, None), ({"batch": 300}, None), ({"record": False}, None),
                               ({}, 0)):
        with monkeypatch.context() as mp:
            if copy_bytes is not None:
                mp.setattr(HebbianPairPass, "NODES64_BYTES", copy_bytes)
            lib2, ro2, pp2 = _pair_fit(x, answers, theta, c=4, **kwargs)
        assert torch.equal(lib2.nodes, lib.nodes)
        torch.testing.assert_close(ro2.weight, ro.weight, rtol=0, atol=2e-7)
        assert pp2.stats["library64"] == (copy_bytes is None)  # the float64 copy of the library, or not


def test_pair_pass_without_neighbour_lists_or_first_pass_pairs(monkeypatch):
    from libnet_plugin.hebbian_pass import HebbianPairPass

    x = _clustered(1000, 1024, 300, 0.5)  # nodes of one centre near each other: neighbour lists
    answers = torch.randint(0, 3, (1000,), generator=torch.Generator().manual_seed(2))
    _, ro, pp = _pair_fit(x, answers, 0.8)
    want = ro.weight
    assert pp.has_nbrs and pp.stats["triangle_rows"] > 0
    monkeypatch.setattr(HebbianPairPass, "NEIGHBOUR_PAIRS", 0)
    monkeypatch.setattr(HebbianPairPass, "NEIGHBOUR_SHARE", 1 << 40)  # no neighbour lists
    monkeypatch.setattr(HebbianPairPass, "ROW_PAIRS", 0)  # and (almost) no first-pass pairs
    lib, ro, pp = _pair_fit(x, answers, 0.8)
    assert not pp.has_nbrs and pp.stats["triangle_rows"] == 0
    torch.testing.assert_close(ro.weight, want, rtol=0, atol=2e-7)


def test_pair_pass_serves_only_what_it_computes_alike():
    from libnet_plugin.hebbian_pass import HebbianPairPass
    from libnet_plugin.library import ExactLibrary
    from libnet_plugin.sparse import SparseLibrary

    assert HebbianPairPass.applies(ExactLibrary(0.8), HebbianReadout(3))
    assert HebbianPairPass.applies(SparseLibrary(0.8, n_units=16), HebbianReadout(3))  # only embed differs
    assert not HebbianPairPass.applies(ExactLibrary(0.8), HebbianReadout(3, width=0.05))  # g counts everywhere
    assert not HebbianPairPass.applies(ExactLibrary(0.8, score_dtype="bfloat16"), HebbianReadout(3))

    class Rescored(ExactLibrary):
        def similarity(self, haps):
            return super().similarity(haps) * 0.5

    assert not HebbianPairPass.applies(Rescored(0.8), HebbianReadout(3))


def test_fit_weights_equal_eq2_for_every_layer_and_data_form():
    from torch import nn

    import libnet_plugin as lnp

    x = _clustered(900, 1024, 100, 0.45, seed=4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(1024, 5), nn.ReLU(), nn.Linear(5, 5)).eval()
    # the activations and answers as the fit computes them, batch by batch (a product's rounding depends on its rows)
    batches = x.split(100)
    answers = torch.cat([model(b).argmax(dim=1) for b in batches])
    streamed = lnp.LibraryNetwork(model, ["0", "1"], thresholds={"0": 0.8, "1": 0.97}, batch_size=100).fit(x)
    cached = lnp.LibraryNetwork(model, ["0", "1"], thresholds={"0": 0.8, "1": 0.97}, batch_size=100,
                                cache_bytes=1 << 30).fit(list(x.split(100)))
    for layer, f in (("0", x), ("1", torch.cat([model[1](b).detach() for b in batches]))):
        ref = _reference(f, streamed.libraries_[layer].nodes, answers, 5)
        w = streamed.readouts_[layer].weight
        torch.testing.assert_close(w.double(), ref, rtol=0, atol=2e-7 * float(ref.abs().max()))
        assert torch.equal(cached.readouts_[layer].weight, w)


@pytest.mark.parametrize("theta", [0.8, 0.7])
def test_pair_pass_of_each_rank_records_its_rows_of_a_data_parallel_first_pass(theta):
    # two ranks in one process: each step, every rank scores its batch against the same library, the rows
    # not decided travel in rank order; each rank's pass keeps its rows' cosines (on_step) and its share of
    # Eq. 2; the shares add up to the weights of one process over the interleaved batches
    from libnet_plugin.distributed import node_cosines, undecided_rows
    from libnet_plugin.fitting import _nodes_of_rows
    from libnet_plugin.hebbian_pass import HebbianPairPass
    from libnet_plugin.library import ExactLibrary

    x = _clustered(1200, 1024, 300, 0.48 if theta == 0.8 else 0.62)
    answers = torch.randint(0, 3, (1200,), generator=torch.Generator().manual_seed(5))
    lib_one, ro_one, _ = _pair_fit(x, answers, theta, batch=100)
    lib = ExactLibrary(theta)
    ros = [HebbianReadout(3), HebbianReadout(3)]
    passes = [HebbianPairPass(lib, ro) for ro in ros]
    shards = [[], []]
    for i in range(0, 1200, 200):
        parts = [x[i:i + 100], x[i + 100:i + 200]]  # rank 0, rank 1: the interleaved batches of 100
        cos = [node_cosines(lib, p) for p in parts]
        keep = [undecided_rows(lib, p, c) for p, c in zip(parts, cos)]
        before = lib.size
        lib.partial_fit(torch.cat([p[k] for p, k in zip(parts, keep)]),
                        torch.cat([i + 100 * r + k for r, k in enumerate(keep)]))
        for r, pp in enumerate(passes):
            pp.on_step(cos[r], before, _nodes_of_rows(lib, before, i + 100 * r, 100))
            shards[r].append((parts[r], answers[i + 100 * r:i + 100 * r + 100]))
    assert torch.equal(lib.nodes, lib_one.nodes)
    for r, (ro, pp, shard) in enumerate(zip(ros, passes, shards)):
        ro.reset(lib.size)
        pp.end_first_pass(600)
        seen = 0
        for xb, ab in shard:
            pp.accumulate(xb, ab, seen)
            seen += xb.shape[0]
        pp.finalize()
        own_nodes = int((lib.node_indices // 100 % 2 == r).sum())  # rank r holds the rows 100 r .. of each 200
        assert pp.stats["settled_rows"] == (0 if theta == 0.8 else own_nodes)
    torch.testing.assert_close(ros[0].weight + ros[1].weight, ro_one.weight, rtol=0, atol=4e-7)
    for pp in passes:  # after the first step, pass 2 scored each row against the nodes stored after it only
        assert bool((pp.covered[100:] > 0).all())


def test_a_kind_without_the_pair_pass_gets_the_dense_pass_and_the_log_says_so(caplog):
    import logging

    from torch import nn

    import libnet_plugin as lnp
    from libnet_plugin.fitting import stream_fit
    from libnet_plugin.hebbian_pass import dense_pass_reason
    from libnet_plugin.library import ExactLibrary

    class Rescored(ExactLibrary):  # its own scores: the pair pass would not compute its readout
        def similarity(self, haps):
            return super().similarity(haps) * 0.5

    assert "overrides ExactLibrary's similarity" in dense_pass_reason(Rescored(0.8), HebbianReadout(3))
    x = _clustered(300, 64, 20, 0.4, seed=6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(64, 4)).eval()
    net = lnp.LibraryNetwork(model, ["0"], thresholds=0.8, batch_size=100, cache_bytes=0)
    lib = Rescored(0.8)
    with caplog.at_level(logging.INFO, logger="libnet_plugin.fitting"):
        fitted = stream_fit(net.probe, x, {"0": [lib]}, HebbianReadout, batch_size=100)
    assert "layer '0': the readout takes the dense pass" in caplog.text and "Rescored" in caplog.text
    # the dense pass: Eq. 2 with the library's own scores, batch by batch
    answers = torch.cat([model(b).argmax(dim=1) for b in x.split(100)])
    ref = HebbianReadout(4)
    ref.reset(lib.size)
    for i in range(0, 300, 100):
        ref.accumulate(lib.similarity(x[i:i + 100]), answers[i:i + 100])
    torch.testing.assert_close(fitted.readouts["0"][0].weight, ref.weight, rtol=1e-6, atol=1e-6)
