"""The per-rank program of tests/test_distributed.py (a module of its own, so that spawned processes import it)."""

from __future__ import annotations

import datetime
import json
import os

import torch
from torch import nn

import libnet_plugin as lnp

LAYERS = ["0", "2", "4"]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def batches() -> list[torch.Tensor]:
    """Nine batches of uneven sizes (a DataLoader's last batch is smaller too)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 12, generator=g) for n in (40, 40, 40, 40, 40, 40, 40, 40, 17)]


def clean() -> torch.Tensor:
    """Clean calibration inputs (held out from training)."""
    return torch.randn(90, 12, generator=torch.Generator().manual_seed(2))


def fresh() -> torch.Tensor:
    """The inputs scored: new ones, not the calibration inputs (a calibration input ties exactly with its own
    reference value, and ranks computed on 45-row shards and on 90 rows may break such ties differently)."""
    return torch.randn(200, 12, generator=torch.Generator().manual_seed(3))


def clean_shard(rank: int, world: int) -> torch.Tensor:
    return clean()[rank::world]


def shard(rank: int, world: int, drop_last_of: int | None) -> list[torch.Tensor]:
    """The batches a DistributedSampler-like split gives ``rank``: every ``world``-th, starting at ``rank``."""
    mine = batches()[rank::world]
    return mine[:-1] if rank == drop_last_of else mine


def run(rank: int, world: int, folder: str, drop_last_of: int | None, fail_rank: int | None) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        data = shard(rank, world, drop_last_of)
        if rank == fail_rank:
            data = data[:1] + [torch.randn(8, 5)] + data[1:]  # a batch of the wrong width at its second step
        net = lnp.LibraryNetwork(model(), LAYERS, thresholds=0.8, batch_size=64)
        try:
            net.fit(data)
        except lnp.LibnetError as exc:
            with open(os.path.join(folder, f"error{rank}.json"), "w") as f:
                json.dump({"type": type(exc).__name__, "message": str(exc)}, f)
            return
        auto = lnp.LibraryNetwork(model(), LAYERS, thresholds="auto", batch_size=64,
                                  auto_thresholds={"target": 0.2, "sample_size": 100}).fit(data)
        probe = fresh()
        detectors = {}
        for method in ("mahalanobis", "knn", "library-distance"):
            det = lnp.ConsistencyDetector(net, method=method, settings={"k": 3} if method == "knn" else {})
            if det.requires_training_data:
                det.fit(data)
            det.calibrate(clean_shard(rank, world), fpr=0.1)
            detectors[method] = {"threshold": det.threshold_, "score": det.score(probe)}
        torch.save({l: {"nodes": net.libraries_[l].nodes.clone(), "indices": net.libraries_[l].node_indices.clone(),
                        "weight": net.readouts_[l].weight.clone()} for l in LAYERS}
                   | {"n_train": net.n_train_, "detectors": detectors, "auto": auto.thresholds_,
                      "auto_sizes": auto.library_sizes_}, os.path.join(folder, f"rank{rank}.pt"))
        if rank == 0:
            net.save(os.path.join(folder, "net.lnp"))
    finally:
        dist.destroy_process_group()
