"""Fit a library network on the MNIST default across processes, with torch.distributed.

    torchrun --nproc-per-node 2 scripts/fit_distributed.py --out runs/mnist-net.lnp

Every rank reads the embedded MNIST default and the paper's net (trained once and cached in --cache-dir;
start it once in one process to fill the cache), takes its shard of the training batches
(every world-th batch, like a DistributedSampler), and calls ``LibraryNetwork.fit``: the libraries come
out identical on every rank and equal to one process over the batches in (step, rank) order. Rank 0
saves the network. ``--single`` fits the same batches in one process, for comparison. Runs on the CPU
with gloo; ``--device cuda`` uses NCCL.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

import libnet_plugin as lnp
from libnet_plugin.experiments.data import load_mnist_default
from libnet_plugin.experiments.mnist import CPL_SETS, LAYERS, MnistSettings, cached_or_trained_mnist_net


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "mnist-net.lnp"))
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--single", action="store_true", help="one process over the same batches (no torchrun)")
    args = parser.parse_args()
    distributed = not args.single and "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        rank, world = 0, 1
    x_tr, y_tr, _, _ = load_mnist_default(seed=0, cache_dir=args.cache_dir)
    net_model, _ = cached_or_trained_mnist_net(x_tr, y_tr, MnistSettings.default_run(), Path(args.cache_dir), False,
                                               lambda m: print(m, file=sys.stderr))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{torch.cuda.current_device()}")
    model = net_model.to(device).eval()
    batches = [(x_tr[i:i + args.batch_size], y_tr[i:i + args.batch_size]) for i in range(0, len(x_tr), args.batch_size)]
    net = lnp.LibraryNetwork(model, list(LAYERS), thresholds=dict(CPL_SETS["S1"]), device=device)
    net.fit(batches[rank::world])
    if rank == 0:
        net.save(args.out)
        print(f"rank 0 of {world}: library sizes {net.library_sizes_}, {net.n_train_} training images; saved {args.out}")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
