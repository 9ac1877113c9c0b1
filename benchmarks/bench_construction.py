"""Library construction: exact batched vs the one-by-one loop vs a plain matrix product vs faiss.

For one data set and threshold, in one run:

- ``loop``: :func:`libnet_plugin.leader_reference`, the one-by-one rule (one matrix-vector product per
  input against the library so far);
- ``dense``: :class:`~libnet_plugin.ExactLibrary` with the screen off (one matrix product per batch
  against the library so far, then the Gram step for the undecided rows);
- ``screened``: :class:`~libnet_plugin.ExactLibrary` with its defaults (the count-sketch screen decides
  most settled rows from a few exact dot products);
- ``faiss``: the same leader rule with faiss-cpu's exact inner-product index (``IndexFlatIP``) as the
  search step, the peer a user would pick (optional dependency; skipped when absent or on CUDA);
- ``matmul``: one plain ``torch`` product of all inputs with the final library (N x M x D multiply-adds).

Every library's node list is checked against the loop's. Ratios come from one run; the multiply-add
rate of a method is the multiply-adds of its library comparisons divided by its time, as a fraction of
the matrix product's rate.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from libnet_plugin.library import ExactLibrary, leader_reference, leader_within, normalize_rows

from ._util import interleaved_best, sync

__all__ = ["build_exact", "leader_faiss", "comparison_macs", "run_case"]


def build_exact(x: torch.Tensor, theta: float, batch_size: int, device: torch.device, **options: Any) -> ExactLibrary:
    """Feed ``x`` to an :class:`ExactLibrary` in batches of ``batch_size`` (rows already on ``device``)."""
    lib = ExactLibrary(theta, device=device, **options)
    for i in range(0, x.shape[0], batch_size):
        lib.partial_fit(x[i:i + batch_size])
    return lib


def leader_faiss(x: np.ndarray, theta: float, batch_size: int) -> list[int]:
    """The exact batched leader rule with a faiss ``IndexFlatIP`` as the search step.

    Args:
        x: ``float32 [N, D]`` rows, L2-normalised, C-contiguous.
        theta: the threshold.
        batch_size: rows searched together.

    Returns:
        The indices of the rows stored, in order (the same list as :func:`leader_reference`).
    """
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    kept: list[int] = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size]
        if index.ntotal:
            best, _ = index.search(xb, 1)
            cand = np.flatnonzero(best[:, 0] < theta)
        else:
            cand = np.arange(xb.shape[0])
        if cand.size == 0:
            continue
        rows = cand[leader_within(xb[cand] @ xb[cand].T, theta)]
        index.add(np.ascontiguousarray(xb[rows]))
        kept.extend((start + rows).tolist())
    return kept


def comparison_macs(node_indices: torch.Tensor, n: int, dim: int, batch_size: int | None) -> int:
    """Multiply-adds of comparing every input with the library as it stood before it.

    ``batch_size=None``: the one-by-one loop (input i meets the nodes stored before i); otherwise the
    batched rule (every input of a batch meets the nodes stored before the batch).
    """
    idx = np.sort(node_indices.cpu().numpy())
    if batch_size is None:
        before = np.searchsorted(idx, np.arange(n), side="left")
    else:
        starts = (np.arange(n) // batch_size) * batch_size
        before = np.searchsorted(idx, starts, side="left")
    return int(before.sum()) * dim


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def run_case(name: str, x: torch.Tensor, theta: float, device: torch.device, *, batch_size: int = 256,
             repeat: int = 3, loop: bool = True, log=print) -> dict[str, Any]:
    """Time every construction method on ``x`` (raw rows, normalised here) and check their results.

    Returns:
        A JSON-able dict: sizes, seconds per method, ``same_nodes`` per method, and the ratios.
    """
    n, dim = x.shape
    xn = normalize_rows(x.float()).to(device)
    sync(device)
    log(f"[construction:{name}] {n} x {dim}, theta {theta}, batch {batch_size}, device {device}")
    ref_nodes = None
    t_loop = None
    if loop:
        t0 = time.perf_counter()
        ref_nodes = leader_reference(xn, theta)
        sync(device)
        t_loop = time.perf_counter() - t0
        log(f"  loop: {len(ref_nodes)} nodes in {t_loop:.2f} s")
    libs: dict[str, ExactLibrary] = {}

    def dense():
        libs["dense"] = build_exact(xn, theta, batch_size, device, screen_dim=0)

    def screened():
        libs["screened"] = build_exact(xn, theta, batch_size, device)

    # the final library for the plain product: any exact build gives it
    dense()
    nodes = libs["dense"].nodes.clone()
    m = nodes.shape[0]

    def matmul():
        return xn @ nodes.T

    fns = {"dense": dense, "screened": screened, "matmul": matmul}
    x_np = None
    if device.type == "cpu" and _faiss_available():
        x_np = np.ascontiguousarray(xn.cpu().numpy())
        faiss_out: dict[str, list[int]] = {}
        fns["faiss"] = lambda: faiss_out.__setitem__("nodes", leader_faiss(x_np, theta, batch_size))
    times = interleaved_best(fns, device, repeat=repeat, warmup=0)
    for k, v in times.items():
        log(f"  {k}: {v:.3f} s")
    ref = ref_nodes if ref_nodes is not None else libs["dense"].node_indices.tolist()
    same = {"dense": libs["dense"].node_indices.tolist() == ref, "screened": libs["screened"].node_indices.tolist() == ref}
    if x_np is not None:
        same["faiss"] = faiss_out["nodes"] == ref
    macs_matmul = n * m * dim
    macs_batched = comparison_macs(libs["dense"].node_indices, n, dim, batch_size)
    rate_matmul = macs_matmul / times["matmul"]
    out: dict[str, Any] = {
        "name": name, "n": n, "dim": dim, "theta": theta, "batch_size": batch_size, "nodes": m,
        "device": str(device), "seconds": {"loop": t_loop, **times}, "same_nodes_as_loop": same,
        "reference": "loop" if loop else "dense (loop skipped)",
        "screen_stats": dict(libs["screened"].stats),
        "macs": {"matmul": macs_matmul, "batched_comparisons": macs_batched},
        "ratios": {
            "dense_over_matmul": times["dense"] / times["matmul"],
            "screened_over_matmul": times["screened"] / times["matmul"],
            "dense_mac_rate_fraction_of_matmul": (macs_batched / times["dense"]) / rate_matmul,
            "screened_equivalent_mac_rate_fraction_of_matmul": (macs_batched / times["screened"]) / rate_matmul,
        },
    }
    if t_loop is not None:
        macs_loop = comparison_macs(libs["dense"].node_indices, n, dim, None)
        out["macs"]["loop_comparisons"] = macs_loop
        out["ratios"].update({
            "loop_over_dense": t_loop / times["dense"],
            "loop_over_screened": t_loop / times["screened"],
            "loop_mac_rate_fraction_of_matmul": (macs_loop / t_loop) / rate_matmul,
        })
    if "faiss" in times:
        out["ratios"]["faiss_over_dense"] = times["faiss"] / times["dense"]
        out["ratios"]["faiss_over_screened"] = times["faiss"] / times["screened"]
    else:
        out["faiss_note"] = ("faiss-cpu is not installed" if device.type == "cpu" and not _faiss_available()
                             else "faiss-cpu runs on the CPU only; not compared on a GPU")
    return out
