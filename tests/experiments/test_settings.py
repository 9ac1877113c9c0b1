"""The experiments' settings objects: checked once when made, the same run as the keyword form."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from libnet_plugin.experiments.adaptive import AdaptivePGDSettings
from libnet_plugin.experiments.attacks import PGDSettings, pgd_torch
from libnet_plugin.experiments.comparison import ComparisonSettings, DetectorComparisonSettings
from libnet_plugin.experiments.report import ExperimentError
from libnet_plugin.experiments.threat_models import AdaptiveBudget


def test_settings_are_frozen_and_checked_when_made():
    s = PGDSettings(eps=0.3, nb_iter=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.eps = 0.1
    assert s.step == pytest.approx(2.5 * 0.3 / 4)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        PGDSettings(eps=-1)
    with pytest.raises(ValueError, match="need clip_min < clip_max"):
        PGDSettings(eps=0.1, clip_min=1.0, clip_max=0.0)
    with pytest.raises(ValueError, match="loss must be"):
        PGDSettings(eps=0.1, loss="hinge")
    assert AdaptivePGDSettings(eps=0.2, steps=5).alpha == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lambdas must be finite numbers >= 0"):
        AdaptivePGDSettings(eps=0.2, lambdas=())
    with pytest.raises(ValueError, match="n_boot must be a positive integer"):
        ComparisonSettings(n_boot=0)
    with pytest.raises(ValueError, match="space must be 'pixels' or 'normalized'"):
        DetectorComparisonSettings(space="logits", mean=0.0, std=1.0)
    with pytest.raises(ValueError, match="protocol must be one of"):
        DetectorComparisonSettings(space="pixels", mean=0.0, std=1.0, protocol="fgsm")
    with pytest.raises(ExperimentError, match="steps must be an integer >= 1"):
        DetectorComparisonSettings(space="pixels", mean=0.0, std=1.0, adaptive=AdaptiveBudget(steps=0))
    with pytest.raises(ValueError, match="fpr must be a number in"):
        DetectorComparisonSettings(space="pixels", mean=0.0, std=1.0, fpr=0.0)


def test_a_settings_object_runs_as_its_keywords():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = model(x).argmax(1)
    s = PGDSettings(eps=0.2, nb_iter=3, seed=4, batch_size=4)
    assert torch.equal(pgd_torch(model, x, y, settings=s), pgd_torch(model, x, y, 0.2, nb_iter=3, seed=4, batch_size=4))
    assert torch.equal(pgd_torch(model, x, y, settings=s, nb_iter=1), pgd_torch(model, x, y, 0.2, nb_iter=1, seed=4,
                                                                                batch_size=4))
    with pytest.raises(TypeError, match="pass nb_iter= and the other settings by keyword"):
        pgd_torch(model, x, y, 0.2, 40)
