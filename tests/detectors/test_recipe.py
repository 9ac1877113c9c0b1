"""fusion_recipe and first_layer: the fused detector's layers found by rule on models the project did not write."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.detectors import MNIST_CANDIDATES, fusion_recipe
from libnet_plugin.errors import LayerNotFoundError
from libnet_plugin.experiments.models import MnistNet
from libnet_plugin.probe import first_layer

ROUND_10 = "library-gaussian-fusion (generic: conv1, conv2:input, fc1:input; vim; truncated 0.1; tail)"


def test_on_the_mnist_net_the_recipe_is_round_10s_measured_candidate():
    torch.manual_seed(0)
    recipe = fusion_recipe(MnistNet().eval(), (torch.rand(5, 1, 28, 28), torch.arange(5)))
    name, settings = MNIST_CANDIDATES[ROUND_10]
    assert recipe["method"] == name and recipe["settings"] == settings
    assert recipe["layers"] == ["conv1", "conv2:input", "fc1:input", "fc2:input"]


class Shared(nn.Module):
    """A stem module called twice (weights shared), as a tied embedding is."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.tanh(self.stem(self.stem(x))))))


def test_first_layer_is_the_stem_and_names_the_first_call_of_a_shared_module():
    assert first_layer(Shared().eval(), torch.rand(3, 4)) == "stem#1"
    conv = nn.Sequential(nn.Identity(), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    assert first_layer(conv, torch.rand(2, 1, 6, 6)) == "1"
    with pytest.raises(LayerNotFoundError, match="name the layer"):
        first_layer(nn.Sequential(nn.ReLU()), torch.rand(2, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        first_layer(lambda x: x, torch.rand(2, 3))


def test_the_recipe_refuses_data_it_would_spend_or_that_holds_nothing():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="iterated only once"):
        fusion_recipe(model, (b for b in [torch.rand(2, 4)]))
    with pytest.raises(ValueError, match="no input"):
        fusion_recipe(model, torch.rand(0, 4))


def test_a_vit_built_from_its_config_gets_a_working_fused_detector(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    px = torch.rand(260, 3, 16, 16)
    train, clean, test = {"pixel_values": px[:160]}, {"pixel_values": px[160:240]}, {"pixel_values": px[240:]}
    recipe = fusion_recipe(model, train)
    assert recipe["layers"][0] == "vit.embeddings.patch_embeddings.projection"  # the patch embedding: the stem
    assert recipe["layers"][-1] == "classifier:input"  # the penultimate features, where ViM reads
    assert recipe["settings"]["layers"] == recipe["layers"][:-1]
    det = lnp.ConsistencyDetector.from_model(model, train, thresholds=0.9, **recipe).calibrate(clean, fpr=0.1)
    scores = det.score(test)
    assert scores.shape == (20,) and bool(torch.isfinite(scores).all())
    det.save(tmp_path / "det.lnp")
    torch.testing.assert_close(lnp.ConsistencyDetector.load(tmp_path / "det.lnp", model).score(test), scores)
