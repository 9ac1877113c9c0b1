"""The fast paths of ExactLibrary (chunking, the count-sketch screen) give exactly the reference nodes.

The screen is only tried for long vectors and libraries of some size, so these tests shrink
``screen_dim`` / ``screen_min_nodes`` to exercise it on small data, and check through
``ExactLibrary.stats`` that it really decided rows.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libnet_plugin.library import ExactLibrary, leader_reference


def clustered(seed: int, n: int, d: int, k: int = 6, noise: float = 0.5, dtype=torch.float32) -> torch.Tensor:
    """Rows around ``k`` random centres: once the library settles most rows are not novel."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=dtype)
    return centres[torch.randint(0, k, (n,), generator=g)] + noise * torch.randn(n, d, generator=g, dtype=dtype)


def fit(x: torch.Tensor, theta: float, batch_size: int, **options) -> ExactLibrary:
    lib = ExactLibrary(theta, **options)
    for i in range(0, x.shape[0], batch_size):
        lib.partial_fit(x[i:i + batch_size])
    return lib


SCREEN = dict(screen_dim=8, screen_min_nodes=1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), theta=st.floats(0.3, 0.97), batch_size=st.integers(1, 90),
       chunk_size=st.integers(1, 70), candidates=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_screened_library_equals_reference(seed, theta, batch_size, chunk_size, candidates, dtype):
    x = clustered(seed, 120, 40, dtype=dtype)
    lib = fit(x, theta, batch_size, chunk_size=chunk_size, screen_candidates=candidates, dtype=dtype, **SCREEN)
    assert lib.node_indices.tolist() == leader_reference(x, theta)
    dense = fit(x, theta, batch_size, chunk_size=chunk_size, screen_dim=0, dtype=dtype)
    assert torch.equal(lib.nodes, dense.nodes)
    assert sum(lib.stats.values()) == x.shape[0] == lib.n_seen


class _Recorder:
    """A LeaderObserver that wants no extra dense rows and keeps every chunk's scores."""

    def __init__(self):
        self.chunks = []

    def use_screen(self):
        return True

    def want_dense(self, node, cos):
        return torch.zeros(node.numel(), dtype=torch.bool)

    def on_chunk(self, scores):
        self.chunks.append(scores)


def test_observer_gets_the_row_maxima_the_rule_decided_with_and_nodes_stay_the_same():
    # clustered rows in batches of 50 and chunks of 20: rows novel against the library and blocked by an
    # earlier row of their own chunk both occur (within-chunk novelty), with the screen on and off
    x = clustered(5, 400, 48, k=12, noise=0.7)
    theta = 0.6
    rec = _Recorder()
    lib = ExactLibrary(theta, chunk_size=20, **SCREEN)
    for i in range(0, x.shape[0], 50):
        lib.partial_fit(x[i:i + 50], observer=rec)
    plain = fit(x, theta, 50, chunk_size=20, **SCREEN)
    assert lib.node_indices.tolist() == plain.node_indices.tolist() == leader_reference(x, theta)
    assert torch.equal(lib.nodes, plain.nodes)
    assert any(c.gram is not None and c.accepted.numel() < c.cand.numel() for c in rec.chunks)  # blocked in-chunk
    with_dense = [c for c in rec.chunks if c.dense_cos is not None and c.dense.numel()]
    assert with_dense and any(c.screened.numel() for c in rec.chunks)
    for c in with_dense:
        best, node = c.dense_cos.max(dim=1)
        assert torch.equal(c.dense_best, best) and torch.equal(c.dense_node, node)
        assert torch.equal(c.cand, c.dense[best < theta])  # the rows found novel against the library
    assert all(c.dense_best is None for c in rec.chunks if c.dense_cos is None)


def test_screen_decides_most_rows_of_settled_clustered_data():
    x = clustered(0, 2000, 64, k=5, noise=0.3)
    lib = fit(x, 0.8, 128, **SCREEN)
    assert lib.node_indices.tolist() == leader_reference(x, 0.8)
    assert lib.stats["screened"] > 0.8 * x.shape[0]


def test_screen_is_off_for_short_vectors_and_when_disabled():
    x = clustered(1, 400, 20)
    assert fit(x, 0.8, 64, screen_dim=8, screen_min_nodes=1).stats["screened"] == 0  # 20 < 4 * 8
    assert fit(clustered(1, 400, 64), 0.8, 64, screen_dim=0).stats["screened"] == 0


def test_screen_backs_off_on_novel_rows_and_stays_exact():
    # independent random directions in 64-d: at theta 0.5 nearly every row is novel, the screen cannot help
    x = torch.randn(600, 64, generator=torch.Generator().manual_seed(2))
    lib = fit(x, 0.5, 32, **SCREEN)
    assert lib.node_indices.tolist() == leader_reference(x, 0.5)
    assert lib.stats["dense"] > lib.stats["screened"]


def test_one_large_batch_is_chunked_and_returns_the_stored_mask():
    x = clustered(3, 500, 40)
    lib = ExactLibrary(0.85, chunk_size=37, **SCREEN)
    stored = lib.partial_fit(x, torch.arange(1000, 1500))
    ref = leader_reference(x, 0.85)
    assert torch.nonzero(stored).flatten().tolist() == ref
    assert lib.node_indices.tolist() == [1000 + i for i in ref]


def test_fitting_continues_exactly_after_load_state_dict():
    x = clustered(4, 900, 64)
    half = fit(x[:450], 0.8, 100, **SCREEN)
    resumed = ExactLibrary(0.8, dim=64, **SCREEN)
    resumed.load_state_dict(half.state_dict())
    resumed.n_seen = 450
    for i in range(450, 900, 100):
        resumed.partial_fit(x[i:i + 100])
    assert resumed.node_indices.tolist() == leader_reference(x, 0.8)
    assert resumed.stats["screened"] > 0


def test_buffer_growth_keeps_node_sketches_in_step():
    # initial_capacity 1 doubles the buffer many times while the screen is active
    x = clustered(5, 300, 64, k=20, noise=0.3)
    lib = fit(x, 0.85, 5, initial_capacity=1, **SCREEN)
    assert lib.node_indices.tolist() == leader_reference(x, 0.85)
    assert lib.stats["screened"] > 0 and lib._nodes.shape[0] >= 16
    assert torch.allclose(lib._sketch_nodes[: lib.size], lib._sketch(lib.nodes))


@pytest.mark.parametrize("option, value", [("chunk_size", 0), ("screen_dim", -1), ("screen_candidates", 0),
                                           ("screen_min_nodes", 1.5), ("initial_capacity", True)])
def test_bad_options_name_the_option_and_layer(option, value):
    allowed = "an integer >= 0" if option == "screen_dim" else "a positive integer"
    with pytest.raises(ValueError, match=rf"{option} for layer 'fc1' must be {allowed}, got {value!r}"):
        ExactLibrary(0.7, layer="fc1", **{option: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_screened_library_on_cuda_equals_reference():
    x = clustered(6, 1500, 64)
    lib = ExactLibrary(0.8, device="cuda", **SCREEN)
    for i in range(0, 1500, 256):
        lib.partial_fit(x[i:i + 256].cuda())
    assert lib.node_indices.tolist() == leader_reference(x, 0.8)
    assert lib.stats["screened"] > 0
