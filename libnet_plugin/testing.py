"""Conformance checks for plugin authors: does a detector or a library keep the contract the core relies on?

In the manner of scikit-learn's ``check_estimator`` / ``parametrize_with_checks``: :func:`check_detector` and
:func:`check_library` run every check on a small seeded model and data built here (nothing is downloaded,
a few seconds in all) and raise :class:`AssertionError` naming the check that failed; :func:`detector_checks`
and :func:`library_checks` give the checks one by one, for ``pytest.mark.parametrize``::

    import pytest
    from libnet_plugin.testing import detector_checks

    @pytest.mark.parametrize("check", detector_checks(MyScore), ids=lambda c: c.name)
    def test_my_score(check):
        check()

The contracts are :class:`~libnet_plugin.detectors.ConsistencyScore` (``libnet_plugin/detectors/api.py``) and
:class:`~libnet_plugin.library.Library` (``libnet_plugin/library.py``). The project's own tests run these
checks on every built-in detector and library (``tests/detectors/test_conformance.py``,
``tests/test_library_conformance.py``).

Example:
    >>> from libnet_plugin.detectors.msp import MaxSoftmaxScore
    >>> check_detector(MaxSoftmaxScore)  # every check passes: nothing is raised
    >>> [c.name for c in detector_checks(MaxSoftmaxScore)][:2]
    ['check_hook_serves_it', 'check_fit_returns_self']
"""

from __future__ import annotations

import copy
import functools
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pluggy
import torch
from torch import nn

from ._validate import construct
from .consistency_detector import ConsistencyDetector
from .detectors import ConsistencyScore
from .errors import NotFittedError, ShapeMismatchError
from .hookspecs import hookimpl
from .library import Library
from .network import LibraryNetwork
from .plugins import get_plugin_manager, make_detector, make_library

__all__ = ["Check", "check_detector", "check_library", "detector_checks", "library_checks"]

#: the probed layers of the checks' model (widths 32, 16 and 4)
LAYERS = ["fc1", "fc2", "out"]
#: the tolerance of cosine comparisons between code paths (float32 rounding of a few products)
TOL = 1e-5


class _SmallMLP(nn.Module):
    """The checks' model: 10 inputs, hidden layers of 32 and 16 units, 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model() -> _SmallMLP:
    """The seeded model (weights from seed 0), without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _SmallMLP().eval()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """300 training inputs ``[300, 10]`` and labels in 0..3 (seed 1)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(300, 10, generator=g), torch.randint(0, 4, (300,), generator=g)


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 10, generator=torch.Generator().manual_seed(seed))


def _saved_and_loaded(obj: Any, cls: Any, c: Any) -> Any:
    """``obj`` saved to a temporary file and loaded again by ``cls.load`` onto the case's model and plugins."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{c.name}.safetensors"
        obj.save(path)
        return cls.load(path, c.model, plugin_manager=c.pm)


@contextmanager
def _raises(exc: type[BaseException], what: str) -> Iterator[list[BaseException]]:
    """``pytest.raises`` without pytest: the block must raise ``exc``; the exception lands in the list."""
    caught: list[BaseException] = []
    try:
        yield caught
    except exc as e:
        caught.append(e)
        return
    raise AssertionError(f"{what}: expected {exc.__name__}, nothing was raised")


class Check:
    """One named conformance check bound to its subject; calling it runs it (an ``AssertionError`` on failure).

    Attributes:
        name: the check's name (``check_...``), the id to give ``pytest.mark.parametrize``.
        subject: the name of what is checked (the detector's or library's served name).

    Args:
        name: the check's name.
        subject: the name of what is checked.
        fn: the check, bound to its subject.

    Example:
        >>> check = Check("check_truth", "demo", lambda: None)
        >>> check, check.name
        (Check('check_truth' on 'demo'), 'check_truth')
        >>> check()
    """

    def __init__(self, name: str, subject: str, fn: Callable[[], None]):
        self.name, self.subject, self._fn = name, subject, fn

    def __call__(self) -> None:
        """Run the check (an ``AssertionError`` when it fails)."""
        self._fn()

    def __repr__(self) -> str:
        return f"Check({self.name!r} on {self.subject!r})"


