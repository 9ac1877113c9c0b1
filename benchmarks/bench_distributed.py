"""A library-network fit in 2 processes (torch.distributed, gloo) against 1 process, on the MNIST default.

Both fit the paper's MNIST net at the seed's thresholds S1 on the same 4,000 images in batches of 256 (the
2 ranks take every other batch). Reported, from one run: wall time of each fit (the slowest rank for
2 processes) and their ratio, the bytes each rank sends in collectives per step, and the share of the
fit each rank spends in them. Each rank runs with 1 torch thread (2 ranks on 2 cores), and so does the
1-process fit it is compared with, so the ratio shows the parallel speed-up; on this 2-core machine
expect little, and the communication volume is the number to watch.

    python -m benchmarks.bench_distributed
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

import libnet_plugin as lnp
from benchmarks.mnist_setup import LAYERS, S1, prepare_mnist
from libnet_plugin.experiments.models import MnistNet


def _batches(x: torch.Tensor, size: int = 256) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _rank(rank: int, world: int, folder: str) -> None:
    import datetime

    import torch.distributed as dist

    from libnet_plugin import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    data = torch.load(os.path.join(folder, "data.pt"))
    model = MnistNet(normalize=True).eval()
    model.load_state_dict(data["state"])
    net = lnp.LibraryNetwork(model, list(LAYERS), thresholds=dict(S1))
    distributed.reset_stats()
    dist.barrier()
    t0 = time.perf_counter()
    net.fit(_batches(data["x"])[rank::world])
    seconds = time.perf_counter() - t0
    steps = -(-len(_batches(data["x"])) // world)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "collective_seconds": distributed.STATS["seconds"],
                   "bytes": distributed.STATS["bytes"], "steps": steps, "sizes": net.library_sizes_}, f)
    dist.destroy_process_group()


def main(quick: bool = False, log: Any = print) -> dict[str, Any]:
    mb = prepare_mnist(torch.device("cpu"), quick=quick, log=log)
    torch.set_num_threads(1)
    x = mb.x_train
    t0 = time.perf_counter()
    single = lnp.LibraryNetwork(mb.model, list(LAYERS), thresholds=dict(S1)).fit(_batches(x))
    one = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as folder:
        torch.save({"state": mb.model.state_dict(), "x": x}, os.path.join(folder, "data.pt"))
        mp.spawn(_rank, args=(2, folder), nprocs=2, join=True)
        ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(2)]
    two = max(r["seconds"] for r in ranks)
    out = {"one_process_s": one, "two_processes_s": two, "speedup": one / two,
           "bytes_per_step_per_rank": ranks[0]["bytes"] / ranks[0]["steps"],
           "collective_share": [r["collective_seconds"] / r["seconds"] for r in ranks],
           "same_library_sizes": all(r["sizes"] == single.library_sizes_ for r in ranks)}
    log(f"[distributed] 1 process {one:.2f} s, 2 processes {two:.2f} s (speed-up {out['speedup']:.2f}x); "
        f"{out['bytes_per_step_per_rank'] / 1e6:.2f} MB sent per step per rank; share in collectives "
        f"{', '.join(f'{s:.0%}' for s in out['collective_share'])}; same libraries: {out['same_library_sizes']}")
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
