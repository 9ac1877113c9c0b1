"""A library-network fit in 2 processes (torch.distributed, gloo) against 1 process, on the MNIST default.

Both fit the paper's MNIST net at the seed's thresholds S1 on the same 4,000 images in batches of 256 (the
2 ranks take every other batch). Reported, from one run: wall time of each fit (the slowest rank for
2 processes) and their ratio, the bytes each rank sends in collectives per step, and the share of the
fit each rank spends in them. Each rank runs with 1 torch thread (2 ranks on 2 cores), and so does the
1-process fit it is compared with, so the ratio shows the parallel speed-up; on this 2-core machine
expect little, and the communication volume is the number to watch.

Per step it also reports the rows that travel (the rows the current libraries do not already decide,
:func:`libnet_plugin.distributed.undecided_rows`) per layer, over the steps.

Memory per rank against the library size (:func:`memory_sweep`, ``--memory``): for threshold sets that give
growing libraries, 2 fresh gloo ranks (glibc's mmap threshold fixed, as in benchmarks/bench_memory.py) fit
the network, each holding the whole libraries, then keep only their node shard
(:class:`libnet_plugin.sharding.ShardedNetwork`, contiguous halves), free the rest and score the 1,000 test
images (top_k 3, batches of 256). Reported per rank: the peak RSS growth of the fit over the rank's baseline,
the libraries' bytes, the shard's bytes, and the peak RSS while scoring from the shard (peak reset through
``/proc/self/clear_refs`` after the shard is built).

    python -m benchmarks.bench_distributed [--memory]
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


def _count_undecided(log: dict[int, list[int]]) -> None:
    """Wrap :func:`libnet_plugin.distributed.undecided_rows` and :func:`~libnet_plugin.distributed.node_cosines`
    (looked up at every step of the fit) to time them and record, per library (in call order within a
    step), how many rows each call keeps."""
    from libnet_plugin import distributed
    from libnet_plugin.library import ExactLibrary

    inner = distributed.undecided_rows
    cos_inner = distributed.node_cosines
    fit_inner = ExactLibrary.partial_fit

    def counting(library: Any, haps: torch.Tensor, cos: Any = None) -> torch.Tensor:
        t0 = time.perf_counter()
        keep = inner(library, haps, cos)
        TIMES["undecided"] += time.perf_counter() - t0
        log.setdefault(id(library), []).append(int(keep.numel()))
        return keep

    def timed_cosines(library: Any, haps: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        out = cos_inner(library, haps)
        TIMES["undecided"] += time.perf_counter() - t0
        return out

    def timed_fit(self: Any, haps: torch.Tensor, indices: Any = None, **options: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = fit_inner(self, haps, indices, **options)
        TIMES["partial_fit"] += time.perf_counter() - t0
        return out

    distributed.undecided_rows = counting
    distributed.node_cosines = timed_cosines
    ExactLibrary.partial_fit = timed_fit  # this rank's process only: the time of the replicated leader rule


#: seconds a rank spends screening its own rows (local) and running the leader rule on every rank's
#: undecided rows (replicated on every rank)
TIMES = {"undecided": 0.0, "partial_fit": 0.0}


def _rank(rank: int, world: int, folder: str, thresholds: dict[str, float] | None = None,
          memory: bool = False) -> None:
    import datetime
    import gc

    import torch.distributed as dist

    from benchmarks.bench_layer_size import reset_peak
    from benchmarks.bench_memory import peak_mb
    from libnet_plugin import distributed
    from libnet_plugin.sharding import ShardedNetwork

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    data = torch.load(os.path.join(folder, "data.pt"))
    model = MnistNet(normalize=True).eval()
    model.load_state_dict(data["state"])
    with torch.no_grad():
        model(data["x"][:256])
    net = lnp.LibraryNetwork(model, list(LAYERS), thresholds=dict(thresholds or S1))
    undecided: dict[int, list[int]] = {}
    _count_undecided(undecided)
    distributed.reset_stats()
    dist.barrier()
    base = peak_mb()
    t0 = time.perf_counter()
    net.fit(_batches(data["x"])[rank::world])
    seconds = time.perf_counter() - t0
    fit_peak = peak_mb()
    steps = -(-len(_batches(data["x"])) // world)
    per_layer = {l: undecided.get(id(net.libraries_[l]), []) for l in LAYERS}
    out = {"seconds": seconds, "collective_seconds": distributed.STATS["seconds"],
           "bytes": distributed.STATS["bytes"], "steps": steps, "sizes": net.library_sizes_,
           "undecided_per_step": per_layer, "hap_dims": net.hap_dims_, "undecided_seconds": TIMES["undecided"],
           "partial_fit_seconds": TIMES["partial_fit"]}
    if memory:
        lib_mb = sum(l.nodes.numel() * l.nodes.element_size() for l in net.libraries_.values()) / 2**20
        sharded = ShardedNetwork.from_network(net)
        del net
        gc.collect()
        reset = reset_peak()
        before = peak_mb()
        shard_mb = sum(s.library.nodes.numel() * s.library.nodes.element_size() + s.weight.numel() * 4
                       for s in sharded.shards.values()) / 2**20
        t1 = time.perf_counter()
        for i in range(0, len(data["x_test"]), 256):
            sharded.predict_scores(data["x_test"][i:i + 256])
        out.update(baseline_mb=base, fit_peak_mb=fit_peak, fit_growth_mb=fit_peak - base, library_mb=lib_mb,
                   shard_mb=shard_mb, local_sizes=sharded.local_sizes_, score_rss_before_mb=before,
                   score_peak_mb=peak_mb(), peak_reset=reset, score_seconds=time.perf_counter() - t1)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


#: threshold sets of growing libraries for the memory sweep (the seed's S1, then higher thetas)
MEMORY_SETS: dict[str, dict[str, float]] = {
    "S1": dict(S1),
    "higher": {"conv1": 0.70, "conv2": 0.80, "fc1": 0.85, "fc2": 0.90},
    "highest": {"conv1": 0.80, "conv2": 0.88, "fc1": 0.92, "fc2": 0.95},
}


def memory_sweep(mb: Any, log: Any = print) -> list[dict[str, Any]]:
    """Per-rank peak memory of a 2-rank fit and of sharded scoring, for each of :data:`MEMORY_SETS`."""
    from benchmarks.bench_memory import MALLOC_ENV

    rows = []
    saved = {k: os.environ.get(k) for k in MALLOC_ENV}
    os.environ.update(MALLOC_ENV)  # read by glibc when each spawned rank starts
    try:
        for name, thetas in MEMORY_SETS.items():
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"state": mb.model.state_dict(), "x": mb.x_train, "x_test": mb.x_test},
                           os.path.join(folder, "data.pt"))
                mp.spawn(_rank, args=(2, folder, thetas, True), nprocs=2, join=True)
                ranks = [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(2)]
            row = {"set": name, "thresholds": thetas, "sizes": ranks[0]["sizes"], "ranks": ranks}
            rows.append(row)
            log(f"[distributed memory] {name} {ranks[0]['sizes']}: library {ranks[0]['library_mb']:.1f} MB; per rank "
                f"fit growth {_per_rank(ranks, 'fit_growth_mb', '.0f')} MB, shard {_per_rank(ranks, 'shard_mb', '.1f')} "
                f"MB, scoring peak RSS {_per_rank(ranks, 'score_peak_mb', '.0f')} MB (from "
                f"{_per_rank(ranks, 'score_rss_before_mb', '.0f')})")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


def _per_rank(ranks: list[dict[str, Any]], key: str, fmt: str) -> str:
    return " / ".join(format(r[key], fmt) for r in ranks)


def render_memory(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`memory_sweep`."""
    lines = ["| thresholds | nodes conv1/conv2/fc1/fc2 | library MB | fit peak growth MB per rank | "
             "shard MB per rank | RSS before scoring MB | scoring peak RSS MB per rank |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rk = r["ranks"]
        lines.append(f"| {r['set']} | {'/'.join(str(v) for v in r['sizes'].values())} | {rk[0]['library_mb']:.1f} | "
                     f"{_per_rank(rk, 'fit_growth_mb', '.0f')} | {_per_rank(rk, 'shard_mb', '.1f')} | "
                     f"{_per_rank(rk, 'score_rss_before_mb', '.0f')} | {_per_rank(rk, 'score_peak_mb', '.0f')} |")
    return "\n".join(lines)


def main(quick: bool = False, log: Any = print, memory: bool = False) -> dict[str, Any]:
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
           "same_library_sizes": all(r["sizes"] == single.library_sizes_ for r in ranks),
           "steps": ranks[0]["steps"], "collective_seconds_per_step": [r["collective_seconds"] / r["steps"] for r in ranks],
           "fit_seconds_per_step": [r["seconds"] / r["steps"] for r in ranks], "sizes": ranks[0]["sizes"],
           "undecided_seconds_per_step": [r["undecided_seconds"] / r["steps"] for r in ranks],
           "partial_fit_seconds_per_step": [r["partial_fit_seconds"] / r["steps"] for r in ranks],
           "hap_dims": ranks[0]["hap_dims"],
           # rows sent per step and rank, per layer (the rows its libraries did not already decide)
           "undecided_per_step": {l: [r["undecided_per_step"][l] for r in ranks] for l in LAYERS}}
    log(f"[distributed] 1 process {one:.2f} s, 2 processes {two:.2f} s (speed-up {out['speedup']:.2f}x); "
        f"{out['bytes_per_step_per_rank'] / 1e6:.2f} MB sent per step per rank; share in collectives "
        f"{', '.join(f'{s:.0%}' for s in out['collective_share'])}; same libraries: {out['same_library_sizes']}")
    for l in LAYERS:
        per = out["undecided_per_step"][l][0]
        log(f"[distributed] {l}: rows sent per step by rank 0: first {per[:3]}, last {per[-3:]}, mean "
            f"{sum(per) / max(len(per), 1):.1f} of 256")
    if memory:
        out["memory"] = memory_sweep(mb, log)
        log(render_memory(out["memory"]))
    return out


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="also the per-rank memory against the library size")
    parser.add_argument("--json", help="write the results to this file")
    ns = parser.parse_args()
    result = main(memory=ns.memory)
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1, default=str))
    sys.exit(0)