class _Serve:
    """A plugin serving one detector or library (a class, or copies of an instance) under its name."""

    def __init__(self, hook: str, name: str, obj: Any):
        self.hook_name, self.name, self.obj = hook, name, obj

    def _make(self, name: str, settings: Mapping[str, Any]) -> Any:
        if name != self.name:
            return None
        if isinstance(self.obj, type):
            return construct(self.obj, settings)
        return construct(type(self.obj), settings) if settings else copy.deepcopy(self.obj)

    @hookimpl(tryfirst=True)
    def libnet_consistency_detector(self, name: str, settings: Mapping[str, Any]) -> Any:
        return self._make(name, settings) if self.hook_name == "detector" else None

    @hookimpl(tryfirst=True)
    def libnet_library(self, name: str, settings: Mapping[str, Any]) -> Any:
        return self._make(name, settings) if self.hook_name == "library" else None


def _subject(obj: Any, hook: str, name: str | None,
             plugin_manager: pluggy.PluginManager | None) -> tuple[str, type, pluggy.PluginManager]:
    """The served name, the class and a plugin manager that serves it (the given one, or a fresh one)."""
    cls = obj if isinstance(obj, type) else type(obj)
    if name is None:
        name = getattr(obj, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__} has no `name` to be served under: pass name=...")
    if plugin_manager is None:
        plugin_manager = get_plugin_manager(autoload=False)
        plugin_manager.register(_Serve(hook, str(name), obj), name=f"libnet-testing-{hook}-{name}")
    return str(name), cls, plugin_manager


# ---------------------------------------------------------------------------------------------------------
# detectors: the ConsistencyScore contract
# ---------------------------------------------------------------------------------------------------------

class _DetectorCase:
    """What the detector checks share: the served name, the class, the plugin manager, model and data."""

    def __init__(self, name: str, cls: type, pm: pluggy.PluginManager):
        self.name, self.cls, self.pm = name, cls, pm
        self.model = _model()
        self.train = _data()
        self.clean = _inputs(60, 2)  # held-out clean inputs: enough for fpr=0.1

    def net(self) -> LibraryNetwork:
        return LibraryNetwork(self.model, LAYERS, thresholds=0.85, plugin_manager=self.pm).fit(self.train[0])

    def make(self) -> ConsistencyScore:
        return make_detector(self.name, {}, self.pm)

    def fit(self, score: ConsistencyScore, net: LibraryNetwork) -> ConsistencyScore:
        return score.fit(net, self.train if score.requires_training_data else None)

    def fitted(self, net: LibraryNetwork) -> ConsistencyScore:
        """A fitted score; a fused one also gets the clean reference, so that it can score."""
        score = self.fit(self.make(), net)
        if score.fuses:
            score.set_reference(score.features(net, net.run(self.clean)))
        return score


def _state(score: ConsistencyScore) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in score.state_dict().items()}


def check_hook_serves_it(c: _DetectorCase) -> None:
    """The ``libnet_consistency_detector`` hook serves the class under its name, as a ConsistencyScore."""
    score = c.make()
    assert isinstance(score, c.cls), f"the hook served {type(score).__name__} for {c.name!r}, not {c.cls.__name__}"
    assert isinstance(score, ConsistencyScore)
    assert score.name == c.name, (score.name, c.name)


def check_fit_returns_self(c: _DetectorCase) -> None:
    """``fit`` returns the score itself, and ``check_is_fitted`` passes after it."""
    score = c.make()
    assert c.fit(score, c.net()) is score, "fit must return self"
    score.check_is_fitted()  # does not raise once fitted


def check_score_before_fit_raises_not_fitted(c: _DetectorCase) -> None:
    """``score`` and ``check_is_fitted`` before ``fit`` raise NotFittedError."""
    score, net = c.make(), c.net()
    result = net.run(c.clean[:5])
    with _raises(NotFittedError, "score before fit"):
        score.score(net, result)
    with _raises(NotFittedError, "check_is_fitted before fit"):
        score.check_is_fitted()


