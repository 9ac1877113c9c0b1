"""The whole fit against one dense product: library and Hebbian readout timed separately.

For one set of activation patterns and threshold, in one run (interleaved turns, best of each):

- ``library``: :class:`~libnet_plugin.ExactLibrary` with its defaults, fed the rows in batches (what the
  fit's first pass does for one layer, without the model);
- ``fit``: the whole :meth:`LibraryNetwork.fit <libnet_plugin.LibraryNetwork.fit>` (``cache_bytes=0``:
  two streamed passes) of a model whose probed layer is an ``nn.Identity`` on the rows, followed by a
  linear head with ``n_classes`` outputs (its argmax are the answers of Eq. 2), so the HAP is the row
  itself and the model costs next to nothing;
- ``matmul``: one plain ``torch`` product of all N rows with the final library (N x M x D multiply-adds);
- with ``in_memory`` (``--in-memory``), also ``fit_in_memory``: the same fit with a ``cache_bytes`` that keeps
  every HAP (the fit's default where they fit memory): the model runs once, pass 2 reads the kept HAPs.

``readout`` is ``fit - library``: the second pass (model again, the [N, M] similarity, g, the product
with the answers) plus the probe's share of the first. Ratios come from one run; the load average (1 min)
at the start and end of each set is kept with it, as the timings of a shared machine depend on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from libnet_plugin import LibraryNetwork
from libnet_plugin.library import ExactLibrary, normalize_rows

from ._util import interleaved_best, load_average, sync

__all__ = ["identity_model", "run_case"]


def identity_model(dim: int, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """``nn.Sequential(nn.Identity(), nn.Linear(dim, n_classes))``: layer ``"0"`` gives the input rows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Identity(), nn.Linear(dim, n_classes)).eval()


def run_case(name: str, x: torch.Tensor, theta: float, device: torch.device, *, batch_size: int = 256,
             repeat: int = 3, n_classes: int = 10, log=print, in_memory: bool = False) -> dict[str, Any]:
    """Time the library alone, the whole fit and one plain product on ``x`` (rows, normalised here); with
    ``in_memory`` also the fit that keeps every HAP for pass 2 (one run of the model)."""
    load_start = (load_average() or [None])[0]
    n, dim = x.shape
    xn = normalize_rows(x.float()).to(device)
    model = identity_model(dim, n_classes).to(device)
    sync(device)
    log(f"[fit:{name}] {n} x {dim}, theta {theta}, batch {batch_size}, device {device}")
    got: dict[str, Any] = {}

    def library():
        lib = ExactLibrary(theta, device=device)
        for i in range(0, n, batch_size):
            lib.partial_fit(xn[i:i + batch_size])
        got["library"] = lib

    def fit():
        got["net"] = LibraryNetwork(model, ["0"], thresholds=theta, device=device, batch_size=batch_size,
                                    cache_bytes=0).fit(xn, progress=False)

    def fit_in_memory():
        got["net_in_memory"] = LibraryNetwork(model, ["0"], thresholds=theta, device=device, batch_size=batch_size,
                                              cache_bytes=xn.numel() * xn.element_size()).fit(xn, progress=False)

    library()
    nodes = got["library"].nodes.clone()

    def matmul():
        return xn @ nodes.T

    import warnings

    with warnings.catch_warnings():  # the growing set keeps most inputs: the fit warns about that
        warnings.simplefilter("ignore")
        fns = {"library": library, "fit": fit, "matmul": matmul}
        if in_memory:
            fns["fit_in_memory"] = fit_in_memory
        times = interleaved_best(fns, device, repeat=repeat, warmup=0)
    times["readout"] = times["fit"] - times["library"]
    for k, v in times.items():
        log(f"  {k}: {v:.3f} s")
    net = got["net"]
    same = net.libraries_["0"].node_indices.tolist() == got["library"].node_indices.tolist()
    mm = times["matmul"]
    ratios = {"library_over_matmul": times["library"] / mm, "readout_over_matmul": times["readout"] / mm,
              "fit_over_matmul": times["fit"] / mm}
    if in_memory:
        ratios["fit_in_memory_over_matmul"] = times["fit_in_memory"] / mm
    load = [load_start, (load_average() or [None])[0]]
    log(f"  load average (1 min) at start / end: {load[0]} / {load[1]}")
    return {"name": name, "n": n, "dim": dim, "theta": theta, "batch_size": batch_size, "nodes": nodes.shape[0],
            "device": str(device), "seconds": times, "same_nodes": same,
            "screen_stats": dict(got["library"].stats), "load_average": load, "ratios": ratios}


#: conv1's threshold (the seed's sweep; about 1,000 nodes on the 4,000 training images), as in benchmarks.run
MNIST_CONV1_THETA = 0.7


def mnist_conv1_haps(device: torch.device, cache_dir: str = ".cache") -> torch.Tensor:
    """The MNIST default net's conv1 patterns of its 4,000 training images (``[4000, 11520]``)."""
    from pathlib import Path

    from libnet_plugin.experiments.data import load_mnist_default
    from libnet_plugin.experiments.mnist import MnistSettings, cached_or_trained_mnist_net
    from libnet_plugin.experiments.models import MnistNet
    from libnet_plugin.plugins import make_probe

    # the net and inputs of benchmarks.mnist_setup.prepare_mnist (without its attacks)
    settings = MnistSettings.default_run(seed=0, epochs=5)
    x_tr, y_tr, _, _ = load_mnist_default(seed=settings.seed, n_train=4000, cache_dir=Path(cache_dir))
    net, _ = cached_or_trained_mnist_net(x_tr, y_tr, settings, Path(cache_dir), False, print)
    model = MnistNet(normalize=True)
    model.load_state_dict(net.state_dict())
    probe = make_probe(model.to(device).eval(), ["conv1"], device)
    x_tr = x_tr.to(device)
    return torch.cat([probe.run(x_tr[i:i + 500]).haps["conv1"] for i in range(0, x_tr.shape[0], 500)])


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    from .synthetic import CLUSTERED, GROWING, SyntheticSpec, synthetic_set

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fit", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sets", default="synthetic,clustered,growing,mnist_conv1",
                        help="comma-separated: synthetic, clustered, growing, mnist_conv1 (the MNIST net's conv1 "
                             "patterns of the 4,000 training images, theta 0.7; trains or loads the cached net)")
    parser.add_argument("--cache-dir", default=".cache", help="the MNIST weights cache (mnist_conv1)")
    parser.add_argument("--in-memory", action="store_true",
                        help="also time the fit that keeps every HAP for pass 2 (the model runs once)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = {"synthetic": SyntheticSpec(), "clustered": CLUSTERED, "growing": GROWING}
    device = torch.device(args.device)
    out = {}
    for name in args.sets.split(","):
        if name == "mnist_conv1":
            x, theta = mnist_conv1_haps(device, args.cache_dir), MNIST_CONV1_THETA
        else:
            x, theta = synthetic_set(specs[name]), specs[name].theta
        out[name] = run_case(name, x, theta, device, repeat=args.repeat, in_memory=args.in_memory)
        print(json.dumps({name: {**out[name]["ratios"], "nodes": out[name]["nodes"],
                                 "load_average": out[name]["load_average"]}}))


if __name__ == "__main__":
    main()
