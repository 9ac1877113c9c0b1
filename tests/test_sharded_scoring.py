"""Node-sharded scoring (libnet_plugin.sharding) across 2 and 3 gloo processes equals one device: each rank keeps
a shard of every library (contiguous, strided, explicit counts; uneven; ranks with no node), and the merged
top-k, the Eq. 3 evidence, CPL and the exemplars come out the same on every rank and equal the one-device rule
with the same tie rule (topk_evidence_ordered): the chosen nodes exactly, the evidence to float32 rounding (a
shard's cosines come from a product of another shape, which the math library may compute with another kernel);
against LibraryNetwork's own scoring they agree to float32 rounding. A failing rank, or ranks called with different batches, make every rank raise."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_close_f32

from libnet_plugin.metrics import cpl
from libnet_plugin.sharding import (
    ShardedNetwork,
    merge_candidates,
    ordered_evidence,
    ordered_topk,
    shard_library,
    shard_positions,
    topk_evidence_ordered,
)

sharded_worker = pytest.importorskip("sharded_worker")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def net():
    return sharded_worker.fitted()


def _spawn(world: int, folder, net, mode: str = "score") -> None:
    net.save(folder / "net.lnp")
    mp.spawn(sharded_worker.run, args=(world, str(folder), mode), nprocs=world, join=True)


def _reference(net, x, k):
    """One device, the tie rule of sharded scoring: {layer: [B, C]}."""
    haps = net.run(x).haps
    return {l: topk_evidence_ordered(net.libraries_[l].similarity(haps[l]), net.readouts_[l].weight, k)
            for l in net.layers}


def test_the_tie_rule_takes_the_lower_index_and_orders_by_cosine():
    h = torch.tensor([[0.5, 0.75, 0.25, 0.75, 0.75], [0.0, 0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5]])
    vals, ids = ordered_topk(h, 3)
    assert ids.tolist() == [[1, 3, 4], [0, 1, 2], [4, 3, 2]]
    assert torch.equal(vals, h.gather(1, ids))
    vals, ids = ordered_topk(h, 2, node_ids=torch.tensor([10, 20, 30, 40, 50]))
    assert ids.tolist() == [[20, 40], [10, 20], [50, 40]]
    assert ordered_topk(h, 9)[1].shape == (3, 5)  # clipped to the nodes there are


def test_shard_positions_cover_every_node_once():
    for n in (0, 1, 2, 7, 55):
        for w in (1, 2, 3, 5):
            for layout in ("contiguous", "strided"):
                got = torch.cat([shard_positions(n, r, w, layout) for r in range(w)])
                assert sorted(got.tolist()) == list(range(n)), (n, w, layout)
    assert [shard_positions(7, r, 3, [0, 5, 2]).tolist() for r in range(3)] == [[], [0, 1, 2, 3, 4], [5, 6]]
    with pytest.raises(ValueError):
        shard_positions(7, 0, 3, [1, 2, 3])
    with pytest.raises(ValueError):
        shard_positions(7, 0, 2, "diagonal")


def test_merged_shards_equal_one_device_in_one_process(net):
    """The merge on its own (no process group): any layout and world size, ties included."""
    x = sharded_worker.clean()
    haps = net.run(x).haps
    zero = torch.zeros(4, haps["2"].shape[1])  # all cosines 0: every node ties
    for l in net.layers:
        lib, ro = net.libraries_[l], net.readouts_[l]
        for w in (2, 3, 5):
            for layout in ("contiguous", "strided", [0] * (w - 1) + [lib.size]):
                shards = [shard_library(lib, ro, rank=r, world_size=w, layout=layout) for r in range(w)]
                for f in (haps[l], zero) if l == "2" else (haps[l],):
                    h = lib.similarity(f)
                    for k in (1, 3, 20, 1000):
                        want = topk_evidence_ordered(h, ro.weight, k)
                        m = merge_candidates([s.local_candidates(f, k).padded(min(k, lib.size)) for s in shards], k, lib.size)
                        # a shard's cosines come from a product of other shape (another BLAS kernel): float32 rounding
                        assert_close_f32(ordered_evidence(m.values, m.rows), want, (l, k, w, layout))
                        assert torch.equal(m.positions, lib.node_indices[m.node_ids]), (l, k, w, layout)
        h = lib.similarity(haps[l])
        for k in (1, 3, 20, 1000):  # the network's own rule, to float32 rounding
            torch.testing.assert_close(topk_evidence_ordered(h, ro.weight, k), ro.scores(h, k), rtol=1e-5, atol=1e-5)


def test_outside_a_process_group_a_shard_is_the_whole_library(net):
    x = sharded_worker.clean()
    sharded = ShardedNetwork.from_network(net)
    assert sharded.local_sizes_ == sharded.library_sizes_ == net.library_sizes_
    want = _reference(net, x, 3)
    got = sharded.predict_scores(x)
    for l in net.layers:
        assert torch.equal(got[l], want[l]), l
    idx, sims = sharded.exemplars(x, k=4, return_similarities=True)
    ref_idx, ref_sims = net.exemplars(x, k=4, return_similarities=True)
    for l in net.layers:
        assert torch.equal(idx[l], ref_idx[l]) and torch.equal(sims[l], ref_sims[l]), l


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_scoring_across_ranks_equals_one_device(tmp_path, net, world):
    _spawn(world, tmp_path, net)
    x = sharded_worker.clean()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    sizes = net.library_sizes_
    layouts = sharded_worker.layouts(world, sizes)
    for l in net.layers:  # every node on exactly one rank; uneven shards; layer "4" leaves a rank without any
        assert sum(res["local_sizes"][l] for res in results) == sizes[l]
        assert [res["local_sizes"][l] for res in results] == [
            len(shard_positions(sizes[l], r, world, layouts[l])) for r in range(world)]
    assert min(res["local_sizes"]["4"] for res in results) == 0
    assert any(len({res["local_sizes"][l] for res in results}) > 1 for l in net.layers)  # uneven shards
    ref3, ref20, ref_all = _reference(net, x, 3), _reference(net, x, 20), _reference(net, x, 1000)
    own = net.predict_scores(x)
    ref_idx, ref_sims = net.exemplars(x, k=4, return_similarities=True)
    for res in results:
        assert res["sizes"] == sizes
        for l in net.layers:
            assert torch.equal(res["scores3"][l], ref3[l]), l  # bit for bit, on every rank
            assert torch.equal(res["scores20"][l], ref20[l]), l
            assert torch.equal(res["all_nodes"][l], ref_all[l]), l
            assert torch.equal(res["batched"][l], ref3[l]), l
            assert torch.equal(res["predict"][l], ref3[l].argmax(dim=1)), l
            torch.testing.assert_close(res["scores3"][l], own[l], rtol=1e-5, atol=1e-5)  # the network's own rule
            assert torch.equal(res["exemplars"][l], ref_idx[l]), l
            assert torch.equal(res["sims"][l], ref_sims[l]), l
        assert torch.equal(res["cpl"], cpl(ref20))


def test_a_rank_that_fails_or_differs_makes_every_rank_fail(tmp_path, net):
    _spawn(2, tmp_path, net, mode="fail")
    errors = [json.loads((tmp_path / f"error{r}.json").read_text()) for r in range(2)]
    assert all(e["type"] == "DistributedScoringError" for e in errors)
    assert "rank(s) [1] failed during sharded scoring of layer '0'" in errors[0]["message"]
    assert "ShapeMismatchError" in errors[1]["message"]  # the failing rank says why
    for e in errors:
        assert e["mismatch"]["type"] == "DistributedScoringError"
        assert "different [batch, k, classes, nodes]" in e["mismatch"]["message"]