def check_refit_resets(c: _DetectorCase) -> None:
    """A second ``fit`` on the same data gives the state, config and scores of one fit (it forgets the reference)."""
    net = c.net()
    once = c.fit(c.make(), net)
    state_once, config_once = _state(once), once.config()

    score = c.fitted(net)
    result = net.run(c.clean[:7])
    assert score.score(net, result).shape == (7,)
    c.fit(score, net)  # refit on the same data
    if score.fuses:
        # the clean reference given before the refit is forgotten
        with _raises(NotFittedError, "a fused score after a refit, before a new reference"):
            score.score(net, result)
    state_twice = _state(score)
    assert sorted(state_twice) == sorted(state_once)
    for key, value in state_once.items():
        assert state_twice[key].shape == value.shape, key
        assert torch.equal(state_twice[key], value), f"{key} differs after a refit"
    assert score.config() == config_once
    if score.fuses:  # a new reference makes it score again, the same as the score fitted once
        once.set_reference(once.features(net, net.run(c.clean)))
        score.set_reference(score.features(net, net.run(c.clean)))
        assert torch.equal(score.score(net, result), once.score(net, result))


def check_save_load_round_trip(c: _DetectorCase) -> None:
    """A calibrated detector saved and loaded gives the same method, threshold, calibration scores and scores."""
    det = ConsistencyDetector(c.net(), method=c.name)
    if det.requires_training_data:
        det.fit(c.train)
    det.calibrate(c.clean, fpr=0.1)
    loaded = _saved_and_loaded(det, ConsistencyDetector, c)
    assert loaded.method == c.name
    assert loaded.threshold_ == det.threshold_
    assert torch.equal(loaded.calibration_scores_, det.calibration_scores_)
    test = _inputs(25, 3)
    for x in (test, c.clean[:9]):
        a, b = det.score(x), loaded.score(x)
        assert torch.equal(a, b), f"scores differ after load: max |diff| {(a - b).abs().max().item()}"
    assert torch.equal(det.predict(test), loaded.predict(test))


def check_memory_bytes_after_fit(c: _DetectorCase) -> None:
    """``memory_bytes()`` is an int that counts at least what the score saves."""
    score = c.fitted(c.net())
    n = score.memory_bytes()
    assert isinstance(n, int) and not isinstance(n, bool), type(n)
    assert n >= 0
    # whatever the score saves is counted
    saved = sum(t.numel() * t.element_size() for t in score.state_dict().values())
    assert n >= saved, (n, saved)


def check_unknown_setting_rejected(c: _DetectorCase) -> None:
    """An unknown setting is a TypeError naming the class and the key, through the hook and the constructor."""
    with _raises(TypeError, "an unknown setting through the hook") as info:
        make_detector(c.name, {"no_such_setting": 1}, c.pm)
    message = str(info[0])
    assert c.cls.__name__ in message and "no_such_setting" in message, message
    with _raises(TypeError, "an unknown setting given to the class"):
        c.cls(no_such_setting=1)


def check_score_shape_dtype_device_finite(c: _DetectorCase) -> None:
    """``score`` gives a finite floating Tensor ``[B]`` on the network's device, for batches of 1 and 13."""
    net = c.net()
    score = c.fitted(net)
    for b in (1, 13):
        s = score.score(net, net.run(c.clean[:b]))
        assert isinstance(s, torch.Tensor)
        assert s.shape == (b,), (s.shape, b)
        assert s.is_floating_point(), s.dtype
        assert s.device == net.device
        assert bool(torch.isfinite(s).all()), s


_DETECTOR_CHECKS = [check_hook_serves_it, check_fit_returns_self, check_score_before_fit_raises_not_fitted,
                    check_refit_resets, check_save_load_round_trip, check_memory_bytes_after_fit,
                    check_unknown_setting_rejected, check_score_shape_dtype_device_finite]


