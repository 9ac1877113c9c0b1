"""Conformance of every served detector to the ConsistencyScore contract (libnet_plugin/detectors/api.py).

Each test is parametrized over ``libnet_plugin.builtins.DETECTORS``, so a new built-in detector is
checked by every property here without editing this module. Small seeded data only (the ``mlp`` and
``mlp_data`` fixtures of tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.builtins import DETECTORS
from libnet_plugin.detectors import ConsistencyScore
from libnet_plugin.errors import NotFittedError
from libnet_plugin.plugins import make_detector

NAMES = sorted(DETECTORS)
LAYERS = ["fc1", "fc2", "out"]

#: ``{(test function, detector name): reason}`` of properties known not to hold; marked xfail(strict=True)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def names_for(test: str) -> list:
    """Every served detector name, with the known failures of ``test`` marked ``xfail(strict=True)``."""
    return [pytest.param(n, id=n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(test, n)]))
            if (test, n) in KNOWN_FAILURES else pytest.param(n, id=n) for n in NAMES]


@pytest.fixture
def pm():
    return lnp.get_plugin_manager(autoload=False)


@pytest.fixture
def net(mlp, mlp_data, pm):
    x, _ = mlp_data
    return lnp.LibraryNetwork(mlp, LAYERS, thresholds=0.85, plugin_manager=pm).fit(x)


@pytest.fixture
def clean():
    """Held-out clean inputs (not the training data), 60 of them: enough for fpr=0.1."""
    return torch.randn(60, 10, generator=torch.Generator().manual_seed(2))


def _fit(score: ConsistencyScore, net, train) -> ConsistencyScore:
    return score.fit(net, train if score.requires_training_data else None)


def _fitted(name: str, pm, net, train, clean) -> ConsistencyScore:
    """A fitted score; a fused one also gets the clean reference, so that it can score."""
    score = _fit(make_detector(name, {}, pm), net, train)
    if score.fuses:
        score.set_reference(score.features(net, net.run(clean)))
    return score


def _state(score: ConsistencyScore) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in score.state_dict().items()}


@pytest.mark.parametrize("name", names_for("test_hook_serves_it"))
def test_hook_serves_it(name, pm):
    score = make_detector(name, {}, pm)
    assert isinstance(score, DETECTORS[name])
    assert isinstance(score, ConsistencyScore)
    assert score.name == name


@pytest.mark.parametrize("name", names_for("test_fit_returns_self"))
def test_fit_returns_self(name, pm, net, mlp_data):
    score = make_detector(name, {}, pm)
    assert _fit(score, net, mlp_data) is score
    score.check_is_fitted()  # does not raise once fitted


@pytest.mark.parametrize("name", names_for("test_score_before_fit_raises_not_fitted"))
def test_score_before_fit_raises_not_fitted(name, pm, net, clean):
    score = make_detector(name, {}, pm)
    result = net.run(clean[:5])
    with pytest.raises(NotFittedError):
        score.score(net, result)
    with pytest.raises(NotFittedError):
        score.check_is_fitted()


@pytest.mark.parametrize("name", names_for("test_refit_resets"))
def test_refit_resets(name, pm, net, mlp_data, clean):
    once = _fit(make_detector(name, {}, pm), net, mlp_data)
    state_once, config_once = _state(once), once.config()

    score = _fitted(name, pm, net, mlp_data, clean)
    result = net.run(clean[:7])
    assert score.score(net, result).shape == (7,)
    _fit(score, net, mlp_data)  # refit on the same data
    if score.fuses:
        # the clean reference given before the refit is forgotten
        with pytest.raises(NotFittedError):
            score.score(net, result)
    state_twice = _state(score)
    assert sorted(state_twice) == sorted(state_once)
    for key, value in state_once.items():
        assert state_twice[key].shape == value.shape, key
        assert torch.equal(state_twice[key], value), f"{key} differs after a refit"
    assert score.config() == config_once
    if score.fuses:  # a new reference makes it score again, the same as the score fitted once
        once.set_reference(once.features(net, net.run(clean)))
        score.set_reference(score.features(net, net.run(clean)))
        assert torch.equal(score.score(net, result), once.score(net, result))


@pytest.mark.parametrize("name", names_for("test_save_load_round_trip"))
def test_save_load_round_trip(name, pm, net, mlp, mlp_data, clean, tmp_path):
    det = lnp.ConsistencyDetector(net, method=name)
    if det.requires_training_data:
        det.fit(mlp_data)
    det.calibrate(clean, fpr=0.1)
    path = tmp_path / f"{name}.safetensors"
    det.save(path)
    loaded = lnp.ConsistencyDetector.load(path, mlp, plugin_manager=pm)
    assert loaded.method == name
    assert loaded.threshold_ == det.threshold_
    assert torch.equal(loaded.calibration_scores_, det.calibration_scores_)
    test = torch.randn(25, 10, generator=torch.Generator().manual_seed(3))
    for x in (test, clean[:9]):
        a, b = det.score(x), loaded.score(x)
        assert torch.equal(a, b), f"scores differ after load: max |diff| {(a - b).abs().max().item()}"
    assert torch.equal(det.predict(test), loaded.predict(test))


@pytest.mark.parametrize("name", names_for("test_memory_bytes_after_fit"))
def test_memory_bytes_after_fit(name, pm, net, mlp_data, clean):
    score = _fitted(name, pm, net, mlp_data, clean)
    n = score.memory_bytes()
    assert isinstance(n, int) and not isinstance(n, bool), type(n)
    assert n >= 0
    # whatever the score saves is counted
    saved = sum(t.numel() * t.element_size() for t in score.state_dict().values())
    assert n >= saved


@pytest.mark.parametrize("name", names_for("test_unknown_setting_rejected"))
def test_unknown_setting_rejected(name, pm):
    cls = DETECTORS[name]
    with pytest.raises(TypeError) as info:
        make_detector(name, {"no_such_setting": 1}, pm)
    message = str(info.value)
    assert cls.__name__ in message and "no_such_setting" in message, message
    with pytest.raises(TypeError):
        cls(no_such_setting=1)


@pytest.mark.parametrize("name", names_for("test_score_shape_dtype_device_finite"))
def test_score_shape_dtype_device_finite(name, pm, net, mlp_data, clean):
    score = _fitted(name, pm, net, mlp_data, clean)
    for b in (1, 13):
        s = score.score(net, net.run(clean[:b]))
        assert isinstance(s, torch.Tensor)
        assert s.shape == (b,)
        assert s.is_floating_point(), s.dtype
        assert s.device == net.device
        assert bool(torch.isfinite(s).all()), s
