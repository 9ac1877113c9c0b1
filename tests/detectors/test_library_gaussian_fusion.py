"""``"library-gaussian-fusion"``'s post-hoc peer features (``peers=``): fitted, fused, saved and loaded."""

from __future__ import annotations

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.detectors import ViMScore
from libnet_plugin.detectors.library_gaussian_fusion import PEER_FEATURES
from libnet_plugin.errors import SaveFormatError
from libnet_plugin.experiments.models import MnistNet

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def fitted():
    torch.manual_seed(0)
    model = MnistNet().eval()
    x, y = torch.rand(160, 1, 28, 28), torch.randint(0, 10, (160,))
    net = lnp.LibraryNetwork(model, ["conv1", "conv2", "conv2:input", "fc1", "fc2"], thresholds=0.9).fit(x)
    return model, net, x, y


def test_a_peer_score_is_one_more_feature_equal_to_the_peer_alone(fitted, tmp_path):
    model, net, x, y = fitted
    det = lnp.ConsistencyDetector(net, method="library-gaussian-fusion", settings={
        "layers": ["conv1", "conv2"], "gaussian_layers": ["conv2:input"], "peers": ["vim"], "tail": "exponential"})
    det.fit((x, y)).calibrate(x[:80], fpr=0.1)
    assert det.scorer.feature_names()[-2:] == ["conv2:input/gaussian", "peer/vim"]
    saved = sum(t.numel() * t.element_size() for t in det.scorer.state_dict().values())  # peers' state included
    assert det.scorer.gaussian.factor_bytes() > 0
    assert det.scorer.memory_bytes() >= saved + det.scorer.gaussian.factor_bytes()
    r = net.run(x[80:90])
    alone = ViMScore().fit(net, (x, y)).score(net, r)
    torch.testing.assert_close(det.scorer.features(net, r)[:, -1].float(), alone, **TOL)
    s = det.score(x[80:90])
    det.save(tmp_path / "det.lnp")
    loaded = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", model)
    assert loaded.scorer.peers == ("vim",)
    torch.testing.assert_close(loaded.score(x[80:90]), s, **TOL)


def test_peers_are_checked():
    assert "vim" in PEER_FEATURES and "mahalanobis-multilayer" in PEER_FEATURES
    for bad in (["vim", "vim"], ["cpl"], ["no-such-detector"]):
        with pytest.raises(ValueError, match="peers must be distinct names"):
            lnp.plugins.make_detector("library-gaussian-fusion", {"peers": bad})


def test_a_saved_file_whose_peers_do_not_match_is_refused(fitted):
    _, net, x, y = fitted
    det = lnp.plugins.make_detector("library-gaussian-fusion", {"layers": ["conv1"], "peers": ["energy"]})
    det.fit(net, (x, y))
    det.set_reference(det.features(net, net.run(x[:40])))
    config, state = det.config(), det.state_dict()
    other = lnp.plugins.make_detector("library-gaussian-fusion", {"layers": ["conv1"], "peers": ["energy"]})
    with pytest.raises(SaveFormatError, match="peer 0 is not 'energy'"):
        other.load_state_dict(state, net, {**config, "peer_configs_": [{"name": "gen"}]})
    with pytest.raises(SaveFormatError, match="peer configurations"):
        other.load_state_dict(state, net, {**config, "peer_configs_": []})
