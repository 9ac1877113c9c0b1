"""The synthetic construction benchmark set: clustered unit vectors, generated block by block.

Each of ``clusters`` centres carries a random ``rank``-dimensional subspace of variation plus isotropic
noise, so that leader clustering covers every cluster with a handful of nodes: with the defaults
(20,000 vectors of 3,200 dimensions, theta 0.7) the library ends with about 1,800 nodes, larger than the
CPU caches. Rows are produced in blocks of ``block`` from per-block seeds, so a stream of batches never
holds the whole set (working memory: a few blocks) and always yields the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

__all__ = ["SyntheticSpec", "synthetic_batches", "synthetic_set", "CLUSTERED", "GROWING"]


@dataclass(frozen=True)
class SyntheticSpec:
    """Settings of the synthetic set (see the module docstring)."""

    n: int = 20_000
    dim: int = 3_200
    clusters: int = 100
    rank: int = 4
    spread: float = 1.0
    noise: float = 0.3
    theta: float = 0.7
    seed: int = 0
    block: int = 256

    def describe(self) -> dict:
        return asdict(self)


def _structure(spec: SyntheticSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(spec.seed)
    centres = torch.randn(spec.clusters, spec.dim, generator=g)
    centres /= centres.norm(dim=1, keepdim=True)
    basis = torch.randn(spec.clusters * spec.rank, spec.dim, generator=g) / spec.dim ** 0.5
    return centres, basis


def _blocks(spec: SyntheticSpec) -> Iterator[torch.Tensor]:
    centres, basis = _structure(spec)
    for j, start in enumerate(range(0, spec.n, spec.block)):
        b = min(spec.block, spec.n - start)
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + j + 1)
        lab = torch.randint(0, spec.clusters, (b,), generator=g)
        z = torch.randn(b, spec.rank, generator=g) * spec.spread
        # row i gets z[i] @ basis[lab[i]]: one product with a [b, clusters * rank] coefficient matrix
        coef = torch.zeros(b, spec.clusters * spec.rank)
        coef[torch.arange(b)[:, None], lab[:, None] * spec.rank + torch.arange(spec.rank)] = z
        x = centres[lab] + coef @ basis + spec.noise * torch.randn(b, spec.dim, generator=g) / spec.dim ** 0.5
        yield x / x.norm(dim=1, keepdim=True)


def synthetic_batches(spec: SyntheticSpec, batch_size: int) -> Iterator[torch.Tensor]:
    """The rows of the set in order, ``batch_size`` at a time, holding at most one block plus one batch."""
    buf: list[torch.Tensor] = []
    have = 0
    for blk in _blocks(spec):
        buf.append(blk)
        have += blk.shape[0]
        while have >= batch_size:
            cat = torch.cat(buf)
            yield cat[:batch_size]
            rest = cat[batch_size:]
            buf, have = ([rest] if rest.shape[0] else []), rest.shape[0]
    if have:
        yield torch.cat(buf)


def synthetic_set(spec: SyntheticSpec) -> torch.Tensor:
    """The whole set ``[n, dim]`` (the same rows as :func:`synthetic_batches`)."""
    return torch.cat(list(_blocks(spec)))


#: A set nobody tuned the screen for: 3,000 centres without a subspace of variation, noise 0.45, so two
#: inputs of one centre have cosine about 1 / (1 + 0.45^2) = 0.83 and theta 0.8 keeps about one node per
#: centre (2,997 nodes of 20,000 inputs); the library settles early and the screen decides most inputs.
CLUSTERED = SyntheticSpec(clusters=3_000, spread=0.0, noise=0.45, theta=0.8)

#: A library that keeps growing, cosines near theta: 6,000 centres for 12,000 inputs (new centres keep
#: arriving until the end) and noise 0.5, so two inputs of one centre have cosine about 1 / 1.25 = 0.8,
#: theta itself; about two thirds of the inputs become nodes (8,112) and the screen rarely decides one.
GROWING = SyntheticSpec(n=12_000, clusters=6_000, spread=0.0, noise=0.5, theta=0.8)

