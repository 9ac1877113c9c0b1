"""Fixtures of the detector tests."""

from __future__ import annotations

import pytest
import torch

import libnet_plugin as lnp


@pytest.fixture
def two_node_net(two_layer):
    """A network over the hand-set TwoLayer model whose libraries hold exactly [1, 0] (answer 0) and [0, 1] (answer 1).

    The HAPs of both layers equal the input; theta 0.5 keeps the first two training rows as nodes.
    """
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    return lnp.LibraryNetwork(two_layer, ["a", "b"], thresholds=0.5).fit(train)
