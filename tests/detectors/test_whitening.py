"""The cached whitening factor of the library-distance feature gives class_distances' values (issue 30)."""

import torch

from libnet_plugin.detectors._features import class_distances, shared_gaussian, whitened_distances, whitening


def _gaussian(rows: int, dim: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    y = torch.arange(rows) % classes
    onehot = torch.nn.functional.one_hot(y, classes + 1).double()  # the last class has no rows
    return shared_gaussian(onehot.T @ x, x.T @ x, onehot.sum(dim=0), rows)


def test_whitened_distances_match_class_distances_full_and_low_rank():
    g = torch.Generator().manual_seed(1)
    for rows in (200, 12):  # full rank, and a covariance of rank 12 - 3 in 16 dimensions
        means, precision, present = _gaussian(rows, 16, 3, seed=rows)
        white = whitening(means, precision)
        assert white["whiten"].shape[1] == (16 if rows == 200 else 9) and not white["folded"]
        f = torch.randn(7, 16, generator=g, dtype=torch.float64)
        want = class_distances(f, means, precision, present)
        got = whitened_distances(f, white, present)
        assert torch.isinf(got[:, 3]).all() and torch.isinf(want[:, 3]).all()
        assert torch.allclose(got[:, :3], want[:, :3], rtol=1e-9, atol=1e-9 * want[:, :3].abs().max().item())


def test_folded_projection_matches_projecting_first():
    g = torch.Generator().manual_seed(2)
    proj = torch.randn(300, 64, generator=g) / 8.0
    x = torch.randn(12, 300, generator=g)
    means, precision, present = _gaussian(10, 64, 2, seed=3)  # rank 8 <= 64 / 4: folded
    white = whitening(means, precision, proj)
    assert white["folded"] and white["whiten"].shape == (300, 8)
    want = class_distances((x @ proj).double(), means, precision, present)
    got = whitened_distances(x, white, present)
    fin = want.isfinite()
    assert torch.equal(fin, got.isfinite())  # booleans: only the absent class is infinite (masked_fill)
    # a float32 product either way: equal up to float32 rounding
    assert torch.allclose(got[fin], want[fin], rtol=1e-4, atol=1e-4 * want[fin].abs().max().item())