def detector_checks(detector: type[ConsistencyScore] | ConsistencyScore, *, name: str | None = None,
                    plugin_manager: pluggy.PluginManager | None = None) -> list[Check]:
    """The conformance checks of a detector, one :class:`Check` each (call it to run it).

    Args:
        detector: a :class:`~libnet_plugin.detectors.ConsistencyScore` subclass, or an instance (each check
            works on a deep copy of it).
        name: the name it is served under (default: its ``name`` attribute).
        plugin_manager: a plugin manager that already serves it under ``name`` (the check then also tests
            that plugin's hook); by default a fresh manager with the built-ins and a plugin serving it.

    Returns:
        The checks, in a fixed order; each builds its own seeded model, data and network when it runs.

    Example:
        >>> from libnet_plugin.detectors.msp import MaxSoftmaxScore
        >>> checks = detector_checks(MaxSoftmaxScore)
        >>> checks[0].name, checks[0].subject
        ('check_hook_serves_it', 'msp')
        >>> checks[0]()
    """
    served, cls, pm = _subject(detector, "detector", name, plugin_manager)
    return [Check(fn.__name__, served, functools.partial(_run_on, fn, _DetectorCase, served, cls, pm))
            for fn in _DETECTOR_CHECKS]


def check_detector(detector: type[ConsistencyScore] | ConsistencyScore, *, name: str | None = None,
                   plugin_manager: pluggy.PluginManager | None = None) -> None:
    """Run every conformance check of :func:`detector_checks` on a detector.

    Args:
        detector: a ConsistencyScore subclass or instance.
        name: the name it is served under (default: its ``name``).
        plugin_manager: a manager that serves it already (default: a fresh one that does).

    Raises:
        AssertionError: naming the first check that failed and why.

    Example:
        >>> from libnet_plugin.detectors.msp import MaxSoftmaxScore
        >>> class Broken(MaxSoftmaxScore):
        ...     name = "broken"
        ...     def fit(self, net, data=None):
        ...         return None
        >>> check_detector(Broken)
        Traceback (most recent call last):
        ...
        AssertionError: check_fit_returns_self failed on 'broken': fit must return self...
    """
    _run(detector_checks(detector, name=name, plugin_manager=plugin_manager))


# ---------------------------------------------------------------------------------------------------------
# libraries: the Library protocol
# ---------------------------------------------------------------------------------------------------------

class _LibraryCase:
    """What the library checks share: the served name, the class, its settings, the fc1 activations."""

    def __init__(self, name: str, cls: type, pm: pluggy.PluginManager, options: Mapping[str, Any]):
        self.name, self.cls, self.pm, self.options = name, cls, pm, dict(options)
        self.model = _model()
        self.x = _data()[0]
        with torch.no_grad():
            self.haps = self.model.fc1(self.x).detach()  # raw fc1 activations [300, 32] (what the probe hands over)
            self.queries = self.model.fc1(_inputs(17, 5)).detach()

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {"threshold": 0.8, "device": "cpu", "layer": "fc1", **self.options, **extra}

    def make(self, **extra: Any) -> Any:
        return make_library(self.name, self.settings(**extra), self.pm)

    def fitted(self) -> Any:
        lib = self.make()
        lib.partial_fit(self.haps, torch.arange(self.haps.shape[0]))
        return lib


def check_served_and_starts_empty(c: _LibraryCase) -> None:
    """The ``libnet_library`` hook serves the class under its name; a new library holds no node."""
    lib = c.make()
    assert isinstance(lib, c.cls), f"the hook served {type(lib).__name__} for {c.name!r}, not {c.cls.__name__}"
    assert isinstance(lib, Library)
    assert lib.threshold == 0.8
    assert lib.size == 0
    assert lib.node_indices.numel() == 0


