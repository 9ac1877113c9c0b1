"""Every malformed file gives SaveFormatError at load (never a raw traceback, never an error at first use).

The files here are edited as a writer without the key could: the unkeyed digests are recomputed after each
edit, so only the checks of the settings and tensors themselves stand between the file and the detector.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import libnet_plugin as lnp
from libnet_plugin import serialization
from libnet_plugin.consistency_detector import ModelChangedError
from libnet_plugin.errors import SaveFormatError


def _read(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _write(path, meta, data, *, recompute=True):
    meta = dict(meta)
    if recompute:
        meta["digests"] = json.dumps(serialization.file_digests(meta["kind"], meta["config"], data), sort_keys=True)
    save_file(data, str(path), metadata=meta)


def _edit_config(path, out, edit):
    meta, data = _read(path)
    cfg = json.loads(meta["config"])
    cfg = edit(cfg)
    meta["config"] = cfg if isinstance(cfg, str) else json.dumps(cfg)
    _write(out, meta, data)


def test_deeply_nested_digests_give_save_format_error(tmp_path, fitted, mlp):
    fitted.save(tmp_path / "net.lnp")
    meta, data = _read(tmp_path / "net.lnp")
    meta["digests"] = "[" * 200_000 + "]" * 200_000  # no recomputation needed: refused while parsing
    _write(tmp_path / "net.lnp", meta, data, recompute=False)
    with pytest.raises(SaveFormatError, match="nested deeper"):
        lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)


def test_the_depth_check_reads_strings_and_escapes_right():
    """Brackets inside strings do not count; the scan is linear (an escape-heavy unterminated string of 60,000
    characters took about a minute with a backtracking pattern)."""
    assert serialization.parse_json('["[[[[", "\\"]]", {"a": "{{{"}]', "x") == ["[[[[", '"]]', {"a": "{{{"}]
    with pytest.raises(SaveFormatError, match="not readable JSON"):
        serialization.parse_json('"' + '\\"' * 30_000, "the settings")
    with pytest.raises(SaveFormatError, match="nested deeper than 3"):
        serialization.parse_json('[[[["x"]]]]', "the settings", max_depth=3)


@pytest.mark.parametrize("config", ["[" * 200_000 + "]" * 200_000, "[1, 2]", "3", '"text"', "null", "{"])
def test_a_settings_entry_that_is_not_an_object_gives_save_format_error(tmp_path, fitted, mlp, config):
    fitted.save(tmp_path / "net.lnp")
    _edit_config(tmp_path / "net.lnp", tmp_path / "bad.lnp", lambda cfg: config)
    with pytest.raises(SaveFormatError):
        lnp.LibraryNetwork.load(tmp_path / "bad.lnp", mlp)


def test_a_missing_library_configs_entry_gives_save_format_error(tmp_path, fitted, mlp):
    fitted.save(tmp_path / "net.lnp")

    def drop(cfg):
        del cfg["library_configs"]["fc2"]
        return cfg

    _edit_config(tmp_path / "net.lnp", tmp_path / "bad.lnp", drop)
    with pytest.raises(SaveFormatError, match=r"'library_configs' has no entry for the layer\(s\) \['fc2'\]"):
        lnp.LibraryNetwork.load(tmp_path / "bad.lnp", mlp)


@pytest.mark.parametrize("name, tensor", [
    ("library/1/nodes", lambda t: t[:, :-1].contiguous()),          # one feature short
    ("library/1/nodes", lambda t: t.double()),                       # another dtype: loads as float32 today
    ("library/1/node_indices", lambda t: t[:-1].contiguous()),       # one index short
    ("library/1/node_indices", lambda t: t.float()),                 # indices that are not integers
    ("readout/2/weight", lambda t: t[:, :-1].contiguous()),          # one class short
    ("library/0/nodes", lambda t: t[:0].contiguous()),               # no nodes at all
])
def test_tensors_of_the_wrong_shape_or_dtype_give_save_format_error_at_load(tmp_path, fitted, mlp, mlp_data,
                                                                           name, tensor):
    fitted.save(tmp_path / "net.lnp")
    meta, data = _read(tmp_path / "net.lnp")
    data[name] = tensor(data[name])
    _write(tmp_path / "net.lnp", meta, data)
    try:
        net = lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)
    except SaveFormatError as exc:
        assert "layer" in str(exc)
        return
    # the one harmless edit: float64 nodes load as the library's float32, with the same scores
    assert data[name].dtype == torch.float64
    x, _ = mlp_data
    assert torch.allclose(net.predict_scores(x[:8])["fc2"], fitted.predict_scores(x[:8])["fc2"], atol=1e-5)


@pytest.mark.parametrize("library, options, entry, value", [
    ("sparse", {"n_units": 12, "seed": 5}, "dim", 10 ** 11),          # would draw a 800 GB permutation
    ("sparse", {"n_units": 12, "seed": 5}, "n_units", 10 ** 11),
    ("projected", {"n_components": 12, "seed": 5}, "dim", 10 ** 11),  # a 10^11 x 12 Gaussian map
    ("projected", {"n_components": 12, "seed": 5}, "n_components", 10 ** 9),
    ("projected", {"n_components": 12, "seed": 5, "method": "hashing"}, "dim", 10 ** 11),
])
def test_huge_settings_are_refused_or_cost_nothing_at_load(tmp_path, mlp, mlp_data, library, options, entry, value):
    """A library asking for a huge map or sample is checked against its saved tensors before any allocation."""
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.85, library=library, library_options=options).fit(x[:40])
    net.save(tmp_path / "net.lnp")

    def grow(cfg):
        cfg["library_configs"]["fc1"][entry] = value
        cfg["hap_dims"]["fc1"] = value if entry == "dim" else cfg["hap_dims"]["fc1"]
        return cfg

    _edit_config(tmp_path / "net.lnp", tmp_path / "big.lnp", grow)
    try:
        loaded = lnp.LibraryNetwork.load(tmp_path / "big.lnp", mlp)
    except SaveFormatError:
        return
    # loaded without allocating: the real activations (32 features) then contradict the saved width, clearly
    with pytest.raises(lnp.ShapeMismatchError, match="fc1"):
        loaded.predict_scores(x[:4])


def _paths(value, prefix=()):
    """Every path into a JSON value (containers and leaves), in a fixed order."""
    yield prefix
    if isinstance(value, dict):
        for k in sorted(value):
            yield from _paths(value[k], prefix + (k,))
    elif isinstance(value, list) and prefix[:1] != ("fingerprint",):  # the fingerprint's rows: one edit each
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))
    elif isinstance(value, list):
        yield from ((prefix + (i,)) for i in range(len(value)))


_VALUES = [None, True, -1, 0, 10 ** 12, 1e308, -0.5, "x", "", [], {}, [1, [2]], {"a": {"b": 1}}]


def _set(cfg, path, value):
    """``cfg`` with the entry at ``path`` replaced by ``value`` (``...``: deleted)."""
    if not path:
        return value
    node = cfg
    for k in path[:-1]:
        node = node[k]
    if value is ...:
        if isinstance(node, dict):
            del node[path[-1]]
        else:
            node.pop(path[-1])
    else:
        node[path[-1]] = value
    return cfg


@pytest.mark.filterwarnings("ignore:.*carries no digests")
def test_fuzzed_settings_give_save_format_error_or_a_working_detector(tmp_path, mlp, mlp_data):
    """Seeded and bounded: each entry of a saved detector's settings (network, score, calibration) and each
    tensor's header edited to another type or a far-off value, or deleted, digests recomputed. Loading
    either refuses with SaveFormatError (or ModelChangedError for the fingerprint) or gives a detector
    that scores. (The k-NN score: a fitted state that loads fast; every built-in score passes the same
    edits, each to every value of ``_VALUES``, in a slower run.)"""
    x, y = mlp_data
    small = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.5).fit(x[:40])  # small files: fast loads
    det = lnp.ConsistencyDetector(small, method="knn").fit((x[:40], y[:40]))
    det.calibrate(x[40:60], fpr=0.1).save(tmp_path / "det.lnp")
    meta, data = _read(tmp_path / "det.lnp")
    base = json.loads(meta["config"])
    rng = random.Random(0)
    cases = []
    for path in _paths(base):
        cases.append((path, rng.choice(_VALUES)))
        if path and rng.random() < 0.2:
            cases.append((path, ...))
    outcomes = {"refused": 0, "loaded": 0}
    bad = tmp_path / "bad.lnp"
    for path, value in cases:
        cfg = _set(json.loads(meta["config"]), path, value)
        _write(bad, {**meta, "config": json.dumps(cfg)}, data)
        try:
            loaded = lnp.ConsistencyDetector.load(bad, mlp)
        except (SaveFormatError, ModelChangedError) as exc:
            assert str(exc), path
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # pragma: no cover - what this test is for
            raise AssertionError(f"editing {path} to {value!r} gave {type(exc).__name__} at load: {exc}") from exc
        try:
            loaded.score(x[:4])
        except lnp.NotFittedError:  # a detector saved before calibration is a valid file: it asks for calibrate
            assert not loaded.is_calibrated, path
        except lnp.ShapeMismatchError:  # the input shape: nothing in the file to check it against; fails closed
            assert path[:2] == ("network", "input_shape"), path
        except Exception as exc:  # pragma: no cover
            raise AssertionError(f"editing {path} to {value!r} loaded, then gave {type(exc).__name__} at first use: "
                                 f"{exc}") from exc
        outcomes["loaded"] += 1
    # tensor headers: another dtype or shape of each tensor
    for name in sorted(data):
        for change in (lambda t: t.to(torch.float16) if t.is_floating_point() else t.to(torch.int32),
                       lambda t: t.reshape(-1)[:-1].contiguous() if t.numel() > 1 else t.reshape(1, -1)):
            _write(bad, meta, {**data, name: change(data[name])})
            try:
                loaded = lnp.ConsistencyDetector.load(bad, mlp)
            except SaveFormatError:
                outcomes["refused"] += 1
                continue
            except Exception as exc:  # pragma: no cover
                raise AssertionError(f"changing the tensor {name} gave {type(exc).__name__} at load: {exc}") from exc
            try:
                loaded.score(x[:4])
            except Exception as exc:  # pragma: no cover
                raise AssertionError(f"changing the tensor {name} loaded, then gave {type(exc).__name__} at "
                                     f"first use: {exc}") from exc
            outcomes["loaded"] += 1
    # the header's own entries (format, version, kind, settings, digests): another value or none at all
    for entry in sorted(meta):
        for value in ("", "x", "[" * 100 + "]" * 100, "{}", "null", "2", None):
            edited = {k: v for k, v in meta.items() if k != entry}
            if value is not None:
                edited[entry] = value
            _write(bad, edited, data, recompute=False)
            try:
                lnp.ConsistencyDetector.load(bad, mlp)
            except SaveFormatError:
                outcomes["refused"] += 1
                continue
            except Exception as exc:  # pragma: no cover
                raise AssertionError(f"the header entry {entry} as {value!r} gave {type(exc).__name__}: {exc}") from exc
            assert entry == "digests" and value is None, (entry, value)  # no digests: an old file, with a warning
    assert outcomes["refused"] > 40 and len(cases) > 60, (outcomes, len(cases))
