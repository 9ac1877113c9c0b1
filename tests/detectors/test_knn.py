"""The deep k-NN baseline ("knn"), computed by hand."""

from __future__ import annotations

import pytest
import torch

from libnet_plugin.detectors import (
    DeepKNNScore,
)


def test_deep_knn_hand_computed(two_node_net):
    net = two_node_net
    train = (torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
    s = DeepKNNScore(k=2).fit(net, train)
    r = net.probe.run(torch.tensor([[1.0, 0.05], [0.51, 0.49]]))
    # first: both neighbours say 0 = answer; second (answer 0): neighbours [0.9, 0.1] (0) and [0.1, 0.9] (1),
    # one disagreeing vote in each of the two layers
    assert s.score(net, r).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="labels='true' needs training data with labels"):
        DeepKNNScore(labels="true").fit(net, train[0])