def check_partial_fit_reports_what_it_stores(c: _LibraryCase) -> None:
    """``partial_fit`` returns a bool mask of the rows it stored, in visiting order."""
    lib, haps = c.make(), c.haps
    for start, stop in ((0, 120), (120, 121), (121, 300)):
        before = lib.size
        indices = torch.arange(start, stop)
        stored = lib.partial_fit(haps[start:stop], indices)
        assert isinstance(stored, torch.Tensor)
        assert stored.dtype == torch.bool and stored.shape == (stop - start,)
        assert lib.size - before == int(stored.sum())
        assert torch.equal(lib.node_indices[before:].cpu(), indices[stored.cpu()])
        if start == 0:
            assert bool(stored[0]), "the first row of an empty library is always novel"
    assert 1 < lib.size < haps.shape[0], lib.size  # theta 0.8 on these activations keeps some rows, not all
    assert lib.node_indices.shape == (lib.size,)
    assert bool((lib.node_indices.diff() > 0).all()), "nodes are stored in visiting order"


def check_similarity_is_cosine_to_every_node(c: _LibraryCase) -> None:
    """``similarity`` gives cosines ``[B, size]`` in [-1, 1]: 1 for a node's own row, theta reached by every row."""
    lib = c.fitted()
    h = lib.similarity(c.queries)
    assert h.shape == (c.queries.shape[0], lib.size)
    assert h.is_floating_point()
    assert bool(((h >= -1 - TOL) & (h <= 1 + TOL)).all()), (h.min(), h.max())
    # every stored row has cosine ~1 with its own node (node j holds row node_indices[j])
    own = lib.similarity(c.haps[lib.node_indices])
    assert own.shape == (lib.size, lib.size)
    torch.testing.assert_close(own.diagonal(), torch.ones(lib.size), atol=TOL, rtol=0)
    # and every training row reaches theta with some node (else it would have been stored)
    assert bool((lib.similarity(c.haps).amax(dim=1) >= lib.threshold - TOL).all())


def check_state_dict_round_trip(c: _LibraryCase) -> None:
    """``load_state_dict(state_dict())`` into a new library gives the same nodes and cosines."""
    lib = c.fitted()
    fresh = c.make()
    fresh.load_state_dict({k: v.clone() for k, v in lib.state_dict().items()})
    assert fresh.size == lib.size
    assert torch.equal(fresh.node_indices, lib.node_indices)
    assert torch.equal(fresh.similarity(c.queries), lib.similarity(c.queries))
    assert torch.equal(fresh.similarity(c.haps), lib.similarity(c.haps))


def check_config_is_json(c: _LibraryCase) -> None:
    """``config()`` is JSON (round trip) and carries the served name, empty and fitted."""
    lib = c.make()
    for stage in ("empty", "fitted"):
        if stage == "fitted":
            lib.partial_fit(c.haps, torch.arange(c.haps.shape[0]))
        config = lib.config()
        text = json.dumps(config)
        assert json.loads(text) == config, stage
        assert config["name"] == c.name, stage


def check_library_unknown_setting_rejected(c: _LibraryCase) -> None:
    """An unknown setting is a TypeError naming the class and the key, through the hook and the constructor."""
    with _raises(TypeError, "an unknown setting through the hook") as info:
        c.make(no_such_setting=1)
    message = str(info[0])
    assert c.cls.__name__ in message and "no_such_setting" in message, message
    with _raises(TypeError, "an unknown setting given to the class"):
        c.cls(0.8, no_such_setting=1)


def check_threshold_outside_unit_interval_rejected(c: _LibraryCase) -> None:
    """A threshold outside (0, 1] (or NaN) is a ValueError; 1 is accepted."""
    for bad in (0, 0.0, -0.5, 1.0001, 2.0, float("nan")):
        with _raises(ValueError, f"threshold {bad}"):
            c.make(threshold=bad)
    assert c.make(threshold=1.0).threshold == 1.0  # (0, 1] is closed at 1


def check_wrong_width_after_first_batch(c: _LibraryCase) -> None:
    """Rows of another width than the first batch's are a ShapeMismatchError, and store nothing."""
    lib, haps = c.make(), c.haps
    lib.partial_fit(haps[:50], torch.arange(50))
    size = lib.size
    with _raises(ShapeMismatchError, "a narrower batch"):
        lib.partial_fit(haps[50:60, :31], torch.arange(50, 60))
    with _raises(ShapeMismatchError, "a wider batch"):
        lib.partial_fit(torch.cat([haps[50:60], haps[50:60, :1]], dim=1), torch.arange(50, 60))
    assert lib.size == size  # a rejected batch stores nothing
    with _raises(ShapeMismatchError, "similarity of a narrower batch"):
        lib.similarity(haps[:5, :31])


