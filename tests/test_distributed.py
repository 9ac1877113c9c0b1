"""LibraryNetwork.fit across processes (torch.distributed, gloo on the CPU) equals one process on the batches
taken in (step, rank) order: libraries bit for bit, readouts within 1e-6 (their sums are added in another
order), identical on every rank; the detectors fitted on training data and the calibration give the
one-process scores and thresholds (within 1e-5); uneven shards work; a failing rank makes every rank fail,
not hang."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp

import libnet_plugin as lnp

distributed_worker = pytest.importorskip("distributed_worker")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _spawn(world: int, folder, drop_last_of=None, fail_rank=None) -> None:
    mp.spawn(distributed_worker.run, args=(world, str(folder), drop_last_of, fail_rank), nprocs=world, join=True)


@pytest.mark.parametrize("world, drop_last_of", [(2, None), (3, 1)])
def test_a_fit_across_ranks_equals_one_process_on_the_interleaved_batches(tmp_path, world, drop_last_of):
    _spawn(world, tmp_path, drop_last_of)
    shards = [distributed_worker.shard(r, world, drop_last_of) for r in range(world)]
    steps = max(len(s) for s in shards)
    order = [s[i] for i in range(steps) for s in shards if i < len(s)]  # step 0 of rank 0, of rank 1, ...
    single = lnp.LibraryNetwork(distributed_worker.model(), distributed_worker.LAYERS, thresholds=0.8,
                                batch_size=64).fit(order)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for got in results:
        assert got["n_train"] == single.n_train_ == sum(b.shape[0] for b in order)
        for l in distributed_worker.LAYERS:
            assert torch.equal(got[l]["nodes"], single.libraries_[l].nodes), l  # bit for bit
            assert torch.equal(got[l]["indices"], single.libraries_[l].node_indices), l
            torch.testing.assert_close(got[l]["weight"], single.readouts_[l].weight, rtol=0, atol=1e-6)
            assert torch.equal(got[l]["weight"], results[0][l]["weight"])  # the same on every rank
    for method in ("mahalanobis", "knn", "library-distance"):  # fitted and calibrated across the ranks
        det = lnp.ConsistencyDetector(single, method=method, settings={"k": 3} if method == "knn" else {})
        if det.requires_training_data:
            det.fit(order)
        # one process calibrates on the clean inputs in rank order, as the ranks' all-gather gives them
        det.calibrate(torch.cat([distributed_worker.clean_shard(r, world) for r in range(world)]), fpr=0.1)
        want = det.score(distributed_worker.fresh())
        for got in results:
            torch.testing.assert_close(got["detectors"][method]["score"], want, rtol=1e-5, atol=1e-5)
            assert got["detectors"][method]["threshold"] == pytest.approx(det.threshold_, rel=1e-5, abs=1e-5)
    auto = lnp.LibraryNetwork(distributed_worker.model(), distributed_worker.LAYERS, thresholds="auto", batch_size=64,
                              auto_thresholds={"target": 0.2, "sample_size": 100}).fit(order)
    for got in results:  # the same reservoir sample as one process, so the same thetas and libraries
        assert got["auto"] == auto.thresholds_ and got["auto_sizes"] == auto.library_sizes_
    loaded = lnp.LibraryNetwork.load(tmp_path / "net.lnp", distributed_worker.model())
    assert loaded.library_sizes_ == single.library_sizes_


def test_a_rank_that_fails_makes_every_rank_fail(tmp_path):
    _spawn(2, tmp_path, fail_rank=1)
    errors = [json.loads((tmp_path / f"error{r}.json").read_text()) for r in range(2)]
    assert errors[1]["type"] == "DistributedFitError" and errors[0]["type"] == "DistributedFitError"
    assert "rank(s) [1] failed" in errors[0]["message"]
    assert "mat1 and mat2 shapes cannot be multiplied" in errors[1]["message"]  # the failing rank says why
