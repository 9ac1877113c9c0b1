"""The per-rank program of tests/test_sharded_scoring.py (a module of its own, so that spawned processes import it)."""

from __future__ import annotations

import datetime
import json
import os

import torch
from distributed_worker import LAYERS, batches, clean, model

import libnet_plugin as lnp
from libnet_plugin.sharding import ShardedNetwork

#: per-layer thresholds giving 256, 55 and 2 nodes: uneven shards, and ranks with no node of layer "4"
THRESHOLDS = {"0": 0.8, "2": 0.8, "4": 0.3}


def fitted() -> lnp.LibraryNetwork:
    """The network every rank shards (fitted in one process, before any process group exists)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layer "0" keeps most of its inputs: fine for a test
        return lnp.LibraryNetwork(model(), LAYERS, thresholds=THRESHOLDS, batch_size=64).fit(batches())


def layouts(world: int, sizes: dict[str, int]) -> dict[str, object]:
    """Contiguous, strided and explicit counts (one rank with none) over the layers."""
    if world == 2:
        return {"0": "contiguous", "2": "strided", "4": [0, sizes["4"]]}
    return {"0": "strided", "2": "contiguous", "4": "contiguous"}


def run(rank: int, world: int, folder: str, mode: str) -> None:
    import torch.distributed as dist

    net = lnp.LibraryNetwork.load(os.path.join(folder, "net.lnp"), model())
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        sharded = ShardedNetwork.from_network(net, layout=layouts(world, net.library_sizes_))
        del net
        x = clean()
        if mode == "fail":
            try:
                if rank == 1:
                    sharded.scores_from_haps({l: torch.randn(90, 5) for l in LAYERS})  # the wrong width
                else:
                    sharded.predict_scores(x)
            except lnp.LibnetError as exc:
                out = {"type": type(exc).__name__, "message": str(exc)}
            try:
                sharded.predict_scores(x[: 90 - rank])  # another batch size on every rank
            except lnp.LibnetError as exc:
                out["mismatch"] = {"type": type(exc).__name__, "message": str(exc)}
            with open(os.path.join(folder, f"error{rank}.json"), "w") as f:
                json.dump(out, f)
            return
        idx, sims = sharded.exemplars(x, k=4, return_similarities=True)
        torch.save({"scores3": sharded.predict_scores(x), "scores20": sharded.predict_scores(x, top_k=20),
                    "all_nodes": sharded.predict_scores(x, top_k=1000),
                    "batched": sharded.predict_scores([x[:50], x[50:]]),
                    "predict": sharded.predict(x), "cpl": sharded.consistency(x), "exemplars": idx, "sims": sims,
                    "local_sizes": sharded.local_sizes_, "sizes": sharded.library_sizes_},
                   os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