def check_network_save_load_round_trip(c: _LibraryCase) -> None:
    """A LibraryNetwork of these libraries saved and loaded gives the same sizes and evidence."""
    net = LibraryNetwork(c.model, LAYERS, thresholds=0.85, library=c.name, library_options=c.options,
                         plugin_manager=c.pm).fit(c.x)
    assert all(isinstance(lib, c.cls) for lib in net.libraries_.values())
    loaded = _saved_and_loaded(net, LibraryNetwork, c)
    assert loaded.library == c.name
    assert loaded.library_sizes_ == net.library_sizes_
    test = _inputs(40, 6)
    a, b = net.predict_scores(test), loaded.predict_scores(test)
    assert sorted(a) == sorted(b) == sorted(LAYERS)
    for layer in a:
        assert torch.equal(a[layer], b[layer]), layer


_LIBRARY_CHECKS = [check_served_and_starts_empty, check_partial_fit_reports_what_it_stores,
                   check_similarity_is_cosine_to_every_node, check_state_dict_round_trip, check_config_is_json,
                   check_library_unknown_setting_rejected, check_threshold_outside_unit_interval_rejected,
                   check_wrong_width_after_first_batch, check_network_save_load_round_trip]


def library_checks(library: type | Library, *, name: str | None = None, options: Mapping[str, Any] | None = None,
                   plugin_manager: pluggy.PluginManager | None = None) -> list[Check]:
    """The conformance checks of a library, one :class:`Check` each (call it to run it).

    Args:
        library: a class following the :class:`~libnet_plugin.library.Library` protocol (constructed as
            ``cls(threshold, **settings)``), or an instance.
        name: the name it is served under (default: its ``name`` attribute).
        options: settings that make it see less than the checks' layers (widths 32, 16, 4), e.g.
            ``{"n_units": 8}``; they are passed with every construction.
        plugin_manager: a manager that already serves it under ``name`` (default: a fresh one that does).

    Returns:
        The checks, in a fixed order; each builds its own seeded model and activations when it runs.

    Example:
        >>> from libnet_plugin.sparse import SparseLibrary
        >>> [c.name for c in library_checks(SparseLibrary, name="sparse", options={"n_units": 8})][:2]
        ['check_served_and_starts_empty', 'check_partial_fit_reports_what_it_stores']
    """
    served, cls, pm = _subject(library, "library", name, plugin_manager)
    opts = dict(options or {})
    return [Check(fn.__name__, served, functools.partial(_run_on, fn, _LibraryCase, served, cls, pm, opts))
            for fn in _LIBRARY_CHECKS]


def check_library(library: type | Library, *, name: str | None = None, options: Mapping[str, Any] | None = None,
                  plugin_manager: pluggy.PluginManager | None = None) -> None:
    """Run every conformance check of :func:`library_checks` on a library.

    Args:
        library: a Library class or instance.
        name: the name it is served under.
        options: settings passed with every construction.
        plugin_manager: a manager that serves it already (default: a fresh one that does).

    Raises:
        AssertionError: naming the first check that failed and why.

    Example:
        >>> from libnet_plugin.library import ExactLibrary
        >>> check_library(ExactLibrary)
    """
    _run(library_checks(library, name=name, options=options, plugin_manager=plugin_manager))


def _run_on(check: Callable[[Any], None], case: Callable[..., Any], *args: Any) -> None:
    """Build the check's case (its own seeded model and data) and run the check on it."""
    check(case(*args))


def _run(checks: list[Check]) -> None:
    for check in checks:
        try:
            check()
        except AssertionError as e:
            raise AssertionError(f"{check.name} failed on {check.subject!r}: {e}") from e
